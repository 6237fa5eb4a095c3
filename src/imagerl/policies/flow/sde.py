"""Stateless math of flow-matching sampling for RL: sigma schedules, SDE/ODE steps, Gaussian log-probs.

Convention (rectified flow, as SD3/FLUX/Qwen-Image): x_sigma = (1 - sigma) * x0 + sigma * eps, the model
predicts the velocity v = eps - x0, sampling runs sigma from 1 (noise) to 0 (data). One step goes from
`sigma` to `sigma_next < sigma`; `dt = sigma_next - sigma` is negative. From (x, v) the model's estimates
are x0_hat = x - sigma * v and eps_hat = x + (1 - sigma) * v.

Every function takes tensors (and plain numbers) and returns tensors or a typed record; nothing keeps a
step counter (diffusers schedulers do, which replay cannot use). `sigma`, `sigma_next` and `noise_level`
may be Python floats or tensors of shape [N] (one value per sample); they are broadcast over the latent
dims. Transitions are computed in float32 whatever the model's dtype: the log-density of a 1e-2-wide
Gaussian in bf16 would be mostly rounding error.

Steps (each returns `SDEStep(prev_sample, mean, std, log_prob)`):

- `flow_grpo_step`  Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"):
  the reverse-time SDE with the same marginals as the flow ODE, diffusion g = a * sqrt(sigma / (1 - sigma)),
  mean = x + (v + g^2 / (2 sigma) * (x + (1 - sigma) v)) dt, std = g * sqrt(|dt|).
  At sigma = 1 the diffusion is infinite; like the paper's code we put `sigma_cap` (the schedule's second
  sigma, passed in explicitly to stay stateless) in the denominator there: g = a * sqrt(1 / (1 - sigma_cap)).
- `dance_step`  DanceGRPO (Xue et al. 2025): the same reverse SDE with constant diffusion g = eta,
  mean = x + (v + eta^2 / (2 sigma) * eps_hat) dt, std = eta * sqrt(|dt|).
- `cps_step`  Coefficients-Preserving Sampling (Wang & Yu 2025, "Coefficients-Preserving Sampling for
  Reinforcement Learning with Flow Matching"): x_next = (1 - s') x0_hat + sqrt(s'^2 - n^2) eps_hat + n * z
  with n = sigma_next * sin(eta * pi / 2), so the sample keeps the exact coefficients of x_{sigma_next}
  (the injected and predicted noise together have std sigma_next). At sigma_next = 0 the step is
  deterministic (std 0): callers treat it as an ODE step.
- `ode_step`  the deterministic Euler step x + v dt (every SDE above reduces to it at noise level 0).

`log_prob` of the realised next sample under N(mean, std^2) is averaged over latent elements (not summed),
as Flow-GRPO and DanceGRPO do, which keeps ratios and KL on a per-element scale independent of resolution.
A deterministic step (std == 0) has no density; its log-prob is reported as 0 and must be masked out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Scalar = float | torch.Tensor

SDE_KINDS = ("flow_grpo", "cps", "dance", "ode")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStep:
    """One transition x_sigma -> x_sigma_next."""

    prev_sample: torch.Tensor  # [N, ...] the realised next latent (float32)
    mean: torch.Tensor  # [N, ...] transition mean (float32, differentiable w.r.t. the velocity)
    std: torch.Tensor  # [N] transition std per sample (0 for deterministic steps)
    log_prob: torch.Tensor  # [N] Gaussian log-density of prev_sample, averaged over latent elements


# ----------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor, shift: float | None = None, mu: float | None = None) -> torch.Tensor:
    """Resolution-dependent timestep shift, applied to sigmas in [0, 1].

    Static shift (SD3, Esser et al. 2024): sigma' = s * sigma / (1 + (s - 1) * sigma).
    Dynamic shift (FLUX, Qwen-Image): sigma' = e^mu / (e^mu + (1 / sigma - 1)), i.e. the static shift
    with s = e^mu, where mu grows with the image token count (`dynamic_shift_mu`).
    """
    if (shift is None) == (mu is None):
        raise ValueError("shift_sigmas: give exactly one of shift (static, SD3) or mu (dynamic, FLUX/Qwen-Image)")
    s = math.exp(mu) if mu is not None else float(shift)
    return s * sigmas / (1 + (s - 1) * sigmas)


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu linear in the number of image tokens (FLUX defaults; Qwen-Image uses max_seq_len 8192,
    max_shift 0.9). Values outside [base_seq_len, max_seq_len] extrapolate, as in diffusers."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def sigma_schedule(num_steps: int, shift: float | None = None, mu: float | None = None,
                   sigma_end: float | None = None) -> torch.Tensor:
    """[num_steps + 1] float32 sigmas from 1 down to 0 (last entry exactly 0).

    Unshifted sigmas are linspace(1, sigma_end, num_steps), then shifted. sigma_end defaults to 1/num_steps, what
    the FLUX and Qwen-Image pipelines pass; the SD3 pipeline passes no sigmas, and its scheduler interpolates down
    to its shifted smallest training sigma instead (`sd3_sigma_end`): every sigma differs from the 1/num_steps
    schedule, and its last step before 0 is much shorter (0.009 against 0.25 at 10 steps and shift 3).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    end = 1.0 / num_steps if sigma_end is None else float(sigma_end)
    base = torch.linspace(1.0, end, num_steps, dtype=torch.float64)
    if shift is not None or mu is not None:
        base = shift_sigmas(base, shift=shift, mu=mu)
    return torch.cat([base, base.new_zeros(1)]).float()


