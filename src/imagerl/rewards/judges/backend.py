"""The contract between VLM judge rewards (prompt templates + parsers) and whatever answers them.

A judge reward builds OpenAI-style chat messages (images as base64 data-URI ``image_url`` parts) and
asks a `JudgeBackend` for a completion. Backends: an OpenAI-compatible HTTP client (vLLM, SGLang, our
own reward server) and an in-process transformers VLM. The same judge code runs against either.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, runtime_checkable

from ...imageio import to_rgb


@dataclass
class ChatResult:
    text: str
    # One dict per generated token position, mapping candidate token text -> log-prob (top-k alternatives,
    # the sampled token included). None when the backend gave no log-probs.
    top_logprobs: list[dict[str, float]] | None = None
    usage: dict[str, Any] = field(default_factory=dict)


def position_logprobs(token: str, logprob: float, alternatives: Iterable[tuple[str, float]]) -> dict[str, float]:
    """One position of `ChatResult.top_logprobs`: the generated token first, then its top-k alternatives.

    Two different tokens can decode to the same text (byte-fallback pieces, duplicate vocabulary entries); as
    keys of one dict they are one candidate whose probability is the sum of theirs (log-sum-exp), not the first
    one seen. The top-k list holds the generated token itself whenever it is among the k likeliest (always
    under greedy decoding), so the generated token's own log-prob is used only when its text is not in the
    list."""
    merged: dict[str, float] = {}
    for s, lp in alternatives:
        lp = float(lp)
        if s in merged:
            hi = max(merged[s], lp)
            lp = hi if hi == -math.inf else hi + math.log1p(math.exp(-abs(merged[s] - lp)))
        merged[s] = lp
    out = {token: merged.pop(token, float(logprob))}
    out.update(merged)
    return out


@runtime_checkable
class JudgeBackend(Protocol):
    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_logprobs: int | None = None,
    ) -> ChatResult:
        """One chat completion. Raises `JudgeError` when no answer could be had (after retries)."""
        ...


class JudgeError(RuntimeError):
    """A judge request failed for good (retries exhausted, bad response): the sample abstains."""


def image_to_data_uri(img: Any, fmt: str = "PNG") -> str:
    """PIL image or [3,H,W] float tensor in [0,1] -> data:image/png;base64,... URI."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        from ...imageio import to_pil

        img = to_pil(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


class ImageTooLargeError(ValueError):
    """An image over the configured pixel limit (the server answers 413)."""


def data_uri_to_image(uri: str, max_pixels: int = 0) -> Any:
    """Inverse of `image_to_data_uri`; raises ValueError naming the problem for corrupt input, and
    ImageTooLargeError for one over `max_pixels` (0 = no limit), judged from its header before any pixel is
    decoded (a 100 KB PNG of 9000x9000 took 280 MiB and most of a second to decode before it was refused)."""
    from PIL import Image, UnidentifiedImageError

    if uri.startswith("data:"):
        _, _, b64 = uri.partition(",")
    else:
        b64 = uri
    try:
        raw = base64.b64decode(b64, validate=True)
    except Exception as e:  # binascii.Error
        raise ValueError(f"image is not valid base64: {e}") from e
    try:
        img = Image.open(io.BytesIO(raw))  # (reads the header only)
        w, h = img.size
        if max_pixels and w * h > max_pixels:
            raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                     f"(server.max_image_pixels); downscale it or raise the limit")
        img.load()
    except Image.DecompressionBombError as e:  # (PIL's own ceiling, for a server without a limit)
        raise ImageTooLargeError(f"image is too large to decode: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image bytes are not a readable image (corrupt or unsupported format): {e}") from e
    return to_rgb(img)


# Backend types selectable from a judge's `backend: {type: ..., ...}` argument.
BACKEND_TYPES = {
    "http": "imagerl.rewards.http_client:OpenAIChatBackend",  # any OpenAI-compatible server (vLLM, SGLang, ours)
    "inprocess": "imagerl.rewards.vlm_local:LocalVLMBackend",  # a transformers VLM in this process
}


def build_backend(spec: dict[str, Any] | JudgeBackend, field_name: str = "backend") -> JudgeBackend:
    """`{type: http|inprocess|package.module:Class, **kwargs}` -> a backend instance (or pass one through)."""
    if not isinstance(spec, dict):
        return spec
    from ...registry import import_object

    spec = dict(spec)
    btype = spec.pop("type", "http")
    target = BACKEND_TYPES.get(btype, btype if ":" in btype else None)
    if target is None:
        raise ValueError(f"{field_name}.type='{btype}' is unknown; use one of {sorted(BACKEND_TYPES)} or package.module:Class")
    cls = import_object(target, field=f"{field_name}.type")
    from ..base import check_kwargs

    check_kwargs(cls, spec, field_name)
    return cls(**spec)
