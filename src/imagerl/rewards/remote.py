"""`remote`: a training-side reward that asks our reward server (`imagerl serve-reward`) for scores.

The batch is encoded as base64 PNG, split into chunks of at most `batch_size` samples that never cut a group
(group-relative rewards on the server, such as pairwise win rates, need whole groups; a group larger than
`batch_size` goes in one request of its own), posted concurrently to
``/v1/score`` (spread over one or several server URLs, with the retries and fail-over of
`http_client.HTTPPool`), and the scores come back per sample. `is_remote` is True and `score_async`
is native, so the training loop can overlap scoring with the next rollout.

Failure policy: a chunk whose request fails for good (retries exhausted, or rejected) makes exactly
its samples abstain (NaN); ``details`` counts ``failed_samples`` and ``failed_requests`` and keeps the
last error. Never a neutral value. The one exception is start-up: if no server answers the first
health check, scoring raises with the command that starts one, because that is a setup error that
would otherwise silently turn the whole run into abstains.

Several reward names in one request share the image upload; their scores are combined into this
reward's single column as a weighted sum with the same abstain handling as `ScoreTable`: a name that
abstains on a sample counts as its group's mean there (`combined_reward`). Each component's
per-sample scores are also reported in ``details`` (``<name>``) for logging.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import httpx
import torch

from ..algorithms.advantages import combined_reward
from ..imageio import to_rgb
from ..types import RewardInput, RewardOutput
from .base import RewardError, Reward, group_chunks, run_sync
from .http_client import BackgroundLoop, HTTPPool, PoolStats, RequestRejectedError, normalize_base_urls, read_api_key
from .judges.backend import JudgeError

log = logging.getLogger(__name__)



class RewardServerDownError(RewardError):
    """No reward server answered the start-up health check."""


class RemoteReward(Reward):
    """Scores from a reward server's POST /v1/score.

    Args:
      url: base URL of the server (http://127.0.0.1:8100) or a list of replicas.
      rewards: names served there to request ([] = every reward the server serves).
      weights: {name: weight} to combine several names into this reward's score (default 1 each).
      api_key_env: NAME of the env var holding the server's key ("" = no auth).
      timeout: seconds per request attempt; retries: retries per chunk on transient failures.
      max_concurrency: chunks in flight at once; batch_size: samples per request (whole groups; one larger group
        is sent alone).
      health_check: check /health (and that the names are served) before the first batch.
    """

    is_remote = True

    def __init__(
        self,
        name: str = "",
        url: str | list[str] = "http://127.0.0.1:8100",
        rewards: list[str] | None = None,
        weights: dict[str, float] | None = None,
        api_key_env: str = "",
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        max_concurrency: int = 4,
        batch_size: int = 32,
        health_check: bool = True,
    ) -> None:
        super().__init__(name)
        if batch_size < 1:
            raise ValueError(f"remote reward '{self.name}': batch_size={batch_size} must be >= 1")
        self.urls = normalize_base_urls(url, f"remote reward '{self.name}' args.url")
        self.reward_names = list(rewards or [])
        self.weights = dict(weights or {})
        for k, w in self.weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"remote reward '{self.name}': args.weights.{k}={w!r} must be a finite number")
        unknown_w = set(self.weights) - set(self.reward_names)
        if self.reward_names and unknown_w:
            raise ValueError(f"remote reward '{self.name}': weights name {sorted(unknown_w)} which are not in rewards {self.reward_names}")
        self.batch_size = int(batch_size)
        self.health_check = health_check
        self.pool = HTTPPool(
            self.urls, api_key=read_api_key(api_key_env, f"rewards[{self.name}].args.api_key_env"), timeout=timeout,
            connect_timeout=connect_timeout, max_retries=retries, backoff=backoff, backoff_max=backoff_max,
            max_concurrency=max_concurrency, what="reward server", key_field=f"rewards[{self.name}].args.api_key_env",
        )
        self._io = BackgroundLoop(f"imagerl-remote-{self.name}")
        self._checked = False
        self.server_info: dict[str, Any] = {}

    # -- health -------------------------------------------------------------------------------
    async def check(self) -> dict[str, Any]:
        """GET /health on each URL; raise `RewardServerDownError` (how to start one) if none answers, or
        ValueError if a requested reward name is not served. Returns the first healthy server's info."""
        return await self._io.run(self._check())

    async def _check(self) -> dict[str, Any]:
        problems, info = [], None
        for u in self.urls:
            try:
                status, body = await self.pool.get_json(f"{u}/health")
            except httpx.HTTPError as e:
                problems.append(f"{u}: {type(e).__name__}")
                self.pool.mark_down(u)
                continue
            if status != 200 or not isinstance(body, dict) or "rewards" not in body:
                problems.append(f"{u}: GET /health answered HTTP {status}")
                continue
            info = info or body
            served = list(body["rewards"])
            missing = [n for n in self.reward_names if n not in served]
            if missing:
                raise ValueError(f"remote reward '{self.name}': the server at {u} does not serve {missing}; it serves {served}. "
                                 f"Fix args.rewards or add them to the server's config")
        if info is not None:
            for p in problems:  # (the pool lets those URLs sit out a cooldown)
                log.warning("remote reward '%s': %s (continuing with the servers that answered)", self.name, p)
        if info is None:
            raise RewardServerDownError(
                f"reward server at {', '.join(self.urls)} is down ({'; '.join(problems)}): start it with "
                f"`imagerl serve-reward CONFIG` (or fix args.url of reward '{self.name}')"
            )
        if not self.reward_names:
            self.reward_names = list(info["rewards"])
        self.server_info = info
        self._checked = True
        return info

    # -- scoring ------------------------------------------------------------------------------
    def score(self, inp: RewardInput) -> RewardOutput:
        return run_sync(self.score_async(inp))

    async def score_async(self, inp: RewardInput) -> RewardOutput:
        n = len(inp)
        if n == 0:
            return RewardOutput(torch.zeros(0))
        # PNG encoding is CPU work: do it off the caller's loop so other tasks (the next rollout) proceed
        payloads = await asyncio.to_thread(self._encode, inp)
        return await self._io.run(self._score(payloads, n, inp.group_ids))

    def _encode(self, inp: RewardInput) -> list[tuple[int, int, dict[str, Any]]]:
        from .server import encode_png

        if inp.images.dim() != 4 or inp.images.shape[0] != len(inp) or inp.images.shape[1] != 3:
            raise ValueError(f"remote reward '{self.name}': images must be [N, 3, H, W] with N={len(inp)}, got {tuple(inp.images.shape)}")
        out = []
        for lo, hi in group_chunks(inp.group_ids, len(inp), self.batch_size):
            body: dict[str, Any] = {
                "images": [encode_png(inp.images[i]) for i in range(lo, hi)],
                "prompts": list(inp.prompts[lo:hi]),
                "metadata": [_json_safe_meta(m) for m in inp.metadata[lo:hi]],
            }
            if self.reward_names:
                body["rewards"] = self.reward_names
            if inp.texts is not None:
                body["texts"] = list(inp.texts[lo:hi])
            if inp.group_ids is not None:
                body["group_ids"] = [int(g) for g in inp.group_ids[lo:hi].tolist()]
            if inp.source_images is not None:
                body["source_images"] = [None if s is None else _encode_any(s) for s in inp.source_images[lo:hi]]
            out.append((lo, hi, body))
        return out

    async def _score(self, payloads: list[tuple[int, int, dict[str, Any]]], n: int,
                     group_ids: torch.Tensor | None = None) -> RewardOutput:
        t0 = time.perf_counter()
        if self.health_check and not self._checked:
            await self._check()
            for _, _, body in payloads:
                body["rewards"] = self.reward_names
        mine = PoolStats()  # this call's retries (other calls in flight share the pool's counters)
        results = await asyncio.gather(
            *(self.pool.post_json("v1/score", body, _parse_score, mine) for _, _, body in payloads), return_exceptions=True
        )
        names = self.reward_names or sorted({k for r in results if isinstance(r, dict) for k in r["scores"]})
        comp = {nm: torch.full((n,), math.nan) for nm in names}
        failed_samples, failed_requests, last_error = 0, 0, ""
        for (lo, hi, _), res in zip(payloads, results):
            if isinstance(res, BaseException):
                if not isinstance(res, (JudgeError, httpx.HTTPError)):
                    raise res  # a bug, not a server failure
                if isinstance(res, RequestRejectedError) and res.status in _SETUP_STATUS:
                    # the same for every request until the setup changes: stop with the fix instead of abstaining on
                    # every sample (with other rewards beside it, this one would silently stop carrying signal)
                    # (a 413 for an image over server.max_image_pixels carries its own fix; the batch size is not it)
                    fix = "" if "max_image_pixels" in str(res) else _SETUP_STATUS[res.status]
                    raise RewardError(f"remote reward '{self.name}': {res}.{fix}") from None
                failed_samples += hi - lo
                failed_requests += 1
                last_error = str(res)
                continue
            bad = [nm for nm in names if not isinstance(res["scores"].get(nm), list) or len(res["scores"][nm]) != hi - lo]
            # each score a finite number or null (abstain): a string, a bool or an "Infinity" (which Python's JSON
            # reader accepts) is a malformed answer, not a score (inf became float32's max in the total)
            odd = [nm for nm in names if nm not in bad and not all(_score_value(v) for v in res["scores"][nm])]
            if bad or odd:  # a malformed answer: the whole chunk abstains rather than half of it
                failed_samples += hi - lo
                failed_requests += 1
                last_error = (f"server answer lacks {hi - lo} scores for {bad}" if bad else
                              f"server answer has scores for {odd} that are not finite numbers or null")
                continue
            details_in = res.get("details") if isinstance(res.get("details"), dict) else {}
            for nm in names:
                comp[nm][lo:hi] = torch.tensor([math.nan if v is None else float(v) for v in res["scores"][nm]])
                # a scorer that raised on the server: its samples abstain there (the server stays up for its other
                # clients), and here they count as failed, with the server's error, like a failed request's
                d = details_in.get(nm)
                if isinstance(d, dict) and d.get("error"):
                    n_failed = d.get("failed_samples")
                    ok = isinstance(n_failed, int) and not isinstance(n_failed, bool) and 0 < n_failed <= hi - lo
                    failed_samples += n_failed if ok else hi - lo
                    failed_requests += 1
                    last_error = f"reward '{nm}' failed on the server: {d['error']}"
        scores = self._combined(names, [comp[nm] for nm in names], group_ids) if names else torch.full((n,), math.nan)
        details: dict[str, Any] = {
            "failed_samples": failed_samples,
            "failed_requests": failed_requests,
            "retries": mine.retries,
            "latency_s": time.perf_counter() - t0,
        }
        if last_error:
            details["last_error"] = last_error
            log.warning("remote reward '%s': %d of %d requests failed; their %d samples abstain. Last error: %s",
                        self.name, failed_requests, len(payloads), failed_samples, last_error[:500])
        if len(names) > 1:
            for nm in names:
                details[nm] = comp[nm]
        return RewardOutput(scores, details)

    def rescore(self, details: dict[str, Any], group_ids: torch.Tensor) -> torch.Tensor | None:
        """Several names: their per-sample scores combined again over the whole batch (see `Reward.rescore`)."""
        names = self.reward_names
        cols = [details.get(nm) for nm in names]
        if len(names) < 2 or not all(isinstance(c, torch.Tensor) and len(c) == len(group_ids) for c in cols):
            return None
        return self._combined(names, cols, group_ids)

    def _combined(self, names: list[str], cols: list[torch.Tensor], group_ids: torch.Tensor | None) -> torch.Tensor:
        """The names' per-sample scores [N] each -> this reward's score [N], combined like the top-level rewards
        (weights args.weights; an abstaining name counts as its group's mean)."""
        table = torch.stack(cols, 1).float()
        w = torch.tensor([float(self.weights.get(nm, 1.0)) for nm in names])
        return combined_reward(table, w.expand_as(table), group_ids)

    def stats(self) -> dict[str, int]:
        return dict(vars(self.pool.stats))

    def close(self) -> None:
        self._io.close(self.pool.aclose)


def _parse_score(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict) or not isinstance(d.get("scores"), dict):
        raise ValueError("response has no 'scores' object")
    return d


def _json_safe_meta(m: Any) -> dict[str, Any]:
    from .server import to_jsonable

    return to_jsonable(dict(m or {}))


_SETUP_STATUS = {  # HTTP statuses no retry or later request can change, with their fix (401/403: the pool's message
    401: "",         # already names rewards[<name>].args.api_key_env)
    403: "",
    404: " Check args.url: it must be the reward server's base URL (http://host:port, no path)",
    413: " Lower args.batch_size (images per request) or raise the server's server.max_request_bytes",
}


def _score_value(v: Any) -> bool:
    """A score entry of a /v1/score answer: null (abstain) or a finite number (NaN also abstains)."""
    # (finite in float32, where the scores live: 1e39 is a finite float but an inf tensor)
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                         and ((isinstance(v, float) and math.isnan(v)) or abs(v) <= _F32_MAX))  # (a 400-digit int:
                                                                                                 # no OverflowError)


_F32_MAX = float(torch.finfo(torch.float32).max)


def _encode_any(img: Any) -> str:
    from .server import encode_png

    if isinstance(img, torch.Tensor):
        return encode_png(img)
    import base64
    import io

    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()
