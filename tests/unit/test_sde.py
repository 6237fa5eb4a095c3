"""Stateless flow SDE math: log-probs against torch.distributions, ODE limits, CPS coefficients,
marginal preservation of the reverse SDEs on a Gaussian toy problem, schedules against diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from imagerl.policies.flow import sde

SDES = ("flow_grpo", "dance", "cps")


def _xv(n=5, shape=(4, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)


@pytest.mark.parametrize("kind", SDES)
def test_log_prob_matches_torch_normal(kind):
    x, v, z = _xv()
    sig = torch.tensor([0.9, 0.8, 0.5, 0.3, 0.95])
    sig_n = sig - torch.tensor([0.1, 0.05, 0.2, 0.1, 0.3])
    st = sde.get_step_fn(kind)(x, v, sig, sig_n, 0.7, noise=z)
    assert st.std.shape == (5,) and st.log_prob.shape == (5,) and st.prev_sample.shape == x.shape
    ref = torch.distributions.Normal(st.mean, st.std.reshape(5, 1, 1, 1)).log_prob(st.prev_sample).reshape(5, -1).mean(1)
    torch.testing.assert_close(st.log_prob, ref, rtol=1e-5, atol=1e-5)
    # scoring the stored sample (prev_sample=...) gives the same density as sampling it
    again = sde.get_step_fn(kind)(x, v, sig, sig_n, 0.7, prev_sample=st.prev_sample)
    torch.testing.assert_close(again.log_prob, st.log_prob)
    torch.testing.assert_close(again.mean, st.mean)


def test_flow_grpo_std_formula_and_sigma_cap():
    x, v, z = _xv(n=3)
    sig, sig_n = torch.tensor([0.8, 0.5, 1.0]), torch.tensor([0.6, 0.4, 0.9])
    st = sde.flow_grpo_step(x, v, sig, sig_n, 0.7, noise=z, sigma_cap=0.96)
    # sigma == 1 uses the cap in the denominator only (Flow-GRPO's code: sqrt(sigma / (1 - sigma_max)))
    want = 0.7 * torch.sqrt(sig / (1 - torch.tensor([0.8, 0.5, 0.96]))) * torch.sqrt(sig - sig_n)
    torch.testing.assert_close(st.std, want)
    assert torch.isfinite(st.log_prob).all()


def test_dance_std_is_constant_diffusion_times_sqrt_dt():
    # DanceGRPO: g = eta (no sigma dependence), std = eta * sqrt(sigma - sigma_next)
    x, v, z = _xv(n=3)
    sig, sig_n = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.4, 0.0])
    st = sde.dance_step(x, v, sig, sig_n, 0.3, noise=z)
    torch.testing.assert_close(st.std, 0.3 * torch.sqrt(sig - sig_n))


@pytest.mark.parametrize("kind", SDES)
def test_zero_noise_recovers_euler(kind):
    x, v, z = _xv()
    sig, sig_n = torch.full((5,), 0.7), torch.full((5,), 0.55)
    st = sde.get_step_fn(kind)(x, v, sig, sig_n, 0.0, noise=z)
    euler = x + v * (sig_n - sig).reshape(5, 1, 1, 1)
    torch.testing.assert_close(st.prev_sample, euler, rtol=1e-6, atol=1e-6)
    assert (st.std == 0).all() and (st.log_prob == 0).all()
    torch.testing.assert_close(sde.ode_step(x, v, 0.7, 0.55).prev_sample, euler, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", SDES)
def test_small_noise_converges_to_euler(kind):
    x, v, z = _xv()
    euler = sde.ode_step(x, v, 0.7, 0.55).prev_sample
    errs = [(sde.get_step_fn(kind)(x, v, 0.7, 0.55, a, noise=z).prev_sample - euler).abs().max() for a in (1e-1, 1e-2, 1e-3)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2


def test_cps_preserves_coefficients():
    # exact velocity of x = (1-s) x0 + s eps: the step output is (1-s') x0 + [sqrt(s'^2-n^2) eps + n z]
    g = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(4, 2, 8, 8, generator=g) for _ in range(3))
    s, s_n, eta = 0.8, 0.5, 0.6
    x = (1 - s) * x0 + s * eps
    st = sde.cps_step(x, eps - x0, s, s_n, eta, noise=z)
    n = s_n * math.sin(eta * math.pi / 2)
    torch.testing.assert_close(st.std, torch.full((4,), n))
    noise_coef = math.sqrt(s_n**2 - n**2)
    torch.testing.assert_close(st.prev_sample, (1 - s_n) * x0 + noise_coef * eps + n * z, rtol=1e-5, atol=1e-5)
    assert abs(noise_coef**2 + n**2 - s_n**2) < 1e-7  # total noise std is exactly sigma_next
    # sigma_next = 0: deterministic, exactly x0_hat
    last = sde.cps_step(x, eps - x0, s, 0.0, eta, noise=z)
    assert (last.std == 0).all()
    torch.testing.assert_close(last.prev_sample, x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,level", [("flow_grpo", 0.7), ("dance", 0.5)])
def test_sde_step_preserves_marginal_on_gaussian_data(kind, level):
    """x0 ~ N(0, c^2): x_s ~ N(0, ((1-s)c)^2 + s^2) and the exact velocity is linear in x. One small step
    from the exact marginal at s must land (up to discretisation) on the marginal at s_next; a wrong sign
    in the drift correction would inflate or shrink the variance by O(level^2 * dt).
    (CPS is not an SDE discretisation: it re-noises with std up to sigma_next in one step and keeps the
    marginal only with the true x0, which test_cps_preserves_coefficients checks.)"""
    c, s, s_n, n = 0.5, 0.6, 0.58, 400_000
    var = lambda t: ((1 - t) * c) ** 2 + t**2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g) * math.sqrt(var(s))
    v = x * (s - (1 - s) * c**2) / var(s)  # E[eps - x0 | x_s]
    st = sde.get_step_fn(kind)(x, v, s, s_n, level, noise=torch.randn(n, 1, generator=g))
    got = st.prev_sample.var().item()
    ode_only = sde.ode_step(x, v, s, s_n).prev_sample.var().item()
    assert abs(got - var(s_n)) < 0.01 * var(s_n), (got, var(s_n))
    assert abs(ode_only - var(s_n)) < 0.01 * var(s_n)


def test_log_prob_zero_std_rows_are_zero():
    x = torch.randn(3, 4)
    lp = sde.gaussian_log_prob(x, x + 1, torch.tensor([0.0, 1.0, 0.0]))
    assert lp[0] == 0 and lp[2] == 0 and lp[1] < 0


def test_sigma_schedule_static_shift_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for n in (1, 4, 10, 40):
        ours = sde.sigma_schedule(n, shift=3.0)
        assert ours.shape == (n + 1,) and ours[0] == 1 and ours[-1] == 0 and (ours[1:] < ours[:-1]).all()
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sch.set_timesteps(sigmas=torch.linspace(1, 1 / n, n).tolist())
        torch.testing.assert_close(ours, sch.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_sigma_schedule_dynamic_mu_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    mu = sde.dynamic_shift_mu(4096)  # 1024 px FLUX: max_shift
    assert abs(mu - 1.15) < 1e-9 and abs(sde.dynamic_shift_mu(256) - 0.5) < 1e-9
    ours = sde.sigma_schedule(8, mu=mu)
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sch.set_timesteps(sigmas=torch.linspace(1, 1 / 8, 8).tolist(), mu=mu)
    torch.testing.assert_close(ours, sch.sigmas.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        sde.shift_sigmas(torch.ones(2), shift=3.0, mu=1.0)


def test_step_std_and_unknown_kind():
    s = sde.sigma_schedule(4, shift=3.0)
    std = sde.step_std("cps", s[:-1], s[1:], torch.full((4,), 0.5))
    assert std.shape == (4,) and (std[:3] > 0).all() and std[3] == 0  # CPS last step is deterministic
    assert (sde.step_std("ode", s[:-1], s[1:], torch.full((4,), 0.5)) == 0).all()
    with pytest.raises(ValueError, match="rollout.sde"):
        sde.get_step_fn("ddim")


@pytest.mark.parametrize("window,rng,num_steps,starts", [
    (2, [0, 5], 10, {0, 1, 2, 3}),       # Flow-GRPO's Qwen-Image setting: the whole window in the first half
    (3, [], 6, {0, 1, 2, 3}),            # [] = anywhere
    (2, [4, 20], 8, {4, 5, 6}),          # hi capped at num_steps (a smoke test with fewer steps keeps running)
    (3, [2, 5], 6, {2}),                 # exactly one position
])
def test_sde_window_lies_inside_its_range(window, rng, num_steps, starts):
    """The SDE window [start, start + w) lies inside sde_window_range = [lo, hi) (Flow-GRPO / MixGRPO's
    convention, start drawn in [lo, hi - w]), every such start is drawn, and the noise level is 0 outside."""
    from types import SimpleNamespace

    from imagerl.policies.flow.base import FlowPolicy

    ro = SimpleNamespace(noise_level=0.7, sde_window=window, sde_window_range=rng)
    me = SimpleNamespace(cfg=SimpleNamespace(rollout=ro))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        level, sde_mask = FlowPolicy._sde_plan(me, num_steps, "flow_grpo", g)
        idx = sde_mask.nonzero().reshape(-1).tolist()
        assert idx == list(range(idx[0], idx[0] + window)) and torch.all(level[sde_mask] == 0.7)
        seen.add(idx[0])
    assert seen == starts


@pytest.mark.parametrize("window,rng,num_steps,starts", [
    (1, [], 4, {0, 1, 2}),       # never the last step, which CPS takes without noise (nothing would train)
    (2, [1, 10], 4, {1}),        # nor a window that would lose it
    (2, [2, 4], 4, {2}),         # unless the range leaves no other place: then one of its steps trains
])
def test_cps_window_avoids_its_deterministic_last_step(window, rng, num_steps, starts):
    from types import SimpleNamespace

    from imagerl.policies.flow.base import FlowPolicy

    me = SimpleNamespace(cfg=SimpleNamespace(rollout=SimpleNamespace(noise_level=0.7, sde_window=window,
                                                                     sde_window_range=rng)))
    g = torch.Generator().manual_seed(0)
    assert {int(FlowPolicy._sde_plan(me, num_steps, "cps", g)[1].nonzero()[0]) for _ in range(100)} == starts


def test_cps_window_range_at_the_last_step_only_is_refused():
    # (the window would sit on the noise-free last step: a rollout with nothing to train, silently)
    from types import SimpleNamespace

    from imagerl.policies.flow.base import FlowPolicy

    me = SimpleNamespace(cfg=SimpleNamespace(rollout=SimpleNamespace(noise_level=0.7, sde_window=1, sde_window_range=[3, 4])))
    with pytest.raises(ValueError, match=r"rollout.sde_window_range=\[3, 4\] holds only the last of rollout.num_steps=4 "
                                         r"steps, which CPS takes without noise"):
        FlowPolicy._sde_plan(me, 4, "cps", torch.Generator())
    assert FlowPolicy._sde_plan(me, 4, "flow_grpo", torch.Generator())[1].tolist() == [False, False, False, True]


def test_sde_window_range_that_holds_no_window_names_the_fields():
    from types import SimpleNamespace

    from imagerl.policies.flow.base import FlowPolicy

    ro = SimpleNamespace(noise_level=0.7, sde_window=3, sde_window_range=[4, 6])
    with pytest.raises(ValueError, match=r"rollout.sde_window_range=\[4, 6\] holds no window of rollout.sde_window=3"):
        FlowPolicy._sde_plan(SimpleNamespace(cfg=SimpleNamespace(rollout=ro)), 10, "flow_grpo", torch.Generator())
