"""Policy-gradient surrogate losses and their aggregation. Tensors in, tensors out.

Per-unit clipped surrogate (PPO, Schulman et al. 2017, as used by GRPO):
    ratio = exp(logp - old_logp)
    L = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
Asymmetric eps_low/eps_high is DAPO's "clip-higher". Dual-clip (Ye et al. 2020) additionally bounds the loss of
negative-advantage units by -c*A (c > 1), so a huge ratio on a bad sample cannot dominate the update.

Aggregation is expressed as per-unit *weights* computed once for the whole batch (see `unit_weights`), so the
loss of any micro-batch / unit chunk is ``sum(L * w)``: gradient accumulation over chunks gives exactly the
full-batch gradient whatever the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SurrogateTerms:
    loss: torch.Tensor  # [N, K] per-unit loss
    ratio: torch.Tensor  # [N, K]
    clipped: torch.Tensor  # [N, K] bool: the clipped branch was taken (gradient is zero there)


def clipped_surrogate(
    logp_NK: torch.Tensor,
    old_logp_NK: torch.Tensor,
    adv_N: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float = 0.0,
) -> SurrogateTerms:
    # log-ratio computed in fp32: bf16 log-probs differ by ~1e-2, which would fake a ratio away from 1
    log_ratio = logp_NK.float() - old_logp_NK.float()
    ratio = torch.exp(log_ratio)
    adv = adv_N.float().unsqueeze(1)
    s1 = ratio * adv
    s2 = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    surrogate = torch.minimum(s1, s2)
    clipped = s2 < s1
    if dual_clip > 0:
        lower = dual_clip * adv
        neg = adv < 0
        dual = neg & (surrogate < lower)
        surrogate = torch.where(dual, lower.expand_as(surrogate), surrogate)
        clipped = clipped | dual
    return SurrogateTerms(loss=-surrogate, ratio=ratio, clipped=clipped)


def unit_weights(mask_NT: torch.Tensor, valid_N: torch.Tensor, mode: str, total_rows: int | None = None,
                 total_units: float | None = None) -> torch.Tensor:
    """Weights [N, T] such that sum(loss_NT * w) is the aggregated loss.

    token_mean: every trained unit of the batch counts equally: w = 1 / (number of units in the batch).
    seq_mean:   mean over each sample's units, then mean over samples: w = 1 / (units_i * N).
    `total_rows` / `total_units` override N and the unit count with global (all-rank) values so that
    distributed training averages like a single process.
    """
    m = (mask_NT & valid_N.unsqueeze(1)).float()
    if mode == "token_mean":
        denom = float(total_units) if total_units is not None else float(m.sum())
        return m / max(denom, 1.0)
    if mode == "seq_mean":
        n = float(total_rows) if total_rows is not None else float(valid_N.sum())
        per_row = m.sum(1, keepdim=True).clamp_min(1.0)
        return m / per_row / max(n, 1.0)
    raise ValueError(f"algorithm.loss_agg='{mode}' is unknown; use token_mean or seq_mean")
