"""Shared pieces of autoregressive image-token sampling: logit filtering, classifier-free guidance, and a
KV-cached decode loop that returns the sampled tokens together with their exact log-probabilities.

The same pure functions are used to draw tokens (rollout) and to re-score them (teacher-forced
`log_prob`), so the GRPO ratio is exactly 1 before the first update. The order of operations follows
Janus-Pro / transformers' image generation: CFG mix -> divide by temperature -> top-k -> top-p -> softmax.

Where this departs from transformers' `generate`:
- Positions of left-padded prompts come from the attention mask (`cumsum - 1`), so a sample does not
  depend on how long the other prompts of its batch are (transformers counts pad slots as positions).
- The 4-D attention masks are built once per rollout and sliced per step, and the KV cache is one
  pre-allocated buffer written in place (`KVBuffer`): no per-step mask construction or re-allocation.
- Pad query rows attend to themselves only, so fully masked rows never produce NaN in SDPA.
- Scoring (`log_prob`) always keeps the sampled token in the top-k/top-p support: at a filter boundary a
  float-level difference between the cached and the teacher-forced forward could otherwise drop it
  (log-prob -inf). With the rollout's own weights (the first update) this changes nothing away from such exact
  ties. Once the weights have moved (later updates, the KL reference) a sampled token may have left the current
  top-k/top-p set; it is then scored within that set plus itself, a deliberate surrogate: its probability stays
  finite and differentiable (a -inf log-prob would make the ratio 0 and the gradient NaN), and the clipped ratio
  bounds what such a token contributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How image tokens are drawn. The training log-prob must use the very same values."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg_scale: float = 1.0  # 1 = no guidance (no unconditional rows)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(
                f"rollout.temperature={self.temperature}: RL sampling needs temperature > 0 "
                "(the log-prob of a greedy choice is undefined); use e.g. rollout.temperature=1.0"
            )
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1] (1 turns it off)")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0


# --------------------------------------------------------------------------------------------------
# Pure logit math
# --------------------------------------------------------------------------------------------------


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). Works on logits or on any quantity
    that the logits depend on affinely (e.g. the input of a final linear layer)."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def filter_logits(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Set the logits outside the top-k / nucleus (top-p) support to -inf. `logits` [..., V].

    top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept, as in
    transformers). top-p then keeps, on the top-k renormalised distribution, the smallest prefix of the
    descending order whose mass reaches `top_p`: a token is kept when the mass strictly before it is
    < top_p (so the most likely token is always kept). Equal logits are ordered by token id (a stable sort),
    so the kept set at an exact tie is the same on any device and for any batch shape: the rollout and the
    teacher-forced `log_prob` filter identically.
    `keep` [...] (long token ids) forces those tokens to stay in the support (see module docstring).
    """
    if top_k <= 0 and top_p >= 1.0:
        return logits
    out = logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # [..., 1]
        remove = out < kth
        if keep is not None:
            remove.scatter_(-1, keep.unsqueeze(-1), False)
        out = out.masked_fill(remove, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        remove_sorted = mass_before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        if keep is not None:
            remove.scatter_(-1, keep.unsqueeze(-1), False)
        out = out.masked_fill(remove, float("-inf"))
    return out


def sampling_logits(
    guided_logits: torch.Tensor, params: SamplingParams, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The logits of the exact sampling distribution: (CFG-mixed) logits / temperature, then filtered.
    Computed in fp32: the ratio test needs 1e-5 agreement and bf16 logits would not give it."""
    x = guided_logits.float()
    if params.temperature != 1.0:
        x = x / params.temperature
    return filter_logits(x, params.top_k, params.top_p, keep)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: logits [..., V], tokens [...] -> [...] (fp32)."""
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class TokenDraw:
    tokens: torch.Tensor  # [B] long
    logp: torch.Tensor  # [B] fp32, log-prob under the distribution it was drawn from


def draw_tokens(logits_BV: torch.Tensor, u_B: torch.Tensor) -> TokenDraw:
    """Sample one token per row from softmax(logits) (already temperature-scaled and filtered), given one
    uniform number in [0, 1) per row.

    Inverse-CDF sampling (fp64 cumulative sums): exact, much cheaper than `torch.multinomial` (which
    draws an exponential variate per vocabulary entry), and driven by exactly one uniform per token, so
    the uniforms can be drawn per row up front and a sample does not depend on how rows are batched.
    A token of probability 0 (filtered out) is never chosen: its CDF step is empty."""
    logp_BV = logits_BV.float().log_softmax(-1)
    cdf_BV = logp_BV.exp().double().cumsum(-1)
    u_B1 = u_B.to(device=cdf_BV.device, dtype=torch.float64).reshape(-1, 1)
    tokens_B = torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True).squeeze(-1)
    tokens_B = tokens_B.clamp_max(cdf_BV.shape[-1] - 1)  # (u < 1, checked by cfg_decode: u * total < total)
    return TokenDraw(tokens_B, logp_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1))


