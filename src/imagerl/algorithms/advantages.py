"""Group-relative advantage estimators. Tensors in, tensors out; chosen by name (algorithm.advantage).

Signature of every estimator: ``(rewards_NR, group_ids_N, weights_NR, eps, clip) -> AdvantageOutput``
on the *global* batch (all ranks gathered), so multi-process training equals single-process training.

- ``group_zscore`` (GRPO, Shao et al. 2024): A_i = (r_i - mean_g) / (std_g + eps) on the weighted total reward.
- ``global_std``: A_i = (r_i - mean_g) / (std_batch + eps): the group mean removes prompt difficulty, one batch
  std avoids blowing up near-constant groups (Flow-GRPO's global-std option; Dr.GRPO argues against per-group std).
- ``mean_only`` (Dr.GRPO, Liu et al. 2025): A_i = r_i - mean_g, no std normalisation.
- ``gdpo`` (multi-reward, as in DeepGen-RL's MR-GRPO): each reward is z-scored within its group separately, the
  normalised rewards are combined with their weights, the sum is z-scored over the batch, then clipped.

Std is the population std (ddof=0), as numpy/Flow-GRPO compute it: a group {0, 1} gives advantages {-1, +1}.
Abstains (NaN scores). A sample on which *every* reward abstained (or every one that scored it weighs 0) gets
advantage 0 and `valid=False` (the loss skips it) and is left out of group statistics; groups whose members all abstain contribute nothing. Where only some
rewards abstained on a sample, each of those counts as its group's mean of that reward (`impute_group_means`; the
batch mean if the whole group abstained on it): the sample is neither raised nor lowered against its group by a
reward that said nothing about it. (Dropping the reward and rescaling the others' weights instead would turn an
abstaining *penalty*, a negative weight, into a bonus: with weights [+1, -1] the rows [.8, .4], [.8, NaN], [.8, 0]
would total [0.4, 1.6, 0.8], rewarding the sample the penalty judge failed on.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import ADVANTAGES


@dataclass
class AdvantageOutput:
    adv: torch.Tensor  # [N] float32
    valid: torch.Tensor  # [N] bool: False for samples with no usable reward
    total: torch.Tensor  # [N] the scalar reward each advantage was computed from (NaN where invalid)


def weighted_total(rewards_NR: torch.Tensor, weights_NR: torch.Tensor) -> torch.Tensor:
    """sum_r w_r s_r with abstaining rewards removed and the voting weight rescaled -> [N] (NaN if all abstain).
    The building block of `combined_reward`, which fills partial abstains first (then nothing is rescaled)."""
    valid = ~torch.isnan(rewards_NR)
    w = torch.where(valid, weights_NR, torch.zeros_like(weights_NR))
    # (not nan_to_num: that also turns +-inf into float32's max, a finite score that passes every inf check)
    tot = (torch.where(valid, rewards_NR, torch.zeros_like(rewards_NR)) * w).sum(1)
    voted = w.abs().sum(1)
    scale = weights_NR.abs().sum(1) / voted.clamp_min(1e-12)
    return torch.where(voted > 0, tot * scale, torch.full_like(tot, math.nan))


def combined_reward(rewards_NR: torch.Tensor, weights_NR: torch.Tensor,
                    group_ids_N: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar reward of each sample -> [N]: the weighted sum over rewards, where a reward that abstained on a
    sample others scored counts as its group's mean (`impute_group_means`; no group ids = the batch is one group);
    NaN where every reward abstained. The one rule for the advantages, the logged totals and composite rewards.
    A reward of weight 0 (monitored, not trained on) does not make a sample scored: NaN also where only such rewards
    scored it (else a weighted judge that abstained on the whole batch was imputed as 0 for every sample beside a
    weight-0 metric: advantages all 0, every sample valid, nothing trained and no error)."""
    if group_ids_N is None:
        group_ids_N = torch.zeros(rewards_NR.shape[0], dtype=torch.long)
    total = weighted_total(impute_group_means(rewards_NR, group_ids_N.cpu()), weights_NR)
    return torch.where(unscored(rewards_NR, weights_NR), torch.full_like(total, math.nan), total)


def unscored(rewards_NR: torch.Tensor, weights_NR: torch.Tensor) -> torch.Tensor:
    """[N] bool: no reward with a non-zero weight scored the sample (each abstained or weighs 0 for it)."""
    return (torch.isnan(rewards_NR) | (weights_NR.to(rewards_NR.device) == 0)).all(1)


