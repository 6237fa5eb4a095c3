"""Device and dtype names from the config, resolved once, with errors that name the field.

Used by the trainer (`run.device`, `model.dtype`) and by rewards that run a model of their own (a reward's
`args.device`), so that 'auto', 'cuda' on a machine without a GPU, and typos behave the same everywhere.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, field: str = "model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field}='{name}' is not valid; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def configure_attention(device: torch.device, cudnn: bool) -> None:
    """`run.cudnn_attention`: on CUDA, whether `scaled_dot_product_attention` may pick cuDNN's kernels (a
    process-wide switch; flash and memory-efficient attention stay on). Off by default: on an H100 with torch 2.11,
    cuDNN's attention backward returned NaN gradients for the q/k/v LoRA weights of the first block of the tiny
    FLUX recipe in bf16 (found with `torch.autograd.set_detect_anomaly`: ScaledDotProductCudnnAttentionBackward0),
    where the math backend and the others were finite on the same step, and PyTorch tracks cuDNN backward NaN bugs
    of the same kind for some sequence lengths (pytorch/pytorch#196678). A training run that stops on a NaN
    gradient costs more than the speed cuDNN may add."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(bool(cudnn))


def resolve_device(name: str, field: str = "run.device") -> torch.device:
    """'auto' -> CUDA when torch sees a GPU, else CPU; otherwise a torch device string ('cpu', 'cuda', 'cuda:1',
    'mps'). A GPU asked for where torch has none fails here, naming the field, instead of at the first `.to()`
    deep inside model loading (where torch's message names neither the field nor the fix)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{field}='{name}' is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{field}='{name}': {why}; use {field}=auto (CPU here) or {field}=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{field}='{name}': only {torch.cuda.device_count()} GPU(s) visible "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{field}='{name}': MPS is not available here; use {field}=auto or {field}=cpu")
    return dev