def row_uniforms(generators: list[torch.Generator], num_tokens: int, device: torch.device | str) -> torch.Tensor:
    """[N, T] fp64 uniforms, row i drawn from generators[i] (one random stream per sample row)."""
    rows = [torch.rand(num_tokens, generator=g, dtype=torch.float64, device=g.device) for g in generators]
    return torch.stack(rows).to(device) if rows else torch.empty(0, num_tokens, dtype=torch.float64, device=device)


# --------------------------------------------------------------------------------------------------
# Masks, positions, cache
# --------------------------------------------------------------------------------------------------


def positions_from_valid(valid_RL: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token is position 0. [R, L] long."""
    return (valid_RL.long().cumsum(-1) - 1).clamp_min(0)


def causal_padding_mask(valid_RL: torch.Tensor) -> torch.Tensor:
    """4-D boolean SDPA mask [R, 1, L, L] (True = attend): causal, padded keys hidden, and every pad
    query attends to itself so that no row is fully masked (which would give NaN)."""
    L = valid_RL.shape[1]
    idx = torch.arange(L, device=valid_RL.device)
    causal = idx[:, None] >= idx[None, :]  # [L, L]
    mask = causal[None] & valid_RL[:, None, :]  # [R, L, L]
    mask = mask | torch.eye(L, dtype=torch.bool, device=valid_RL.device)[None]
    return mask.unsqueeze(1)


class KVBuffer:
    """A pre-allocated key/value cache, written in place (duck-types transformers' `Cache.update`).

    transformers' attention layers call `update(key, value, layer_idx)` and attend over what it returns.
    Here that is a view of a buffer sized for the whole rollout, so no step re-allocates (DynamicCache
    concatenates, which copies the whole cache every step). Only used with an explicit 4-D mask,
    which makes the model skip all mask construction that would otherwise query the cache."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._len: dict[int, int] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key/value: [R, H, q, D]
        if layer_idx not in self._k:
            R, H, _, D = key.shape
            self._k[layer_idx] = key.new_empty(R, H, self.max_len, D)
            self._v[layer_idx] = value.new_empty(R, H, self.max_len, value.shape[-1])
            self._len[layer_idx] = 0
        start = self._len[layer_idx]
        n = key.shape[2]
        if start + n > self.max_len:
            raise RuntimeError(f"KVBuffer overflow: {start + n} > {self.max_len} positions")
        k_buf, v_buf = self._k[layer_idx], self._v[layer_idx]
        k_buf.narrow(2, start, n).copy_(key)  # (narrow: one dispatch, where [:, :, a:b] costs three)
        v_buf.narrow(2, start, n).copy_(value)
        self._len[layer_idx] = start + n
        return k_buf.narrow(2, 0, start + n), v_buf.narrow(2, 0, start + n)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len.get(layer_idx, 0)


class StaticKVBuffer(KVBuffer):
    """A `KVBuffer` for a fixed-shape decode step (what a CUDA graph replays): `update` writes at the slots
    held in the device tensor `slots` and returns the whole buffer, so every step has the same shapes and no
    Python-side length; the caller masks the slots not written yet. Zero-filled, so a masked slot never holds
    NaN (SDPA weighs it by 0, and 0 x NaN would still be NaN)."""

    def __init__(self, max_len: int):
        super().__init__(max_len)
        self.slots: torch.Tensor | None = None  # [n] long, set by the caller before each forward

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self._k:
            R, H, _, D = key.shape
            self._k[layer_idx] = key.new_zeros(R, H, self.max_len, D)
            self._v[layer_idx] = value.new_zeros(R, H, self.max_len, value.shape[-1])
        self._k[layer_idx].index_copy_(2, self.slots, key)
        self._v[layer_idx].index_copy_(2, self.slots, value)
        return self._k[layer_idx], self._v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("StaticKVBuffer has no host-side length (only FastLlamaDecoder drives it)")


# --------------------------------------------------------------------------------------------------
# The decode loop
# --------------------------------------------------------------------------------------------------

# forward(embeds [R, L, D], mask [R, 1, L, Lk] bool or None = no padding, positions [R, L], cache)
#   -> last hidden [R, L, D]
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KVBuffer], torch.Tensor]
# guided_logits(hidden [R, D]) -> CFG-combined raw logits [B, V]   (R = 2B with CFG, else B)
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
# embed(tokens [B]) -> next-step input embeddings [R, 1, D] (cond and uncond rows get the same token)
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DecodeOutput:
    tokens: torch.Tensor  # [B, T] long
    logp: torch.Tensor  # [B, T] fp32: log-prob of each token under the exact sampling distribution


