"""Rewards built from other rewards: weighted sum, gate, product, and max-deviation selection.

Children are nested reward specs, exactly like top-level ``rewards[]`` entries::

    type: weighted_sum
    args:
      children:
        - {type: ocr, weight: 2.0}
        - {type: clip_score, args: {tiny: true}}

Each combination is a pure function over a [N, K] score table (one column per child) so that its NaN
("abstain") semantics can be read and tested on hand-computed tables:

- `weighted_sum_scores`: ``nan_mode="skip"`` (default): a child that abstained on a sample others scored counts
  as its mean over the sample's group (the batch's if the group has none; no group ids = one group), the rule of
  the top-level total (`algorithms.advantages.combined_reward`), so an abstaining penalty is never a bonus;
  ``"any"`` abstains when any child abstains. All children abstain -> NaN.
- `gated_scores`: the value counts only where the gate reward is >= threshold, else ``below`` (0); a gate
  that abstains makes the sample abstain; a passed gate with an abstaining value abstains.
- `product_scores`: prod_k s_k ** w_k (weights are exponents); any abstaining child -> NaN.
- `max_deviation_scores`: our design (not from a paper): every child's scores are normalised within each
  group, z = (s - mean_g) / (std_g + eps), scaled by the child's weight, and each sample takes the value of
  the child whose |w z| is largest, i.e. the reward that says the most about that sample relative to its
  siblings. It returns a group-normalised value (an advantage-like number, not in the children's units).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..types import RewardInput, RewardOutput
from .base import Reward, build_reward, building_field, check_scores, run_sync

# --------------------------------------------------------------------------------------------------
# Pure combination rules: scores_NK [N, K] float (NaN = abstain) in, [N] out
# --------------------------------------------------------------------------------------------------


def weighted_sum_scores(scores_NK: torch.Tensor, weights_K: torch.Tensor, nan_mode: str = "skip",
                        group_ids_N: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w_k s_k per sample, with abstaining children handled per `nan_mode` ("skip" or "any")."""
    from ..algorithms.advantages import combined_reward

    w_NK = weights_K.to(scores_NK).expand_as(scores_NK)
    if nan_mode == "any":
        total_N = (scores_NK * w_NK).sum(1)  # NaN propagates
        return total_N
    if nan_mode != "skip":
        raise ValueError(f"nan_mode must be 'skip' or 'any', got '{nan_mode}'")
    return combined_reward(scores_NK, w_NK, group_ids_N)


def gated_scores(gate_N: torch.Tensor, value_N: torch.Tensor, threshold: float, below: float = 0.0) -> torch.Tensor:
    """value where gate >= threshold, `below` where gate < threshold, NaN where the gate abstains."""
    passed_N = gate_N >= threshold  # False for NaN
    out_N = torch.where(passed_N, value_N, torch.full_like(value_N, below))
    return torch.where(torch.isnan(gate_N), torch.full_like(out_N, math.nan), out_N)


def product_scores(scores_NK: torch.Tensor, exponents_K: torch.Tensor) -> torch.Tensor:
    """prod_k s_k ** e_k; NaN where any child abstains. A negative score under a non-integer exponent
    has no real power: that is a configuration error (ValueError), not an abstain."""
    e_NK = exponents_K.to(scores_NK).expand_as(scores_NK)
    bad = (scores_NK < 0) & (e_NK != torch.round(e_NK))
    if bad.any():
        k = int(bad.nonzero()[0, 1])
        raise ValueError(f"product: child {k} has a negative score and a non-integer weight (exponent); "
                         f"use integer weights or rewards in [0, inf)")
    zero = (scores_NK == 0) & (e_NK < 0)
    if zero.any():
        k = int(zero.nonzero()[0, 1])
        raise ValueError(f"product: child {k} scored 0 under a negative weight (exponent): 0 ** w is infinite; use "
                         f"weights > 0 (or a reward that stays above 0)")
    # (any abstaining child -> NaN, also one with weight 0: NaN ** 0 is 1 in torch, which would score the abstain)
    out = torch.pow(scores_NK, e_NK).prod(1)
    return torch.where(torch.isnan(scores_NK).any(1), torch.full_like(out, math.nan), out)


@dataclass
class MaxDeviationResult:
    scores: torch.Tensor  # [N] w_k* z_k* of the chosen child, NaN where every child abstains
    chosen: torch.Tensor  # [N] long, index of the chosen child, -1 where none
    z: torch.Tensor  # [N, K] group-normalised child scores (NaN where the child abstains)