def sd3_sigma_end(shift: float | None, num_train_timesteps: int = 1000) -> float:
    """Where diffusers' FlowMatchEulerDiscreteScheduler (static shift, as configured for SD3 / SD3.5) ends its
    interpolation when a pipeline passes no sigmas: its smallest training sigma 1/num_train_timesteps, shifted.
    (set_timesteps then shifts the interpolated sigmas once more, which sigma_schedule does too.)"""
    s = 1.0 / num_train_timesteps
    return s if shift is None else float(shift) * s / (1 + (float(shift) - 1) * s)


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------


def _bc(x: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A float or [N] tensor as float32 [N, 1, 1, ...] (or a 0-d tensor) broadcastable against `like`."""
    t = torch.as_tensor(x, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def _per_sample(x: torch.Tensor, n: int) -> torch.Tensor:
    """[N, 1, ...] or 0-d -> [N]."""
    return x.reshape(-1).expand(n).clone() if x.numel() == 1 else x.reshape(n)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std^2) averaged over all but the first dim -> [N]; `std` is [N].

    Rows with std == 0 (deterministic steps) return 0: they have no density and are masked out."""
    n = sample.shape[0]
    std_b = _bc(std, sample)
    safe = torch.where(std_b > 0, std_b, torch.ones_like(std_b))
    lp = -((sample.float() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI
    lp = lp.reshape(n, -1).mean(1)
    return torch.where(std.reshape(n) > 0, lp, torch.zeros_like(lp))


def _finish(
    x: torch.Tensor, mean: torch.Tensor, std_b: torch.Tensor, noise: torch.Tensor | None, prev_sample: torch.Tensor | None
) -> SDEStep:
    n = x.shape[0]
    std = _per_sample(std_b, n)
    if prev_sample is None:
        if noise is None:
            raise ValueError("give `noise` (to sample) or `prev_sample` (to score a stored sample)")
        prev_sample = mean + std_b * noise.float()
    prev_sample = prev_sample.float()
    return SDEStep(prev_sample=prev_sample, mean=mean, std=std, log_prob=gaussian_log_prob(prev_sample, mean, std))


def ode_step(
    x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar, noise_level: Scalar = 0.0,
    noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None, sigma_cap: Scalar | None = None,
) -> SDEStep:
    """Deterministic Euler step x + v * (sigma_next - sigma); std 0, log_prob 0 (unused arguments accepted
    so every step function has one signature)."""
    x32, v32 = x.float(), v.float()
    dt = _bc(sigma_next, x32) - _bc(sigma, x32)
    mean = x32 + v32 * dt
    zero = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    out = mean if prev_sample is None else prev_sample.float()
    return SDEStep(prev_sample=out, mean=mean, std=zero, log_prob=zero.clone())


def _reverse_sde(x32: torch.Tensor, v32: torch.Tensor, sig: torch.Tensor, dt: torch.Tensor, g: torch.Tensor):
    """Mean of the Euler-Maruyama step of the reverse SDE with diffusion g whose marginals match the flow:
    dx = [v + g^2/(2 sigma) * eps_hat] dt + g dW, eps_hat = x + (1 - sigma) v (the score is -eps_hat/sigma)."""
    eps_hat = x32 + (1 - sig) * v32
    return x32 + (v32 + g**2 / (2 * sig) * eps_hat) * dt


def flow_grpo_step(
    x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar, noise_level: Scalar,
    noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None, sigma_cap: Scalar | None = None,
) -> SDEStep:
    """Flow-GRPO SDE step (see module docstring). `noise_level` is the paper's a (0.7 for SD3.5-M).

    `sigma_cap` replaces sigma in the denominator of sqrt(sigma / (1 - sigma)) where sigma == 1 (Flow-GRPO's
    code: the schedule's second sigma; the numerator stays 1); without it 1 - 1e-3 is used there."""
    x32, v32 = x.float(), v.float()
    sig, sig_n = _bc(sigma, x32), _bc(sigma_next, x32)
    dt = sig_n - sig
    cap = _bc(sigma_cap, x32) if sigma_cap is not None else torch.full_like(sig, 1 - 1e-3)
    sig_for_g = torch.where(sig >= 1, cap, sig)
    g = _bc(noise_level, x32) * torch.sqrt(sig / (1 - sig_for_g))
    mean = _reverse_sde(x32, v32, sig, dt, g)
    std_b = g * torch.sqrt(-dt)
    return _finish(x32, mean, std_b, noise, prev_sample)


def dance_step(
    x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar, noise_level: Scalar,
    noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None, sigma_cap: Scalar | None = None,
) -> SDEStep:
    """DanceGRPO SDE step: constant diffusion eta = `noise_level` (the paper uses 0.3)."""
    x32, v32 = x.float(), v.float()
    sig, sig_n = _bc(sigma, x32), _bc(sigma_next, x32)
    dt = sig_n - sig
    g = _bc(noise_level, x32) * torch.ones_like(sig)
    mean = _reverse_sde(x32, v32, sig, dt, g)
    std_b = g * torch.sqrt(-dt)
    return _finish(x32, mean, std_b, noise, prev_sample)


def cps_step(
    x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar, noise_level: Scalar,
    noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None, sigma_cap: Scalar | None = None,
) -> SDEStep:
    """Coefficients-preserving step: `noise_level` is eta in [0, 1] (injected std = sigma_next sin(eta pi/2))."""
    x32, v32 = x.float(), v.float()
    sig, sig_n = _bc(sigma, x32), _bc(sigma_next, x32)
    x0_hat = x32 - sig * v32
    eps_hat = x32 + (1 - sig) * v32
    std_b = sig_n * torch.sin(_bc(noise_level, x32) * (math.pi / 2)) * torch.ones_like(sig)
    mean = (1 - sig_n) * x0_hat + torch.sqrt((sig_n**2 - std_b**2).clamp_min(0)) * eps_hat
    return _finish(x32, mean, std_b, noise, prev_sample)


StepFn = Callable[..., SDEStep]
STEP_FNS: dict[str, StepFn] = {"flow_grpo": flow_grpo_step, "cps": cps_step, "dance": dance_step, "ode": ode_step}


def get_step_fn(kind: str) -> StepFn:
    if kind not in STEP_FNS:
        raise ValueError(f"rollout.sde='{kind}' is not a known SDE; choose one of {', '.join(SDE_KINDS)}")
    return STEP_FNS[kind]


def step_std(kind: str, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: torch.Tensor | float,
             sigma_cap: Scalar | None = None) -> torch.Tensor:
    """The transition std of `kind` at each (sigma, sigma_next) without a model call ([S] -> [S]).

    Used to decide which steps carry a density (std > 0) before sampling."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    dummy = torch.zeros(sigma.shape[0], 1)
    return get_step_fn(kind)(dummy, dummy, sigma, sigma_next, noise_level, noise=torch.zeros_like(dummy),
                             sigma_cap=sigma_cap).std