def cfg_decode(
    forward: ForwardFn,
    guided_logits: LogitsFn,
    embed: EmbedFn,
    prompt_embeds_RPD: torch.Tensor,
    prompt_valid_RP: torch.Tensor,
    uniforms_BT: torch.Tensor,
    params: SamplingParams,
    static: str = "",
) -> DecodeOutput:
    """Sample `num_tokens` tokens for B rows with a KV cache; conditional and unconditional rows (when
    CFG is on) run in one batched forward, R = 2B rows ordered [cond..., uncond...].

    The prompt is prefilled once; each step then feeds one token per row. Masks and positions are
    computed once and sliced, so the per-step work is the model forward, the head, and the draw.
    Token t of row b is drawn by inverse CDF with uniforms_BT[b, t] (see `draw_tokens`).

    `static`: "" = the step attends over the live length (fastest eagerly); "eager" = every step has the
    same shapes (attention over the whole buffer, masked; the step index lives on the device); "graph" =
    that step captured once as a CUDA graph and replayed (`forward` must drive the cache only through
    `update`, as `FastLlamaDecoder` does). Same function in all three modes.
    """
    R, P, _ = prompt_embeds_RPD.shape
    B = R // 2 if params.uses_cfg else R
    device = prompt_embeds_RPD.device
    T = uniforms_BT.shape[1]
    if uniforms_BT.shape[0] != B:
        raise ValueError(f"cfg_decode: {uniforms_BT.shape[0]} rows of uniforms for {B} samples")
    if uniforms_BT.numel() and not bool(((uniforms_BT >= 0) & (uniforms_BT < 1)).all()):
        # u = 1 would land past the last CDF step and draw a filtered (zero-probability, log-prob -inf) token
        raise ValueError("cfg_decode: uniforms must lie in [0, 1)")
    u_BT = uniforms_BT.to(device)
    valid_RP = prompt_valid_RP.to(device=device, dtype=torch.bool)
    if static:
        return _static_decode(forward, guided_logits, embed, prompt_embeds_RPD, valid_RP, u_BT, params,
                              capture=static == "graph")

    padded = not bool(valid_RP.all())
    # decode-step masks: query at absolute slot P+t sees keys [0, P+t] that are real. Without
    # padding no mask is needed at all (None lets SDPA take its unmasked kernels).
    key_valid_RL = torch.cat([valid_RP, valid_RP.new_ones(R, T)], dim=1)  # [R, P+T]
    step_mask_R11L = key_valid_RL[:, None, None, :] if padded else None
    prefill_mask = causal_padding_mask(valid_RP) if padded else None
    n_real_R1 = valid_RP.long().sum(-1, keepdim=True)  # image token t sits at position n_real + t

    cache = KVBuffer(P + T)
    hidden_RD = forward(prompt_embeds_RPD, prefill_mask, positions_from_valid(valid_RP), cache)[:, -1]

    tokens_BT = torch.empty(B, T, dtype=torch.long, device=device)
    logp_BT = torch.empty(B, T, dtype=torch.float32, device=device)
    for t in range(T):
        draw = draw_tokens(sampling_logits(guided_logits(hidden_RD), params), u_BT[:, t])
        tokens_BT[:, t] = draw.tokens
        logp_BT[:, t] = draw.logp
        if t == T - 1:
            break
        mask = step_mask_R11L[..., : P + t + 1] if padded else None
        hidden_RD = forward(embed(draw.tokens), mask, n_real_R1 + t, cache)[:, -1]
    return DecodeOutput(tokens_BT, logp_BT)


