"""An in-process transformers VLM judge (Qwen2.5-VL) that answers OpenAI-style chat messages.

`LocalVLMBackend` implements the `JudgeBackend` protocol without a server: messages with base64
``image_url`` parts are rendered into the Qwen chat format, images are patchified by
`Qwen2VLImageProcessorPil` (the PIL processor: the `Qwen2_5_VLProcessor` class needs torchvision,
which this project does not install), and each ``<|image_pad|>`` is expanded by hand to the number
of merged patches of its image. The same backend serves our reward server's OpenAI-compatible
``/v1/chat/completions``.

Concurrent `chat()` calls are coalesced by a `DynamicBatcher` into one left-padded ``generate`` call
(up to ``max_batch`` requests, waiting at most ``max_wait_ms`` for the batch to fill), which is what
makes a judge serving many rollouts cheap.

Log-probs are computed from the raw model logits (before temperature / top-p), like vLLM's default
``raw_logprobs`` mode: a judge reading P("yes") wants the model's distribution, not the sampler's.

`tiny=True` builds a random-weight `Qwen2_5_VLForConditionalGeneration` (2 layers, hidden 64) with
an offline byte-level BPE tokenizer, so tests and demos run on CPU with no model hub. Its answers are
random text; tests check the plumbing (shapes, batching equals single requests, log-prob format).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, TypeVar

from .judges.backend import ChatResult, JudgeError, data_uri_to_image, position_logprobs

log = logging.getLogger(__name__)

QWEN_SPECIALS = (
    "<pad>", "<bos>", "<eos>", "<unk>",
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
IMAGE_PAD = "<|image_pad|>"
TINY_MODEL_NAME = "tiny-qwen2.5-vl"
DEFAULT_SYSTEM = "You are a helpful assistant."  # what Qwen2.5-VL's own chat template inserts

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------------------------------
# Dynamic batching (shared with the reward server)
# --------------------------------------------------------------------------------------------------


class _Stop:
    pass


class DynamicBatcher(Generic[T, R]):
    """Coalesce items submitted from any thread or event loop into batched calls of `fn`.

    A single worker thread takes the first waiting item, then keeps collecting items with the same
    `key` until their total `size` reaches `max_batch` or `max_wait_ms` has passed since the first
    one, and calls ``fn(items) -> results`` (one result per item; an Exception instance as a result
    fails only that item). The worker owns the model, so `fn` never runs concurrently with itself.
    Callers get `concurrent.futures.Future`s, which async code awaits with `asyncio.wrap_future`, so
    the batcher is independent of whichever event loop (or none) the callers run.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[Any]],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        key: Callable[[T], Hashable] | None = None,
        size: Callable[[T], int] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"{name}: max_batch={max_batch} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"{name}: max_wait_ms={max_wait_ms} must be >= 0")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.key = key or (lambda _item: None)
        self.size = size or (lambda _item: 1)
        self.name = name
        self._q: queue.Queue[Any] = queue.Queue()
        self._pending: deque[tuple[T, concurrent.futures.Future]] = deque()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._running = 0  # items in the batch being computed
        self.num_batches = 0
        self.num_items = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes (in `size` units)

    @property
    def depth(self) -> int:
        """Items waiting or being computed."""
        return self._q.qsize() + len(self._pending) + self._running

    def submit(self, item: T) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=f"imagerl-{self.name}", daemon=True)
                self._thread.start()
            self._q.put((item, fut))
        return fut

    async def submit_async(self, item: T) -> Any:
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._q.put(_Stop())
        if thread is not None:
            thread.join(timeout)
        # anything still queued will never run: fail it instead of leaving callers waiting forever
        leftovers = list(self._pending)
        while True:
            try:
                leftovers.append(self._q.get_nowait())
            except queue.Empty:
                break
        if thread is not None and thread.is_alive():
            self._q.put(_Stop())  # (the drain took our stop marker: a worker still in a long batch must find one)
        for entry in leftovers:
            if isinstance(entry, tuple) and not entry[1].done():
                entry[1].set_exception(RuntimeError(f"{self.name} was closed before this request ran"))

    # -- worker -------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Any:
        if self._pending:
            return self._pending.popleft()
        if timeout is None:
            return self._q.get()
        if timeout <= 0:
            return self._q.get_nowait()
        return self._q.get(timeout=timeout)

    def _worker(self) -> None:
        stop = False
        while not stop:
            first = self._next(None)
            if isinstance(first, _Stop):
                break
            batch = [first]
            k = self.key(first[0])
            total = self.size(first[0])
            deadline = time.monotonic() + self.max_wait_s
            while total < self.max_batch:
                try:
                    entry = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if isinstance(entry, _Stop):
                    stop = True
                    break
                n = self.size(entry[0])
                if self.key(entry[0]) != k or total + n > self.max_batch:
                    # keep arrival order: it starts the next batch
                    self._pending.appendleft(entry)
                    break
                batch.append(entry)
                total += n
            self._run(batch, total)

    def _run(self, batch: list[tuple[T, concurrent.futures.Future]], total: int) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        self._running = len(live)
        try:
            results = self.fn([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"{self.name}: batch function returned {len(results)} results for {len(live)} items")
        except BaseException as e:  # noqa: BLE001 - every caller must hear about it
            log.exception("%s: batch of %d failed", self.name, len(live))
            results = [e] * len(live)
        # counters first, so a caller woken by its result already sees them
        self._running = 0
        self.num_batches += 1
        self.num_items += len(live)
        self.batch_sizes.append(total)
        for (_, fut), res in zip(live, results):
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    """One generated position: the chosen token and the top-k alternatives (raw model log-probs)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # best first, len = requested top_logprobs
    # the UTF-8 bytes of the token and of each alternative (OpenAI's `bytes`): a token that is part of a character
    # decodes to U+FFFD as text, but its bytes, concatenated with its neighbours', rebuild the character
    bytes: list[int] = field(default_factory=list)
    top_bytes: list[list[int]] = field(default_factory=list)


@dataclass
class Generation:
    """A completion with everything the OpenAI response format needs."""

    text: str
    tokens: list[TokenLogprob]  # [T_gen], EOS excluded
    finish_reason: str  # "stop" (EOS) | "length" (max_tokens)
    prompt_tokens: int
    model: str

    def to_chat_result(self, with_logprobs: bool) -> ChatResult:
        top = [position_logprobs(t.token, t.logprob, t.top) for t in self.tokens] if with_logprobs else None
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                 "total_tokens": self.prompt_tokens + len(self.tokens), "finish_reason": self.finish_reason}
        return ChatResult(text=self.text, top_logprobs=top, usage=usage)


class _RowSampler:
    """A transformers logits processor that samples each row from softmax(logits / temperature) restricted to the
    top-p nucleus (`filter_logits`: the tokens whose mass before them, in descending order, is < top_p, as
    TopPLogitsWarper keeps), with that row's own generator, and returns logits that are -inf except at the drawn
    token."""

    def __init__(self, generators: list[Any], temperature: float, top_p: float) -> None:
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        from ..policies.ar.sampling import filter_logits  # (the Janus sampler's nucleus: the same rule, one place)

        probs = filter_logits(scores.float() / self.temperature, top_p=self.top_p).softmax(-1)
        picks = torch.stack([torch.multinomial(probs[n], 1, generator=g) for n, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter(1, picks, 0.0)


@dataclass
class _GenRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    top_p: float
    top_logprobs: int
    seed: int | None


# --------------------------------------------------------------------------------------------------
# Message rendering
# --------------------------------------------------------------------------------------------------


def split_messages(messages: list[dict[str, Any]], max_image_pixels: int = 0) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI chat messages -> (messages with ``{"type": "image"}`` parts, decoded PIL images in order).

    Raises ValueError naming the message and part for anything we cannot read."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role='{role}' is not supported; use system, user or assistant")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, p in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            ptype = p.get("type") if isinstance(p, dict) else None
            if ptype == "text":
                text = p.get("text")
                if not isinstance(text, str):  # (null became the text "None")
                    raise ValueError(f"{where}.text must be a string, got {type(text).__name__}")
                parts.append({"type": "text", "text": text})
            elif ptype == "image_url":
                iu = p.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str):
                    raise ValueError(f"{where}.image_url.url is missing")
                if not url.startswith("data:"):
                    raise ValueError(f"{where}: only base64 'data:image/...;base64,' URLs are accepted (this judge does no network I/O)")
                try:
                    img = data_uri_to_image(url, max_image_pixels)
                except ValueError as e:  # (ImageTooLargeError keeps its type: the server answers 413)
                    raise type(e)(f"{where}: {e}") from None
                images.append(img)
                parts.append({"type": "image"})
            else:
                raise ValueError(f"{where}.type='{ptype}' is not supported; use 'text' or 'image_url'")
        out.append({"role": role, "content": parts})
    return out, images


def render_qwen_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The Qwen2-VL chat format, written out by hand for tokenizers without a chat template.

    Same text as the official template: a default system turn when none is given, each image as
    ``<|vision_start|><|image_pad|><|vision_end|>`` (expanded to the patch count later)."""
    chunks = []
    if not messages or messages[0]["role"] != "system":
        chunks.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for m in messages:
        body = "".join(
            "<|vision_start|><|image_pad|><|vision_end|>" if p["type"] == "image" else p["text"] for p in m["content"]
        )
        chunks.append(f"<|im_start|>{m['role']}\n{body}<|im_end|>\n")
    if add_generation_prompt:
        chunks.append("<|im_start|>assistant\n")
    return "".join(chunks)


def expand_image_pads(text: str, pads_per_image: list[int]) -> str:
    """Replace the k-th ``<|image_pad|>`` by ``pads_per_image[k]`` copies (one per merged patch)."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(pads_per_image):
        raise ValueError(f"prompt has {len(pieces) - 1} image placeholders but {len(pads_per_image)} images")
    out = [pieces[0]]
    for n, rest in zip(pads_per_image, pieces[1:]):
        out.append(IMAGE_PAD * n)
        out.append(rest)
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------------


def build_tiny_qwen_vl(seed: int = 0, overrides: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): a random-weight `Qwen2_5_VLForConditionalGeneration` and an offline tokenizer."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..tiny import build_tokenizer

    tok = build_tokenizer(512, QWEN_SPECIALS)
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
        # mrope sections sum to head_dim / 2 = 64 / 4 / 2
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        bos_token_id=ids["<bos>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"],
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    for k, v in (overrides or {}).items():
        (vision if k.startswith("vision_") else text)[k.removeprefix("vision_")] = v
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids[IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    cpu_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # reproducible weights without disturbing the caller's RNG stream
    try:
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.random.set_rng_state(cpu_state)
    return model.eval(), tok


# --------------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------------


class LocalVLMBackend:
    """`JudgeBackend` running a Qwen2.5-VL in this process, with dynamic batching of concurrent calls.

    Args:
      model: local directory or hub id of a Qwen2.5-VL checkpoint (ignored with tiny=True).
      tiny: build a tiny random-weight model offline (tests, demos).
      served_name: the model id reported by /v1/models (default: `model`, or "tiny-qwen2.5-vl").
      device, dtype: where and in which precision the model runs ("cpu" | "cuda" | "auto"; fp32 | bf16 | fp16).
      max_batch, max_wait_ms: dynamic batching of concurrent requests into one generate.
      min_pixels, max_pixels: image resize bounds of the Qwen image processor (0 = the processor's own).
      max_image_pixels: reject input images larger than this (0 = no limit).
      seed: weight seed of the tiny model; sampled decoding seeds from the request's `seed`.
    """

    def __init__(
        self,
        model: str = "",
        tiny: bool = False,
        tiny_overrides: dict[str, Any] | None = None,
        served_name: str = "",
        device: str = "cpu",
        dtype: str = "fp32",
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        min_pixels: int = 0,
        max_pixels: int = 0,
        max_image_pixels: int = 0,
        seed: int = 0,
        revision: str = "",
        trust_remote_code: bool = False,
    ) -> None:
        if not tiny and not model:
            raise ValueError(
                "backend.model is empty: give a local Qwen2.5-VL directory or hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct), "
                "or set tiny: true for a tiny random-weight judge"
            )
        from ..devices import resolve_device, resolve_dtype

        torch_dtype = resolve_dtype(dtype, field="backend.dtype")
        self.device = resolve_device(device, field="backend.device")
        self.max_image_pixels = int(max_image_pixels)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if tiny:
            self.model, self.tokenizer = build_tiny_qwen_vl(seed, tiny_overrides)
            # small images -> few patches keeps the tiny judge fast on CPU
            self.image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels or 56 * 56, max_pixels=max_pixels or 112 * 112)
            self.served_name = served_name or TINY_MODEL_NAME
        else:
            from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

            from ..policies.base import hub_kwargs

            kw = hub_kwargs(revision, trust_remote_code)
            self.tokenizer = AutoTokenizer.from_pretrained(model, **kw)
            ip_kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
            self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model, **ip_kw, **kw)
            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=torch_dtype, **kw).eval()
            self.served_name = served_name or model
        self.model.to(self.device)
        if tiny and dtype != "fp32":
            self.model.to(torch_dtype)
        self.merge = int(getattr(self.model.config.vision_config, "spatial_merge_size", 2)) ** 2
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        eos = {tok.convert_tokens_to_ids("<|im_end|>")}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        self.eos_ids = sorted(i for i in eos if i is not None and i >= 0)
        # The checkpoint's generation_config goes (its special-token ids were read above): Qwen2.5-VL-Instruct ships
        # repetition_penalty 1.05, top_k / top_p and temperature, and generate() fills every setting a request
        # leaves at its default from it, so "greedy" answers were not the argmax the log-probs report
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, list[int]] = {}
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # (GPT-2 byte alphabet, which Qwen uses)

        self._byte_decoder = {ch: b for b, ch in bytes_to_unicode().items()}
        # unseeded sampled batches: seeds from a random start, so that two processes (or restarts) do not repeat
        # each other's draws or those of requests that asked for seed 0, 1, ...
        self._seed_counter = itertools.count(int.from_bytes(os.urandom(4), "little"))
        self._batcher: DynamicBatcher[_GenRequest, Generation] = DynamicBatcher(
            self._run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms,
            # (a seeded sampled request draws from its own generator: it may share a batch, see _RowSampler)
            key=lambda r: (r.temperature > 0, r.temperature, r.top_p),
            name="vlm-judge",
        )

    # -- public API ---------------------------------------------------------------------------
    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_logprobs: int | None = None,
    ) -> ChatResult:
        try:
            gen = await self.complete(messages, max_tokens=max_tokens, temperature=temperature, top_logprobs=top_logprobs or 0)
        except ValueError as e:
            raise JudgeError(f"in-process judge cannot read the request: {e}") from e
        except (RuntimeError, MemoryError) as e:  # (e.g. out of GPU memory: the sample abstains, as a failed HTTP
            raise JudgeError(f"in-process judge failed: {type(e).__name__}: {e}") from e  # request's would)
        return gen.to_chat_result(with_logprobs=top_logprobs is not None)

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_logprobs: int = 0,
        seed: int | None = None,
    ) -> Generation:
        """One completion with per-token log-probs; ValueError (ImageTooLargeError) for bad input."""
        return await self._batcher.submit_async(self._request(messages, max_tokens, temperature, top_p, top_logprobs, seed))

    def complete_sync(self, messages: list[dict[str, Any]], **kw: Any) -> Generation:
        r = self._request(messages, kw.get("max_tokens", 64), kw.get("temperature", 0.0), kw.get("top_p", 1.0),
                          kw.get("top_logprobs", 0), kw.get("seed"))
        return self._batcher.submit(r).result()

    async def check(self) -> list[str]:
        """Parity with the HTTP backend: the in-process model is always up."""
        return [self.served_name]

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth

    def close(self) -> None:
        self._batcher.close()

    # -- internals ----------------------------------------------------------------------------
    def _request(self, messages: Any, max_tokens: int, temperature: float, top_p: float, top_logprobs: int, seed: int | None) -> _GenRequest:
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        if not float(temperature) >= 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        if float(temperature) < 1e-5:  # (as vLLM: 1e-45 overflowed the softmax into NaN probabilities)
            temperature = 0.0
        if not 0 < float(top_p) <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if not 0 <= int(top_logprobs) <= 20:
            raise ValueError(f"top_logprobs={top_logprobs} must be in [0, 20]")
        return _GenRequest(messages, int(max_tokens), float(temperature), float(top_p), int(top_logprobs), seed)

    def _tok_bytes(self, i: int) -> list[int]:
        """The raw bytes of token i: the byte-level BPE symbols mapped back through GPT-2's byte alphabet (Qwen's
        tokenizer), or the decoded text's UTF-8 for tokens outside it (special tokens)."""
        b = self._token_bytes.get(i)
        if b is None:
            sym = self.tokenizer.convert_ids_to_tokens(i)
            dec = self._byte_decoder
            b = [dec[c] for c in sym] if isinstance(sym, str) and sym and all(c in dec for c in sym) \
                else list(self._tok_text(i).encode())
            self._token_bytes[i] = b
        return b

    def _tok_text(self, i: int) -> str:
        s = self._token_text.get(i)
        if s is None:
            s = self.tokenizer.decode([i])
            self._token_text[i] = s
        return s

    def _prompt(self, messages: list[dict[str, Any]]) -> str:
        tmpl = getattr(self.tokenizer, "chat_template", None)
        if tmpl:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_qwen_chat(messages)

    def _run_batch(self, reqs: list[_GenRequest]) -> list[Generation | BaseException]:
        import torch

        results: list[Generation | BaseException | None] = [None] * len(reqs)
        texts, images, idx = [], [], []
        for i, r in enumerate(reqs):
            try:
                msgs, imgs = split_messages(r.messages, self.max_image_pixels)
                text = self._prompt(msgs)
                pads: list[int] = []
                if imgs:
                    grid = self.image_processor(images=imgs, return_tensors="pt")["image_grid_thw"]
                    pads = [int(g.prod()) // self.merge for g in grid]
                # also without images: a text that carries image placeholders fails here, alone, instead of
                # failing the whole coalesced batch in the model's image-feature check
                text = expand_image_pads(text, pads)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone, not its batch
                results[i] = e if isinstance(e, ValueError) else ValueError(str(e))
                continue
            texts.append(text)
            images.extend(imgs)
            idx.append(i)
        if not idx:
            return results  # type: ignore[return-value]
        live = [reqs[i] for i in idx]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        inputs: dict[str, Any] = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if images:
            im = self.image_processor(images=images, return_tensors="pt")
            inputs["pixel_values"] = im["pixel_values"].to(self.device, self.model.dtype)
            inputs["image_grid_thw"] = im["image_grid_thw"].to(self.device)
        first = live[0]
        from transformers import GenerationConfig, LogitsProcessorList

        # (the model's own generation_config was replaced by a clean one at load: see __init__)
        gcfg = GenerationConfig(max_new_tokens=max(r.max_tokens for r in live), do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        procs = LogitsProcessorList()
        if first.temperature > 0:
            # Sampled rows draw with their own torch.Generator (the request's seed, else the next of a random
            # counter) inside a logits processor that leaves only the drawn token, which greedy decoding then takes:
            # no global RNG is touched (torch.manual_seed is process-wide, not thread-safe, and on a GPU reseeds every
            # CUDA generator the trainer uses), and a seeded row draws the same whatever it was batched with.
            gens = [torch.Generator(device=self.device).manual_seed(int(r.seed if r.seed is not None else next(self._seed_counter)))
                    for r in live]
            procs.append(_RowSampler(gens, first.temperature, first.top_p))
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=gcfg, logits_processor=procs)
        prompt_len = inputs["input_ids"].shape[1]
        gen_ids_NT = out.sequences[:, prompt_len:].cpu()
        k_max = max(r.top_logprobs for r in live)
        logp_TNV = torch.stack([lg.float() for lg in out.logits], 0).log_softmax(-1).cpu()  # raw logits, no temperature
        chosen_TN = logp_TNV.gather(2, gen_ids_NT.T.unsqueeze(-1)).squeeze(-1)
        top_val_TNK, top_id_TNK = logp_TNV.topk(k_max, dim=-1) if k_max else (None, None)
        prompt_lens = enc["attention_mask"].sum(1).tolist()
        eos = set(self.eos_ids)
        for n, (i, r) in enumerate(zip(idx, live)):
            ids = gen_ids_NT[n].tolist()
            toks: list[TokenLogprob] = []
            finish = "length"
            for t, tid in enumerate(ids[: r.max_tokens]):
                if tid in eos:
                    finish = "stop"
                    break
                top, top_b = [], []
                if r.top_logprobs:
                    ids_k = top_id_TNK[t, n, : r.top_logprobs].tolist()
                    # (-inf / NaN cannot be sent as JSON: the same floor as the chosen token's)
                    top = [(self._tok_text(int(j)), float(v) if math.isfinite(v) else -9999.0)
                           for j, v in zip(ids_k, top_val_TNK[t, n, : r.top_logprobs].tolist())]
                    top_b = [self._tok_bytes(int(j)) for j in ids_k]
                lp = float(chosen_TN[t, n])
                toks.append(TokenLogprob(self._tok_text(tid), lp if math.isfinite(lp) else -9999.0, top,
                                         self._tok_bytes(tid), top_b))
            text = self.tokenizer.decode([int(t) for t in ids[: len(toks)]], skip_special_tokens=True)
            results[i] = Generation(text, toks, finish, int(prompt_lens[n]), self.served_name)
        return results  # type: ignore[return-value]
