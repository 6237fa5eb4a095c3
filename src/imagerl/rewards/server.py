"""The reward server: configured rewards over JSON/HTTP, plus an OpenAI-compatible VLM judge endpoint.

Endpoints (FastAPI on uvicorn):
  POST /v1/score               {rewards?, images: [base64 PNG], prompts, metadata?, texts?, source_images?,
                                group_ids?} -> {scores: {name: [float | null]}, details: {name: {...}}}
  POST /v1/chat/completions    OpenAI chat completions (with logprobs/top_logprobs) from an in-process
                                `LocalVLMBackend`, so the same judge client talks to vLLM or to us
  GET  /v1/models              the served chat model (OpenAI format)
  GET  /health                 rewards loaded, chat model, queue depth (no auth: for load balancers)

Scoring requests from many clients are coalesced by a `DynamicBatcher` into one scorer call per
reward (up to ``max_batch`` samples, waiting at most ``max_wait_ms``); requests are grouped by the
reward names they ask for and by image size, since a `RewardInput` holds one [N,3,H,W] tensor.
Group ids are renumbered per request inside a coalesced batch so groups of different clients never
merge. JSON only (never pickle): images travel as base64 PNG, abstains as ``null``.

Errors use OpenAI's ``{"error": {"message", "type", "code"}}`` body: 401 for a missing or wrong
Bearer key, 413 for a body over ``max_request_bytes`` or an image over ``max_image_pixels``, 400
naming the field (e.g. ``images[3]``) for corrupt or inconsistent input. A scorer that raises makes
its reward abstain (null) for that batch with the error in ``details``; it never yields a neutral
value and never takes the server down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the string annotations here
from fastapi.responses import JSONResponse

from ..imageio import to_pil, to_rgb
from ..types import RewardInput
from .base import Reward, group_chunks
from .judges.backend import ImageTooLargeError
from .vlm_local import DynamicBatcher, LocalVLMBackend

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
MAX_CHAT_TOKENS = 32768  # (Qwen2.5-VL's context; a request of 1e9 tokens that never met EOS held the one generation
                         # worker indefinitely)


class APIError(Exception):
    """An error answered to the client with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, etype: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.etype = etype
        self.code = code


# --------------------------------------------------------------------------------------------------
# Decoding and JSON helpers
# --------------------------------------------------------------------------------------------------


def decode_image(b64: Any, field: str, max_pixels: int) -> Any:
    """base64 PNG/JPEG (optionally a data URI) -> RGB PIL image, checking the pixel limit before decoding."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(b64, str):
        raise APIError(400, f"{field} must be a base64 string (PNG), got {type(b64).__name__}")
    if b64.startswith("data:"):
        b64 = b64.partition(",")[2]
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{field} is not valid base64 ({e}); send base64-encoded PNG bytes") from None
    try:
        img = Image.open(io.BytesIO(raw))  # reads the header only: the size is known before decoding pixels
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise APIError(400, f"{field} is not a readable image (corrupt or unsupported format): {e}") from None
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise APIError(413, f"{field} is {w}x{h} = {w * h} pixels, over the server's limit of {max_pixels} "
                            f"(server.max_image_pixels); downscale the images or raise server.max_image_pixels")
    try:
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise APIError(400, f"{field} is a corrupt image (truncated or bad data): {e}") from None
    return to_rgb(img)


def pil_to_tensor(img: Any) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float32 in [0, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def encode_png(img_3HW: torch.Tensor) -> str:
    """[3, H, W] float in [0, 1] -> base64 PNG (no data-URI prefix). Inverse of `decode_image`."""
    buf = io.BytesIO()
    to_pil(img_3HW).save(buf, format="PNG", compress_level=1)  # speed over size: loopback/LAN links
    return base64.b64encode(buf.getvalue()).decode()


def to_jsonable(v: Any) -> Any:
    """Tensors/arrays to lists, NaN/inf to null, unknown objects to str: the response must be valid JSON."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return to_jsonable(v.item() if v.dim() == 0 else v.tolist())
    if isinstance(v, np.ndarray):
        return to_jsonable(v.tolist())
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return to_jsonable(v.item())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    return str(v)