def impute_group_means(rewards_NR: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """NaN entries of samples on which some other reward scored -> that reward's mean over the sample's group (over
    the batch if the whole group abstained on it; 0 if the whole batch did). Rows with no score stay all-NaN."""
    out = rewards_NR.clone()
    missing = torch.isnan(rewards_NR)
    if not missing.any():
        return out
    for j in range(rewards_NR.shape[1]):
        col, nan = rewards_NR[:, j], missing[:, j]
        if not nan.any():
            continue
        mean, _, cnt = group_stats(col, group_ids_N)
        batch_mean = col[~nan].double().mean().to(col.dtype) if (~nan).any() else col.new_zeros(())
        out[:, j] = torch.where(nan, torch.where(cnt > 0, mean, batch_mean), col)
    out[missing.all(1)] = math.nan
    return out


def group_stats(x_N: torch.Tensor, group_ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean, population std and count of its group, ignoring NaN entries -> three [N] tensors."""
    uniq, inv = torch.unique(group_ids_N, return_inverse=True)
    G = uniq.numel()
    valid = ~torch.isnan(x_N)
    xv = torch.where(valid, x_N, torch.zeros_like(x_N)).double()
    cnt = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, valid.double())
    s = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, xv)
    mean = s / cnt.clamp_min(1)
    dev2 = torch.where(valid, (xv - mean[inv]) ** 2, torch.zeros_like(xv))
    var = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, dev2) / cnt.clamp_min(1)
    return mean[inv].to(x_N.dtype), var.sqrt()[inv].to(x_N.dtype), cnt[inv].to(x_N.dtype)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0 where den == 0 (a constant group carries no signal), and NaN kept where num is NaN (an
    abstaining sample stays invalid: with algorithm.adv_eps=0 a group of one scored sample has den 0)."""
    q = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return torch.where(torch.isnan(num), num, q)


def _finish(adv: torch.Tensor, total: torch.Tensor, clip: float) -> AdvantageOutput:
    valid = ~torch.isnan(adv)
    adv = torch.nan_to_num(adv, nan=0.0)
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    return AdvantageOutput(adv=adv.float(), valid=valid, total=total)


@ADVANTAGES.register("group_zscore")
def group_zscore(rewards_NR, group_ids_N, weights_NR, eps: float = 1e-4, clip: float = 0.0) -> AdvantageOutput:
    r = combined_reward(rewards_NR, weights_NR, group_ids_N)
    mean, std, _ = group_stats(r, group_ids_N)
    return _finish(_safe_div(r - mean, std + eps), r, clip)


@ADVANTAGES.register("global_std")
def global_std(rewards_NR, group_ids_N, weights_NR, eps: float = 1e-4, clip: float = 0.0) -> AdvantageOutput:
    r = combined_reward(rewards_NR, weights_NR, group_ids_N)
    mean, _, _ = group_stats(r, group_ids_N)
    ok = ~torch.isnan(r)
    std = r[ok].double().std(unbiased=False).to(r.dtype) if ok.any() else torch.tensor(0.0)
    return _finish(_safe_div(r - mean, std + eps), r, clip)


@ADVANTAGES.register("mean_only")
def mean_only(rewards_NR, group_ids_N, weights_NR, eps: float = 1e-4, clip: float = 0.0) -> AdvantageOutput:
    r = combined_reward(rewards_NR, weights_NR, group_ids_N)
    mean, _, _ = group_stats(r, group_ids_N)
    return _finish(r - mean, r, clip)


@ADVANTAGES.register("gdpo")
def gdpo(rewards_NR, group_ids_N, weights_NR, eps: float = 1e-4, clip: float = 0.0) -> AdvantageOutput:
    # Each reward's group mean and std over the samples it scored; where it abstained on a sample that another
    # reward scored, its z-score is 0 (the group's mean). (Imputing the mean first and then taking the std would add
    # zero deviations: the std shrinks by sqrt(scored / G) and a reward that often abstains gets a larger weight on
    # the samples it did score.)
    scored_any = ~unscored(rewards_NR, weights_NR)
    cols = []
    for j in range(rewards_NR.shape[1]):
        x = rewards_NR[:, j]
        mean, std, _ = group_stats(x, group_ids_N)
        z = _safe_div(x - mean, std + eps)
        cols.append(torch.where(torch.isnan(x) & scored_any, torch.zeros_like(z), z))
    z_NR = torch.stack(cols, 1) if cols else rewards_NR
    combined = weighted_total(z_NR, weights_NR)
    ok = ~torch.isnan(combined)
    if ok.sum() > 1:
        m = combined[ok].double().mean().to(combined.dtype)
        s = combined[ok].double().std(unbiased=False).to(combined.dtype)
        combined = _safe_div(combined - m, s + eps)
    return _finish(combined, combined_reward(rewards_NR, weights_NR, group_ids_N), clip)


def compute_advantages(name: str, rewards_NR, group_ids_N, weights_NR, eps: float, clip: float) -> AdvantageOutput:
    return ADVANTAGES.get(name)(rewards_NR, group_ids_N, weights_NR, eps=eps, clip=clip)