def _static_decode(forward: ForwardFn, guided_logits: LogitsFn, embed: EmbedFn, prompt_embeds_RPD: torch.Tensor,
                   valid_RP: torch.Tensor, u_BT: torch.Tensor, params: SamplingParams, capture: bool) -> DecodeOutput:
    """`cfg_decode` with one fixed-shape step (see there). The step reads the step index `t_1` and the hidden
    state from device tensors, writes token t, its log-prob, the next hidden state and t + 1 back into them:
    nothing crosses to the host, so on a GPU the whole step (about 10 kernels per layer, plus head and draw)
    is captured once and replayed T - 1 times, one launch each instead of hundreds. Attention runs over all
    P + T slots with a mask (like transformers' static cache), which costs more arithmetic than the live
    length; on GPUs at rollout batch sizes the launches, not that arithmetic, bound a step."""
    (R, P, _), (B, T) = prompt_embeds_RPD.shape, u_BT.shape
    device = prompt_embeds_RPD.device
    if capture and device.type != "cuda":
        raise ValueError(f"cfg_decode(static='graph') captures a CUDA graph; the model is on {device}")
    L = P + T
    key_valid_R11L = torch.cat([valid_RP, valid_RP.new_ones(R, T)], dim=1)[:, None, None, :]
    slot_L = torch.arange(L, device=device)
    n_real_R1 = valid_RP.long().sum(-1, keepdim=True)

    cache = StaticKVBuffer(L)
    cache.slots = slot_L[:P]
    # prefill: causal over the prompt (padding hidden), the T image slots not written yet hidden
    prefill_mask = torch.cat([causal_padding_mask(valid_RP), valid_RP.new_zeros(R, 1, P, T)], dim=-1)
    hidden_RD = forward(prompt_embeds_RPD, prefill_mask, positions_from_valid(valid_RP), cache)[:, -1].clone()

    tokens_BT = torch.empty(B, T, dtype=torch.long, device=device)
    logp_BT = torch.empty(B, T, dtype=torch.float32, device=device)
    t_1 = torch.zeros(1, dtype=torch.long, device=device)

    def step() -> None:
        draw = draw_tokens(sampling_logits(guided_logits(hidden_RD), params), u_BT.index_select(1, t_1)[:, 0])
        tokens_BT.index_copy_(1, t_1, draw.tokens[:, None])
        logp_BT.index_copy_(1, t_1, draw.logp[:, None])
        # feed token t at slot P + t, position n_real + t; keys up to that slot (real ones) are visible. The
        # last step's forward is not needed, but keeping it makes every step the same graph.
        cache.slots = P + t_1
        mask = key_valid_R11L & (slot_L <= P + t_1)
        hidden_RD.copy_(forward(embed(draw.tokens), mask, n_real_R1 + t_1, cache)[:, -1])
        t_1.add_(1)

    if not capture:
        for _ in range(T):
            step()
        return DecodeOutput(tokens_BT, logp_BT)
    # the first step runs eagerly on a side stream (it also warms up library handles and workspaces, which
    # must not be created during capture), then the captured step replays steps 1 .. T-1
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: only this thread is barred from unsafe CUDA calls while capturing. The default ("global")
        # would also fail a GPU reward scoring the previous micro-batch in its worker thread (scoring.overlap) the
        # moment it allocated or synchronised, and with it the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
    except RuntimeError as e:
        raise RuntimeError(f"rollout.cuda_graph (on by default for CUDA): capturing the decode step as a CUDA graph "
                           f"failed ({e}); set rollout.cuda_graph=false to decode step by step") from e
    for _ in range(T - 1):
        graph.replay()
    return DecodeOutput(tokens_BT, logp_BT)


