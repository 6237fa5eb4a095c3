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
  (log-prob -inf). Away from such exact ties this changes nothing.
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
    < top_p (so the most likely token is always kept).
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
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
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


def draw_tokens(logits_BV: torch.Tensor, generator: torch.Generator) -> TokenDraw:
    """Sample one token per row from softmax(logits) (already temperature-scaled and filtered)."""
    logp_BV = logits_BV.float().log_softmax(-1)
    tokens_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
    return TokenDraw(tokens_B, logp_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1))


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device`: the given one if it already lives there, else one seeded from it.

    Seeding from the caller's generator keeps the rollout reproducible from one seed while the
    per-step random draws stay on the accelerator (no host round trip per token)."""
    if generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator(device=device).manual_seed(seed)


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
        end = start + key.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KVBuffer overflow: {end} > {self.max_len} positions")
        self._k[layer_idx][:, :, start:end] = key
        self._v[layer_idx][:, :, start:end] = value
        self._len[layer_idx] = end
        return self._k[layer_idx][:, :, :end], self._v[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len.get(layer_idx, 0)


# --------------------------------------------------------------------------------------------------
# The decode loop
# --------------------------------------------------------------------------------------------------

# forward(embeds [R, L, D], mask [R, 1, L, Lk] bool, positions [R, L], cache) -> last hidden [R, L, D]
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
    num_tokens: int,
    params: SamplingParams,
    generator: torch.Generator,
) -> DecodeOutput:
    """Sample `num_tokens` tokens for B rows with a KV cache; conditional and unconditional rows (when
    CFG is on) run in one batched forward, R = 2B rows ordered [cond..., uncond...].

    The prompt is prefilled once; each step then feeds one token per row. Masks and positions are
    computed once and sliced, so the per-step work is the model forward, the head, and the draw.
    """
    R, P, _ = prompt_embeds_RPD.shape
    B = R // 2 if params.uses_cfg else R
    device = prompt_embeds_RPD.device
    T = num_tokens
    gen = device_generator(generator, device)

    valid_RP = prompt_valid_RP.to(device=device, dtype=torch.bool)
    key_valid_RL = torch.cat([valid_RP, valid_RP.new_ones(R, T)], dim=1)  # [R, P+T]
    # decode-step masks: query at absolute slot P+t sees keys [0, P+t] that are real
    step_mask_R11L = key_valid_RL[:, None, None, :]
    n_real_R1 = valid_RP.long().sum(-1, keepdim=True)  # image token t sits at position n_real + t

    cache = KVBuffer(P + T)
    hidden_RD = forward(prompt_embeds_RPD, causal_padding_mask(valid_RP), positions_from_valid(valid_RP), cache)[:, -1]

    tokens_BT = torch.empty(B, T, dtype=torch.long, device=device)
    logp_BT = torch.empty(B, T, dtype=torch.float32, device=device)
    for t in range(T):
        draw = draw_tokens(sampling_logits(guided_logits(hidden_RD), params), gen)
        tokens_BT[:, t] = draw.tokens
        logp_BT[:, t] = draw.logp
        if t == T - 1:
            break
        hidden_RD = forward(embed(draw.tokens), step_mask_R11L[..., : P + t + 1], n_real_R1 + t, cache)[:, -1]
    return DecodeOutput(tokens_BT, logp_BT)