def group_normalize(scores_NK: torch.Tensor, group_N: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(s - group mean) / (group population std + eps) per column, ignoring NaN entries.

    A child with one valid value in a group (or all equal) gets z = 0 there: it carries no information
    about how that sample compares with its siblings."""
    z_NK = torch.full_like(scores_NK, math.nan)
    for g in torch.unique(group_N):
        rows = group_N == g
        s_GK = scores_NK[rows]
        valid_GK = ~torch.isnan(s_GK)
        cnt_K = valid_GK.sum(0).clamp_min(1)
        x_GK = torch.nan_to_num(s_GK)
        mean_K = x_GK.sum(0) / cnt_K
        var_K = (torch.where(valid_GK, x_GK - mean_K, torch.zeros_like(x_GK)) ** 2).sum(0) / cnt_K
        z_GK = (s_GK - mean_K) / (var_K.sqrt() + eps)
        z_NK[rows] = torch.where(valid_GK, z_GK, torch.full_like(z_GK, math.nan))
    return z_NK


def max_deviation_scores(scores_NK: torch.Tensor, group_N: torch.Tensor, weights_K: torch.Tensor,
                         eps: float = 1e-6) -> MaxDeviationResult:
    """Per sample, the weighted group-normalised score of the child that deviates most from its group mean
    (ties go to the lower child index). See the module docstring; our design."""
    z_NK = group_normalize(scores_NK, group_N, eps)
    y_NK = z_NK * weights_K.to(z_NK)
    mag_NK = torch.nan_to_num(y_NK.abs(), nan=-1.0)  # abstaining children never win
    chosen_N = mag_NK.argmax(1)
    none_N = torch.isnan(y_NK).all(1)
    out_N = y_NK.gather(1, chosen_N[:, None])[:, 0]
    out_N = torch.where(none_N, torch.full_like(out_N, math.nan), out_N)
    return MaxDeviationResult(out_N, torch.where(none_N, torch.full_like(chosen_N, -1), chosen_N), z_NK)


# --------------------------------------------------------------------------------------------------
# Reward classes
# --------------------------------------------------------------------------------------------------


def _spec_weight(spec: Any, where: str) -> float:
    w = spec.get("weight", 1.0) if isinstance(spec, dict) else getattr(spec, "weight", 1.0)
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.weight must be a number, got {w!r}") from None
    if not math.isfinite(w):
        raise ValueError(f"{where}.weight={w} must be a finite number")
    return w


class _Combination(Reward):
    """Builds the children, scores them (concurrently when any is remote) and logs their details."""

    def __init__(self, name: str, specs: list[tuple[str, Any]]) -> None:
        super().__init__(name)
        self.children: list[Reward] = []
        self.child_weights: list[float] = []
        parent = building_field() or f"reward '{self.name}'"  # (e.g. rewards[0], when built from the config)
        for label, spec in specs:
            where = f"{parent}.args.{label}"
            if not (isinstance(spec, dict) or hasattr(spec, "type")) or (isinstance(spec, dict) and "type" not in spec):
                raise ValueError(f"{where}: expected a reward spec like {{type: ocr, weight: 1.0, args: {{}}}}, got {spec!r}")
            # errors read e.g. rewards[0].args.children[1].args.x: the path in the user's YAML
            self.children.append(build_reward(spec, field=where))
            self.child_weights.append(_spec_weight(spec, where))
        seen: set[str] = set()
        for k, c in enumerate(self.children):  # unique names, so details do not collide
            if c.name in seen:
                c.name = f"{c.name}_{k}"
            seen.add(c.name)
        self.is_remote = any(c.is_remote for c in self.children)

    def _combine(self, group_ids: torch.Tensor | None, scores_NK: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def rescore(self, details: dict[str, Any], group_ids: torch.Tensor) -> torch.Tensor | None:
        """Recombine the children's per-sample scores (`<child>/score`, children rescored first) over the batch."""
        cols = []
        for c in self.children:
            own = Reward.own_details(details, c.name)
            again = c.rescore(own, group_ids)
            col = again if again is not None else own.get("score")
            if col is None or len(col) != len(group_ids):
                return None
            cols.append(torch.as_tensor(col, dtype=torch.float32))
        return self._combine(group_ids, torch.stack(cols, 1))[0]

    def _finish(self, inp: RewardInput, outs: list[RewardOutput]) -> RewardOutput:
        for c, o in zip(self.children, outs):  # (score_async bypasses __call__'s check; inf would become float max)
            check_scores(f"{self.name}.{c.name}", o, len(inp))
        scores_NK = torch.stack([o.scores for o in outs], 1) if outs else torch.zeros(len(inp), 0)
        combined_N, extra = self._combine(inp.group_ids, scores_NK)
        details: dict[str, Any] = dict(extra)
        for c, o in zip(self.children, outs):
            details[f"{c.name}/score"] = o.scores.tolist()
            for k, v in o.details.items():
                details[f"{c.name}/{k}"] = v
        return RewardOutput(scores=combined_N, details=details)

    def score(self, inp: RewardInput) -> RewardOutput:
        if self.is_remote:
            return run_sync(self.score_async(inp))
        return self._finish(inp, [c(inp) for c in self.children])

    async def score_async(self, inp: RewardInput) -> RewardOutput:
        outs = await asyncio.gather(*(c.score_async(inp) for c in self.children))
        return check_scores(self.name, self._finish(inp, list(outs)), len(inp))

    def close(self) -> None:
        for c in self.children:
            c.close()


def _child_specs(children: list[Any], name: str) -> list[tuple[str, Any]]:
    if not isinstance(children, (list, tuple)) or not children:
        raise ValueError(f"reward '{name}': args.children must be a non-empty list of reward specs ({{type, name, weight, args}})")
    return [(f"children[{k}]", s) for k, s in enumerate(children)]


class WeightedSum(_Combination):
    """``weighted_sum``: sum_k weight_k * child_k. ``nan_mode``: ``skip`` (default; an abstaining child counts as
    its group's mean of that child) or ``any`` (any abstain -> NaN)."""

    def __init__(self, *, children: list[dict[str, Any]], name: str = "", nan_mode: str = "skip") -> None:
        if nan_mode not in ("skip", "any"):
            raise ValueError(f"reward '{name}': args.nan_mode must be 'skip' or 'any', got '{nan_mode}'")
        super().__init__(name, _child_specs(children, name or "weighted_sum"))
        self.nan_mode = nan_mode

    def _combine(self, group_ids: torch.Tensor | None, scores_NK: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return weighted_sum_scores(scores_NK, torch.tensor(self.child_weights), self.nan_mode, group_ids), {}


class Gated(_Combination):
    """``gated``: the ``value`` reward where the ``gate`` reward >= ``threshold``, else ``below`` (default 0).
    A gate that abstains -> NaN. Example: count aesthetic quality only when OCR found the text.
    ``details["gate_passed"]``: how many samples passed the gate."""

    def __init__(self, *, gate: dict[str, Any], value: dict[str, Any], name: str = "", threshold: float = 0.5,
                 below: float = 0.0) -> None:
        super().__init__(name, [("gate", gate), ("value", value)])
        self.threshold, self.below = float(threshold), float(below)

    def _combine(self, group_ids: torch.Tensor | None, scores_NK: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        gate_N, value_N = scores_NK[:, 0], scores_NK[:, 1]
        # counts, not rates: the trainer adds scalar details up over the micro-batches of a step
        passed = int((gate_N >= self.threshold).sum())
        return gated_scores(gate_N, value_N, self.threshold, self.below), {"gate_passed": passed}


class Product(_Combination):
    """``product``: prod_k child_k ** weight_k (weights are exponents, default 1); any abstain -> NaN."""

    def __init__(self, *, children: list[dict[str, Any]], name: str = "") -> None:
        super().__init__(name, _child_specs(children, name or "product"))

    def _combine(self, group_ids: torch.Tensor | None, scores_NK: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return product_scores(scores_NK, torch.tensor(self.child_weights)), {}


class MaxDeviation(_Combination):
    """``max_deviation``: per sample, the weighted group-normalised score of the child deviating most from
    its group mean (our design; see the module docstring). Groups come from ``RewardInput.group_ids``
    (the whole batch is one group when absent). ``details["chosen/<child>"]``: how many samples took
    each child."""

    def __init__(self, *, children: list[dict[str, Any]], name: str = "", eps: float = 1e-6) -> None:
        super().__init__(name, _child_specs(children, name or "max_deviation"))
        self.eps = float(eps)

    def _combine(self, group_ids: torch.Tensor | None, scores_NK: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        n = scores_NK.shape[0]
        group_N = group_ids.reshape(-1).cpu() if group_ids is not None else torch.zeros(n, dtype=torch.long)
        res = max_deviation_scores(scores_NK, group_N, torch.tensor(self.child_weights), self.eps)
        extra = {f"chosen/{c.name}": int((res.chosen == k).sum()) for k, c in enumerate(self.children)}  # counts
        return res.scores, extra