# --------------------------------------------------------------------------------------------------
# A lean inference replica of transformers' Llama decoder stack (rollout only)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Lora:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float


@dataclass
class _Linear:
    """A linear map read from a live module: weight/bias are the module's own tensors (no copy), plus
    the active unmerged LoRA adapters of a peft layer, applied as x A^T B^T * s like peft does."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    loras: list[_Lora]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        if not self.loras:
            return y
        out_dtype = y.dtype
        for lo in self.loras:  # peft's casts: the input to the adapter's dtype (fp32 adapters on bf16 weights), back after
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(x.to(lo.A.dtype), lo.A), lo.B) * lo.scaling
        return y.to(out_dtype)


def _read_linear(mod: torch.nn.Module) -> _Linear | None:
    """`_Linear` of an nn.Linear or a peft LoRA Linear; None for anything else (caller falls back)."""
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
    if not isinstance(base, torch.nn.Linear):
        return None
    loras: list[_Lora] = []
    if base is not mod:  # a peft tuner layer
        if not hasattr(mod, "lora_A"):
            return None
        if not getattr(mod, "disable_adapters", False) and not getattr(mod, "merged", False):
            for name in mod.active_adapters:
                if name not in mod.lora_A:
                    continue
                if name in getattr(mod, "lora_variant", {}):  # DoRA and friends: not replicated here
                    return None
                drop = mod.lora_dropout[name]
                if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and drop.training:
                    return None
                loras.append(_Lora(mod.lora_A[name].weight, mod.lora_B[name].weight, float(mod.scaling[name])))
    return _Linear(base.weight, base.bias, loras)


def _merged_weight(lin: _Linear) -> torch.Tensor:
    """W + sum(s * B @ A) over the active LoRA adapters: the effective weight (a new tensor if any)."""
    w = lin.weight
    for lo in lin.loras:
        w = w + (lo.B @ lo.A) * lo.scaling
    return w


@dataclass
class _PreparedLayer:
    """One decoder layer's weights rearranged for inference (copies, built once per rollout):
    - the RMSNorm gains folded into the columns of the GEMM that follows them (W diag(g));
    - q|k|v and gate|up fused, LoRA adapters merged;
    - the rows of every q and k head permuted so that RoPE's rotate-half pairs (i, i + hd/2) become
      adjacent (2i, 2i+1): RoPE is then one complex multiplication. q.k is invariant under the same
      permutation of both, and v is untouched, so attention computes the same function;
    - all matrices stored transposed and contiguous ([in, out]) for `x @ W`, with the residual add
      inside the GEMM (`addmm`) for o_proj and down_proj."""

    eps1: float
    eps2: float
    qkv_t: torch.Tensor  # [D, (H + 2 Hkv) hd]
    qkv_b: torch.Tensor | None
    o_t: torch.Tensor  # [H hd, D]
    o_b: torch.Tensor | None
    gate_up_t: torch.Tensor  # [D, 2 I]
    gate_up_b: torch.Tensor | None
    down_t: torch.Tensor  # [I, D]
    down_b: torch.Tensor | None
    intermediate: int
    scaling: float


def _interleave_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute the output rows of a q or k projection [n_heads * hd, ...] per head: (first half, second
    half) -> interleaved pairs, the layout of complex-valued RoPE."""
    h = head_dim // 2
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, h, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


