"""KL penalties against the reference policy, per trained unit. Tensors in, tensors out.

Token-level estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence", 2020),
with delta = ref_logp - logp (for image tokens; a flow step's log-prob is a mean over latent elements, of which
these estimate no KL, so flow policies refuse them):
    k1 = -delta                      unbiased, high variance, can be negative
    k2 = delta^2 / 2                 biased, low variance
    k3 = exp(delta) - delta - 1      unbiased, non-negative (GRPO's choice)
As loss terms (their gradient, sample by sample, with samples drawn from pi):
    k1: a plain -delta would have gradient grad(logp), which averages to ZERO under pi: no pull toward the
        reference, only noise. Its loss term adds the score-function term sg(k1) * (logp - sg(logp)) (value 0),
        so its expected gradient is grad KL(pi || ref), as k2's is; the value stays k1.
    k2: expected gradient = grad KL(pi || ref) exactly.
    k3: expected gradient = grad KL(pi_ref || pi), the reverse direction (as in DeepSeekMath's GRPO); it also
        pulls toward the reference, more strongly where pi puts less mass than the reference.
(tests/unit/test_losses_kl.py computes these expectations exactly on a small categorical.)
Flow policies (Gaussian transitions with a shared std):
    mean      KL(N(mu, s^2) || N(mu_ref, s^2)) = ||mu - mu_ref||^2 / (2 s^2), averaged over latent elements
              (the closed form of the Flow-GRPO paper);
    mean_dt   mean x |sigma_next - sigma|: what Flow-GRPO's code computes for its SDE, which divides by
              2 g^2 (the diffusion coefficient) instead of the transition variance g^2 |dt|. Its beta = 0.04
              was tuned with this, which is 1/|dt| weaker per step than `mean` (about 4x to 25x over the first
              nine of 10 steps of the SD3 schedule, over 100x at the last). Only for rollout.sde=flow_grpo is it
              Flow-GRPO's: for CPS its code divides by the transition std itself (that is `mean`);
    velocity  ||v - v_ref||^2 averaged over latent elements (velocity space; it does not blow up where the
              transition std is tiny);
    velocity_var  the same / (2 s^2 + 1e-7): DeepGen-RL's default "v-based" KL, which its beta 5e-7 was tuned with.
"""

from __future__ import annotations

import torch

from ..registry import KL_ESTIMATORS
from ..types import LogProbOutput


@KL_ESTIMATORS.register("k1")
def kl_k1(cur: LogProbOutput, ref: LogProbOutput) -> torch.Tensor:
    logp = cur.logp.float()
    k1 = logp - ref.logp.float()
    return k1 + k1.detach() * (logp - logp.detach())  # (value k1; gradient (1 + k1) grad logp, see the docstring)


@KL_ESTIMATORS.register("k2")
def kl_k2(cur: LogProbOutput, ref: LogProbOutput) -> torch.Tensor:
    return 0.5 * (ref.logp.float() - cur.logp.float()) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(cur: LogProbOutput, ref: LogProbOutput) -> torch.Tensor:
    delta = (ref.logp.float() - cur.logp.float()).clamp(-20, 20)  # exp overflow guard; |delta| > 20 is already pathological
    return torch.exp(delta) - delta - 1.0


def _mean_over_latent(x: torch.Tensor, nk_dims: int = 2) -> torch.Tensor:
    return x.flatten(nk_dims).mean(-1) if x.dim() > nk_dims else x


def _unit_std(cur: LogProbOutput) -> torch.Tensor:
    """The transition std of each unit [N, K] (averaged over the latent when given per element)."""
    return _mean_over_latent(cur.std.float())


@KL_ESTIMATORS.register("mean")
def kl_gaussian_mean(cur: LogProbOutput, ref: LogProbOutput) -> torch.Tensor:
    if cur.mean is None or ref.mean is None or cur.std is None:
        raise RuntimeError("algorithm.kl_estimator=mean needs a flow policy (transition means and stds)")
    sq = _mean_over_latent((cur.mean.float() - ref.mean.float()) ** 2)  # [N, K]
    std = _unit_std(cur)
    # 0 where the step is deterministic (std 0, e.g. CPS's last step): those units carry no log-prob and are masked
    # out, and the KL of two point masses at different means is not a number to train on; a clamp gave 5e17 there
    var = std.pow(2)
    return torch.where(var > 0, sq / (2.0 * var.clamp_min(1e-30)), torch.zeros_like(sq))


@KL_ESTIMATORS.register("mean_dt")
def kl_gaussian_mean_dt(cur: LogProbOutput, ref: LogProbOutput) -> torch.Tensor:
    if cur.dt is None:
        raise RuntimeError("algorithm.kl_estimator=mean_dt needs a flow policy (transition step sizes)")
    return kl_gaussian_mean(cur, ref) * cur.dt.float()


@KL_ESTIMATORS.register("velocity_var")
def kl_velocity_var(cur: LogProbOutput, ref: LogProbOutput) -> torch.Tensor:
    # DeepGen-RL's default "v-based" KL (its trainer's (v - v_ref)^2 / (2 std^2 + 1e-7), std the transition's):
    # its beta 5e-7 was tuned with this scale, which is 1 / (2 std^2) larger than `velocity`'s
    if cur.velocity is None or ref.velocity is None or cur.std is None:
        raise RuntimeError("algorithm.kl_estimator=velocity_var needs a flow policy (velocities and transition stds)")
    return kl_velocity(cur, ref) / (2.0 * _unit_std(cur).pow(2) + 1e-7)


@KL_ESTIMATORS.register("velocity")
def kl_velocity(cur: LogProbOutput, ref: LogProbOutput) -> torch.Tensor:
    if cur.velocity is None or ref.velocity is None:
        raise RuntimeError("algorithm.kl_estimator=velocity needs a flow policy (velocity predictions)")
    return _mean_over_latent((cur.velocity.float() - ref.velocity.float()) ** 2)


def kl_per_unit(name: str, cur: LogProbOutput, ref: LogProbOutput) -> torch.Tensor:
    return KL_ESTIMATORS.get(name)(cur, ref)