def _slice_detail(v: Any, n_total: int, lo: int, hi: int) -> Any:
    """Per-sample detail values (length N of the coalesced batch) are cut back to one request's rows."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n_total:
        return v[lo:hi]
    if isinstance(v, (list, tuple)) and len(v) == n_total:
        return list(v[lo:hi])
    return v


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoreJob:
    """One request's samples (or a max_batch-sized chunk of them)."""

    names: tuple[str, ...]
    images: torch.Tensor  # [n, 3, H, W]
    prompts: list[str]
    metadata: list[dict[str, Any]]
    texts: list[str] | None
    source_images: list[Any] | None
    group_ids: torch.Tensor  # [n] (a request without group ids is one group: zeros, set at parse time)

    def __len__(self) -> int:
        return len(self.prompts)

    def key(self) -> tuple[Any, ...]:
        return (self.names, tuple(self.images.shape[1:]), self.texts is not None, self.source_images is not None)

    def chunk(self, lo: int, hi: int) -> "ScoreJob":
        return ScoreJob(self.names, self.images[lo:hi], self.prompts[lo:hi], self.metadata[lo:hi],
                        self.texts[lo:hi] if self.texts is not None else None,
                        self.source_images[lo:hi] if self.source_images is not None else None,
                        self.group_ids[lo:hi])


@dataclass
class JobResult:
    scores: dict[str, list[float]]  # name -> [n] (NaN = abstain)
    details: dict[str, dict[str, Any]]