class FastLlamaDecoder:
    """Inference-only forward of a transformers `LlamaModel` (the language model of Janus, Emu3, ...).

    Built once per rollout from the live weights (training changes them). Two paths:
    - prepared (small fp32 models, `FUSE_MAX_BYTES`): a rearranged copy of the weights (`_PreparedLayer`:
      norm gains folded, q|k|v and gate|up fused, LoRA merged, q/k rows permuted for complex RoPE,
      residual adds inside the GEMMs). A decode step is then ~10 tensor ops per layer instead of ~40:
      on CPUs and at small batch the per-op dispatch, not the arithmetic, is what the step costs.
    - live (large or low-precision models, or ones the prepared path cannot replicate): the module's own tensors
      (no copy), LoRA applied unmerged as peft does.
    Both: no module hooks, no mask construction, RoPE from a table built once, attention over the live
    length of a `KVBuffer`. The teacher-forced `log_prob` keeps using the transformers modules
    (autograd, LoRA, checkpointing), so the ratio-1 tests check this replica against them.

    `build` returns None when the model is not a plain Llama stack it can replicate (then the caller
    uses the transformers forward)."""

    FUSE_MAX_BYTES = 1 << 30  # copy/rearrange the weights only when the copy is cheap (small models)

    def __init__(self, lm: torch.nn.Module, layers: list[dict]):
        self.lm = lm
        self.layers = layers
        cfg = lm.config
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.norm_w, self.norm_eps = lm.norm.weight, float(lm.norm.variance_epsilon)
        self.prepared: list[_PreparedLayer] | None = None  # set by `build` for the prepared path
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._rope_c: torch.Tensor | None = None  # complex [Lpos, hd/2] for the prepared path

    @classmethod
    def build(cls, lm: torch.nn.Module, fuse: bool | None = None) -> "FastLlamaDecoder | None":
        # (FSDP2's fully_shard turns the class into a dynamic FSDPLlamaModel subclass: look through it)
        own = next(c for c in type(lm).__mro__ if not c.__name__.startswith("FSDP"))
        if own.__name__ != "LlamaModel" or getattr(lm.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            return None
        if getattr(lm.config, "hidden_act", "silu") != "silu":
            return None
        if fuse is None:
            # fp32 only: folding the norm gains into bf16/fp16 weights rounds W*g once more, and the complex
            # RoPE runs in fp32 where transformers rotates in the model dtype; in bf16 that measurably widened
            # the rollout/training mismatch (first-epoch max |ratio - 1| 0.04 -> 0.05 on the demo), so low
            # precision keeps the module tensors and their op order (live path)
            # Nor under autocast (fp32 weights, run.dtype=bf16): its GEMMs then return bf16 while the prepared
            # path's RoPE and cache follow the weights' dtype, so keys came out fp32 in the prefill and bf16 in
            # the decode steps (a crash in the fixed-shape cache, a silent cast in the live one). The live path
            # repeats the modules' ops in their order, so autocast casts it exactly as it casts `log_prob`.
            device_type = next(lm.parameters()).device.type
            fuse = (not torch.is_autocast_enabled(device_type)
                    and all(p.dtype == torch.float32 for p in lm.parameters())
                    and sum(p.numel() * p.element_size() for p in lm.parameters()) <= cls.FUSE_MAX_BYTES)
        layers = []
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            lin = {n: _read_linear(getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            lin.update({n: _read_linear(getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj")})
            if any(v is None for v in lin.values()):
                return None
            spec = {"ln1": (layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon)),
                    "ln2": (layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon)),
                    "scaling": float(a.scaling), **lin}
            layers.append(spec)
        dec = cls(lm, layers)
        if fuse:
            dec.prepared = [dec._prepare(sp) for sp in layers]
        return dec

    def _prepare(self, sp: dict) -> _PreparedLayer:
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        with torch.no_grad():
            def fused(names: list[str], gain: torch.Tensor, permute: list[int | None]):
                ws, bs = [], []
                for n, heads in zip(names, permute):
                    lin = sp[n]
                    w, b = _merged_weight(lin), lin.bias
                    if heads is not None:
                        w = _interleave_rows(w, heads, hd)
                        b = None if b is None else _interleave_rows(b, heads, hd)
                    ws.append(w)
                    bs.append(b if b is not None else w.new_zeros(w.shape[0]))
                w = torch.cat(ws) * gain[None, :]  # fold the norm gain into the input columns
                b = torch.cat(bs) if any(sp[n].bias is not None for n in names) else None
                return w.t().contiguous(), b

            qkv_t, qkv_b = fused(["q_proj", "k_proj", "v_proj"], sp["ln1"][0], [H, Hkv, None])
            gu_t, gu_b = fused(["gate_proj", "up_proj"], sp["ln2"][0], [None, None])
            o, down = sp["o_proj"], sp["down_proj"]
            return _PreparedLayer(
                eps1=sp["ln1"][1], eps2=sp["ln2"][1], qkv_t=qkv_t, qkv_b=qkv_b,
                o_t=_merged_weight(o).t().contiguous(), o_b=o.bias,
                gate_up_t=gu_t, gate_up_b=gu_b,
                down_t=_merged_weight(down).t().contiguous(), down_b=down.bias,
                intermediate=down.weight.shape[1], scaling=sp["scaling"],
            )

    def prepare_rope(self, max_positions: int, like: torch.Tensor) -> None:
        """cos/sin for positions [0, max_positions) from the model's own rotary module (any rope type)."""
        first = self._cos is None  # the path is fixed at the first call (the two KV layouts differ)
        pos = torch.arange(max_positions, device=like.device)[None]
        cos, sin = self.lm.rotary_emb(like, pos)
        self._cos, self._sin = cos[0], sin[0]  # [Lpos, hd]
        h = self.head_dim // 2
        # complex RoPE needs the rotate-half convention with the same angle for i and i + hd/2 (all
        # transformers Llama rope types build cos = cat(freqs, freqs)); otherwise use the live path
        if (self.prepared is not None and torch.equal(self._cos[:, :h], self._cos[:, h:])
                and torch.equal(self._sin[:, :h], self._sin[:, h:])):
            self._rope_c = torch.complex(self._cos[:, :h].float(), self._sin[:, :h].float())
        elif first:
            self.prepared = None

    @staticmethod
    def _norm(x: torch.Tensor, eps: float) -> torch.Tensor:
        # RMSNorm without its gain (the prepared path folds it into the next GEMM): normalise in fp32 and
        # cast back, as LlamaRMSNorm does
        if x.dtype == torch.float32:  # (no-op casts still cost a dispatch each)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @classmethod
    def _rms(cls, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        # LlamaRMSNorm: the normalised input (in its dtype), then the gain
        return w * cls._norm(x, eps)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return x * cos + rot * sin

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 cache: KVBuffer) -> torch.Tensor:
        """embeds [R, L, D], mask [R, 1, L, Lk] bool or None (no padding: causal for L > 1, all keys for L == 1),
        positions [R, L] -> final-norm hidden states [R, L, D]."""
        # positions never exceed the slot index (left padding only lowers them), so a table of the
        # cache length suffices; no per-step positions.max() (a device sync on GPUs)
        if self._cos is None or self._cos.shape[0] < cache.max_len:
            self.prepare_rope(cache.max_len, embeds)
        x = self._forward_prepared(embeds, mask, positions, cache) if self.prepared is not None \
            else self._forward_live(embeds, mask, positions, cache)
        return self._rms(x, self.norm_w, self.norm_eps)

    def _forward_prepared(self, embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                          cache: KVBuffer) -> torch.Tensor:
        R, L, D = embeds.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        rope_c = self._rope_c[positions].unsqueeze(2)  # [R, L, 1, hd/2]
        is_causal = mask is None and L > 1
        x = embeds.reshape(R * L, D)
        nqk = (H + Hkv) * hd
        fp32 = x.dtype == torch.float32
        for i, ly in enumerate(self.prepared):
            h = self._norm(x, ly.eps1)
            qkv = torch.mm(h, ly.qkv_t) if ly.qkv_b is None else torch.addmm(ly.qkv_b, h, ly.qkv_t)
            qk = qkv[:, :nqk] if fp32 else qkv[:, :nqk].float()
            qk = torch.view_as_real(torch.view_as_complex(qk.reshape(R, L, H + Hkv, hd // 2, 2)) * rope_c)
            qk = (qk if fp32 else qk.to(x.dtype)).reshape(R, L, H + Hkv, hd).transpose(1, 2)
            v = qkv[:, nqk:].reshape(R, L, Hkv, hd).transpose(1, 2)
            k, v = cache.update(qk[:, H:], v, i)
            att = torch.nn.functional.scaled_dot_product_attention(
                qk[:, :H], k, v, attn_mask=mask, is_causal=is_causal, scale=ly.scaling, enable_gqa=Hkv != H
            )
            x = torch.addmm(x, att.transpose(1, 2).reshape(R * L, H * hd), ly.o_t)
            if ly.o_b is not None:
                x = x + ly.o_b
            h = self._norm(x, ly.eps2)
            gu = torch.mm(h, ly.gate_up_t) if ly.gate_up_b is None else torch.addmm(ly.gate_up_b, h, ly.gate_up_t)
            x = torch.addmm(x, torch.nn.functional.silu(gu[:, : ly.intermediate]) * gu[:, ly.intermediate:], ly.down_t)
            if ly.down_b is not None:
                x = x + ly.down_b
        return x.view(R, L, D)

    def _forward_live(self, embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                      cache: KVBuffer) -> torch.Tensor:
        R, L, _ = embeds.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        cos = self._cos[positions].unsqueeze(1).to(embeds.dtype)  # [R, 1, L, hd]
        sin = self._sin[positions].unsqueeze(1).to(embeds.dtype)
        is_causal = mask is None and L > 1
        x = embeds
        for i, sp in enumerate(self.layers):
            h = self._rms(x, *sp["ln1"])
            q, k, v = sp["q_proj"](h), sp["k_proj"](h), sp["v_proj"](h)
            q = self._rope(q.view(R, L, H, hd).transpose(1, 2), cos, sin)
            k = self._rope(k.view(R, L, Hkv, hd).transpose(1, 2), cos, sin)
            v = v.view(R, L, Hkv, hd).transpose(1, 2)
            k, v = cache.update(k, v, i)
            att = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=sp["scaling"], enable_gqa=Hkv != H
            )
            x = x + sp["o_proj"](att.transpose(1, 2).reshape(R, L, H * hd))
            h = self._rms(x, *sp["ln2"])
            x = x + sp["down_proj"](torch.nn.functional.silu(sp["gate_proj"](h)) * sp["up_proj"](h))
        return x