class RewardServer:
    """The ASGI app and its state: rewards by name, the scoring batcher, the optional chat VLM."""

    def __init__(
        self,
        rewards: dict[str, Reward],
        *,
        api_key: str | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        max_request_bytes: int = 64 * 1024 * 1024,
        max_image_pixels: int = 4096 * 4096,
        chat_backend: LocalVLMBackend | None = None,
        api_key_env: str = "",
    ) -> None:
        if max_request_bytes < 1024:
            raise ValueError(f"server.max_request_bytes={max_request_bytes} is too small (use >= 1024)")
        self.rewards = dict(rewards)
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.max_batch = int(max_batch)
        self.max_request_bytes = int(max_request_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.chat = chat_backend
        if self.chat is not None and self.max_image_pixels and not self.chat.max_image_pixels:
            self.chat.max_image_pixels = self.max_image_pixels
        self.batcher: DynamicBatcher[ScoreJob, JobResult] = DynamicBatcher(
            self._score_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, key=ScoreJob.key, size=len, name="scorer"
        )
        self.started = time.time()
        self.requests = {"score": 0, "chat": 0}  # accepted requests per endpoint (for /health and tests)
        self.app = self._build_app()

    # -- scoring (runs in the batcher's worker thread) ----------------------------------------
    @staticmethod
    def _batch_input(jobs: list[ScoreJob]) -> RewardInput:
        """One RewardInput for coalesced jobs (of one key). Group ids are renumbered per job: two clients' group 0
        are different groups (a request without group ids is one group), so no client's samples join another's."""
        parts, offset = [], 0
        for j in jobs:
            _, inv = torch.unique(j.group_ids, return_inverse=True)
            parts.append(inv + offset)
            offset += int(inv.max()) + 1 if len(j) else 0
        return RewardInput(
            images=torch.cat([j.images for j in jobs]) if len(jobs) > 1 else jobs[0].images,
            prompts=[p for j in jobs for p in j.prompts],
            metadata=[m for j in jobs for m in j.metadata],
            group_ids=torch.cat(parts),
            texts=[t for j in jobs for t in j.texts] if jobs[0].texts is not None else None,  # type: ignore[union-attr]
            source_images=[s for j in jobs for s in j.source_images] if jobs[0].source_images is not None else None,  # type: ignore[union-attr]
        )

    def _score_batch(self, jobs: list[ScoreJob]) -> list[JobResult]:
        names = jobs[0].names
        bounds, n = [], 0
        for j in jobs:
            bounds.append((n, n + len(j)))
            n += len(j)
        inp = self._batch_input(jobs)
        # name -> (scores [n], each job's details)
        per_reward: dict[str, tuple[torch.Tensor, list[dict[str, Any]]]] = {}
        for name in names:
            t0 = time.perf_counter()
            try:
                scores, details = self._run_reward(name, inp)
                per_job = [{k: _slice_detail(v, n, lo, hi) for k, v in details.items()} for lo, hi in bounds]
            except Exception as e:  # noqa: BLE001 - one broken scorer must not take the server down
                log.exception("reward '%s' failed on a batch of %d", name, n)
                if len(jobs) == 1:
                    scores, per_job = torch.full((n,), math.nan), [{"error": f"{type(e).__name__}: {e}", "failed_samples": n}]
                else:  # one client's bad input must not wipe the others' scores: each job on its own
                    scores, per_job = torch.full((n,), math.nan), []
                    for job, (lo, hi) in zip(jobs, bounds):
                        try:
                            s_j, d_j = self._run_reward(name, self._batch_input([job]))
                            scores[lo:hi] = s_j
                            per_job.append(d_j)
                        except Exception as e_j:  # noqa: BLE001
                            per_job.append({"error": f"{type(e_j).__name__}: {e_j}", "failed_samples": hi - lo})
            for d in per_job:
                d["batch_size"] = n
                d["score_seconds"] = time.perf_counter() - t0
            per_reward[name] = (scores, per_job)
        return [JobResult(scores={nm: s[lo:hi].tolist() for nm, (s, _) in per_reward.items()},
                          details={nm: d[k] for nm, (_, d) in per_reward.items()})
                for k, (lo, hi) in enumerate(bounds)]

    def _run_reward(self, name: str, inp: RewardInput) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.rewards[name](inp)
        scores = out.scores.float()
        if torch.isinf(scores).any():
            raise RuntimeError("returned an infinite score (NaN is the abstain value)")
        return scores, dict(out.details)

    def _parse_score(self, d: Any) -> ScoreJob:
        if not isinstance(d, dict):
            raise APIError(400, "the request body must be a JSON object {rewards, images, prompts, metadata, ...}")
        known = {"rewards", "images", "prompts", "metadata", "texts", "source_images", "group_ids"}
        extra = set(d) - known
        if extra:
            raise APIError(400, f"unknown field(s) {sorted(extra)}; valid fields: {sorted(known)}")
        names = d.get("rewards", "all")
        if names in ("all", None):
            names = list(self.rewards)
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
            raise APIError(400, "rewards must be a non-empty list of reward names, or \"all\"")
        unknown = [x for x in names if x not in self.rewards]
        if unknown:
            raise APIError(400, f"rewards {unknown} are not served here; this server serves {list(self.rewards)}")
        images = d.get("images")
        if not isinstance(images, list) or not images:
            raise APIError(400, "images must be a non-empty list of base64 PNG strings")
        n = len(images)
        prompts = d.get("prompts")
        if not isinstance(prompts, list) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, f"prompts must be a list of {n} strings (one per image)")
        metadata = d.get("metadata")
        if metadata is None:
            metadata = [{} for _ in range(n)]
        if not isinstance(metadata, list) or len(metadata) != n or not all(isinstance(m, dict) for m in metadata):
            raise APIError(400, f"metadata must be a list of {n} objects (one per image)")
        texts = d.get("texts")
        if texts is not None and (not isinstance(texts, list) or len(texts) != n or not all(isinstance(t, str) for t in texts)):
            raise APIError(400, f"texts must be null or a list of {n} strings")
        gids = d.get("group_ids")
        group_ids = torch.zeros(n, dtype=torch.long)  # none given: the request is one group
        if gids is not None:
            if not isinstance(gids, list) or len(gids) != n or not all(isinstance(g, int) and not isinstance(g, bool) for g in gids):
                raise APIError(400, f"group_ids must be null or a list of {n} integers")
            group_ids = torch.tensor(gids, dtype=torch.long)
        tensors = [pil_to_tensor(decode_image(b, f"images[{i}]", self.max_image_pixels)) for i, b in enumerate(images)]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            first = tensors[0].shape
            bad = next(i for i, t in enumerate(tensors) if t.shape != first)
            raise APIError(400, f"images[{bad}] is {tuple(tensors[bad].shape[1:])} (H, W) but images[0] is {tuple(first[1:])}; "
                                f"one request's images must share a size (send differently sized images in separate requests)")
        sources = d.get("source_images")
        source_images = None
        if sources is not None:
            if not isinstance(sources, list) or len(sources) != n:
                raise APIError(400, f"source_images must be null or a list of {n} base64 images (null entries allowed)")
            source_images = [None if s is None else decode_image(s, f"source_images[{i}]", self.max_image_pixels)
                             for i, s in enumerate(sources)]
        return ScoreJob(tuple(names), torch.stack(tensors), list(prompts), list(metadata),
                        list(texts) if texts is not None else None, source_images, group_ids)

    async def score(self, body: Any) -> dict[str, Any]:
        self.requests["score"] += 1
        job = await asyncio.to_thread(self._parse_score, body)  # decoding PNGs is CPU work: keep the loop free
        # chunks of at most max_batch samples that never split a group (a larger group is a chunk of its own): a
        # group-relative reward must see whole groups
        chunks = [job.chunk(lo, hi) for lo, hi in group_chunks(job.group_ids, len(job), self.max_batch)]
        results: list[JobResult] = await asyncio.gather(*(self.batcher.submit_async(c) for c in chunks))
        scores = {nm: [s for r in results for s in r.scores[nm]] for nm in job.names}
        details: dict[str, Any] = {}
        for nm in job.names:
            merged: dict[str, Any] = {}
            for r in results:
                for k, v in r.details[nm].items():
                    if k in merged and isinstance(merged[k], list) and isinstance(v, list):
                        merged[k] = merged[k] + v
                    elif (k in merged and isinstance(v, (int, float)) and not isinstance(v, bool)
                          and isinstance(merged[k], (int, float)) and k != "batch_size"):
                        merged[k] = merged[k] + v  # counters (failed_samples, requests, ...) of every chunk
                    elif k not in merged:
                        merged[k] = v
            details[nm] = merged
        return {"scores": to_jsonable(scores), "details": to_jsonable(details), "num_samples": len(job)}

    # -- chat completions ---------------------------------------------------------------------
    async def chat_completion(self, d: Any) -> dict[str, Any]:
        if self.chat is None:
            raise APIError(404, "this reward server has no chat model; add server.chat: {tiny: true} or "
                                "{model: <path or hub id>} to its config", code="model_not_found")
        if not isinstance(d, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.requests["chat"] += 1
        model = d.get("model") or self.chat.served_name
        if model != self.chat.served_name:
            raise APIError(404, f"model '{model}' is not served here; this server serves '{self.chat.served_name}'",
                           code="model_not_found")
        if d.get("stream"):
            raise APIError(400, "stream=true is not supported by this server; send stream=false")
        if d.get("n") not in (None, 1):
            raise APIError(400, "n > 1 is not supported by this server; send n=1 (or several requests)")
        if d.get("stop"):
            raise APIError(400, "stop sequences are not supported by this server; leave 'stop' unset")
        # what would change the answer and is not implemented here is refused, never silently ignored (a judge relying
        # on logit_bias would get unbiased answers); neutral values (0 penalties, 1.0 repetition_penalty) pass
        # (top_k 1 is greedy, handled below; a text response_format, no tools and tool_choice none/auto change nothing)
        neutral = {"frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1,), "top_k": (-1, 0, 1),
                   "min_p": (0,), "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none", "auto"),
                   "ignore_eos": (False,), "min_tokens": (0,), "stop_token_ids": ([],), "bad_words": ([],),
                   "chat_template_kwargs": ({},)}
        for key in ("logit_bias", "functions", "function_call", "guided_json", "guided_regex", "guided_choice",
                    "guided_grammar", "structured_outputs", *neutral):
            v = d.get(key)
            if v is not None and v != {} and v not in neutral.get(key, ()):
                raise APIError(400, f"'{key}' is not supported by this server; leave it unset")

        def integer(key: str, v: Any, lo: int, hi: int) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:  # (1.5 was truncated, 2**70 a bare
                raise APIError(400, f"{key}={v!r} must be an integer in [{lo}, {hi}]")  # overflow message)
            return v

        def number(key: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise APIError(400, f"{key}={v!r} must be a number")
            return float(v)

        # (max_completion_tokens, OpenAI's newer name, wins unless it is null: null fields are what many clients send)
        mt, mt_key = d.get("max_completion_tokens"), "max_completion_tokens"
        if mt is None:
            mt, mt_key = d.get("max_tokens"), "max_tokens"
        max_tokens = 64 if mt is None else integer(mt_key, mt, 1, MAX_CHAT_TOKENS)
        temperature = d.get("temperature")
        temperature = 1.0 if temperature is None else number("temperature", temperature)  # OpenAI's default
        if d.get("top_k") == 1:  # (vLLM's greedy, as judges' extra_body sends it)
            temperature = 0.0
        top_p = d.get("top_p")
        top_p = 1.0 if top_p is None else number("top_p", top_p)
        seed = d.get("seed")
        seed = None if seed is None else integer("seed", seed, -(2**63), 2**63 - 1)
        k = d.get("top_logprobs")
        k_int = 0 if k is None else integer("top_logprobs", k, 0, MAX_TOP_LOGPROBS)
        if d.get("logprobs") not in (None, True, False):  # (the string "false" counted as true)
            raise APIError(400, f"logprobs={d.get('logprobs')!r} must be true or false")
        want_lp = bool(d.get("logprobs"))
        if k is not None and not want_lp:
            raise APIError(400, "top_logprobs needs logprobs=true")
        k = k_int
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs={k} must be in [0, {MAX_TOP_LOGPROBS}]")
        try:
            gen = await self.chat.complete(d.get("messages"), max_tokens=max_tokens, temperature=temperature,
                                           top_p=top_p, top_logprobs=k, seed=seed)
        except ImageTooLargeError as e:
            raise APIError(413, str(e)) from None
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None
        except (RuntimeError, MemoryError) as e:  # (out of memory, a kernel error: OpenAI's error body, not a bare 500)
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error") from None
        logprobs = None
        if want_lp:
            logprobs = {"content": [
                {"token": t.token, "logprob": t.logprob, "bytes": t.bytes or list(t.token.encode()),
                 "top_logprobs": [{"token": s, "logprob": lp, "bytes": b or list(s.encode())}
                                  for (s, lp), b in zip(t.top, t.top_bytes or [[]] * len(t.top))]}
                for t in gen.tokens
            ], "refusal": None}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": gen.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "logprobs": logprobs, "finish_reason": gen.finish_reason}],
            "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.tokens),
                      "total_tokens": gen.prompt_tokens + len(gen.tokens)},
        }

    def models(self) -> dict[str, Any]:
        data = []
        if self.chat is not None:
            data.append({"id": self.chat.served_name, "object": "model", "created": int(self.started), "owned_by": "imagerl"})
        return {"object": "list", "data": data}

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "rewards": list(self.rewards),
            "chat_model": self.chat.served_name if self.chat is not None else None,
            "queue_depth": self.batcher.depth,
            "chat_queue_depth": self.chat.queue_depth if self.chat is not None else 0,
            "requests": dict(self.requests),
            "batches": self.batcher.num_batches,
            "samples": self.batcher.num_items,
            "max_batch": self.max_batch,
            "auth": self.api_key is not None,
            "uptime_s": time.time() - self.started,
        }

    # -- HTTP ---------------------------------------------------------------------------------
    def _auth(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        where = f"the value of env var {self.api_key_env} on the server" if self.api_key_env else "the server's key"
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(401, f"missing API key: send the header 'Authorization: Bearer <key>' where <key> is {where} "
                                f"(clients: set api_key_env to the name of an env var holding it)", "authentication_error",
                           "invalid_api_key")
        if not secrets.compare_digest(authorization[7:].strip().encode(), self.api_key.encode()):
            raise APIError(401, f"wrong API key: the Bearer key must equal {where}", "authentication_error", "invalid_api_key")

    def _build_app(self) -> Any:
        app = FastAPI(title="imagerl reward server", docs_url=None, redoc_url=None, openapi_url=None)
        server = self

        @app.exception_handler(APIError)
        async def _api_error(_req: Request, e: APIError) -> JSONResponse:
            return JSONResponse({"error": {"message": e.message, "type": e.etype, "code": e.code}}, status_code=e.status)

        async def read_json(request: Request) -> Any:
            server._auth(request.headers.get("authorization"))
            body = await request.body()
            try:
                return json.loads(body)
            except ValueError as e:
                raise APIError(400, f"the request body is not valid JSON: {e}") from None

        @app.post("/v1/score")
        async def score(request: Request) -> JSONResponse:
            return await while_connected(request, server.score(await read_json(request)))

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            return await while_connected(request, server.chat_completion(await read_json(request)))

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            server._auth(request.headers.get("authorization"))
            return JSONResponse(server.models())

        @app.get("/health")
        async def health() -> JSONResponse:
            return JSONResponse(server.health())

        return BodyLimit(app, self.max_request_bytes)

    def close(self) -> None:
        self.batcher.close()
        if self.chat is not None:
            self.chat.close()
        for r in self.rewards.values():
            r.close()


async def while_connected(request: Request, work: Any) -> JSONResponse:
    """Run `work` (a coroutine -> a JSON-able dict) unless the client hangs up first: then cancel it, which takes its
    items out of the batcher's queue if they have not started. A client that timed out and retried would otherwise
    leave the abandoned attempt queued, so an overloaded server scored every request (retries + 1) times."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        log.info("client disconnected from %s before its answer: its queued work is dropped", request.url.path)
        return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled", "code": None}},
                            status_code=499)
    return JSONResponse(task.result())


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, checked on Content-Length and while streaming
    (chunked uploads have no length), before the app buffers or parses anything."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self, n: int | str) -> bytes:
        msg = (f"request body is {n} bytes, over the server's limit of {self.limit} (server.max_request_bytes); "
               f"send fewer or smaller images per request (RemoteReward batch_size) or raise server.max_request_bytes")
        return json.dumps({"error": {"message": msg, "type": "invalid_request_error", "code": "request_too_large"}}).encode()

    async def _reject(self, send: Any, n: int | str) -> None:
        body = self._too_large(n)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = 0
                if n > self.limit:
                    return await self._reject(send, n)
        # stream the body in, counting, so a chunked upload cannot exceed the limit either
        chunks, total, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                return await self._reject(send, f"more than {self.limit}")
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# --------------------------------------------------------------------------------------------------
# Building and running
# --------------------------------------------------------------------------------------------------


def build_server(cfg: Any) -> RewardServer:
    """A `RewardServer` from a full `Config` (its `rewards:` list and `server:` section)."""
    from ..config import ConfigError
    from .base import RewardSet
    from .http_client import read_api_key

    sc = cfg.server
    if not 0 <= sc.port < 65536:
        raise ConfigError(f"server.port={sc.port} must be in [0, 65535]")
    if sc.max_batch < 1:
        raise ConfigError(f"server.max_batch={sc.max_batch} must be >= 1")
    if sc.max_wait_ms < 0:
        raise ConfigError(f"server.max_wait_ms={sc.max_wait_ms} must be >= 0")
    try:
        api_key = read_api_key(sc.api_key_env, "server.api_key_env")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    rs = RewardSet(list(cfg.rewards))
    chat = None
    if sc.chat:
        from .base import check_kwargs

        check_kwargs(LocalVLMBackend, dict(sc.chat), "server.chat")
        chat = LocalVLMBackend(**dict(sc.chat))
    return RewardServer(dict(zip(rs.names, rs.rewards)), api_key=api_key, api_key_env=sc.api_key_env,
                        max_batch=sc.max_batch, max_wait_ms=sc.max_wait_ms, max_request_bytes=sc.max_request_bytes,
                        max_image_pixels=sc.max_image_pixels, chat_backend=chat)


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket (port 0 = a free one, known before the server starts: no race)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """Run an ASGI app with uvicorn in a daemon thread (tests, benchmarks, in-process demos).

    ``with ServerThread(app) as url: ...`` -> url like http://127.0.0.1:PORT (127.0.0.1 by default)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url} within {timeout}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> str:
        self.start()
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.stop()
