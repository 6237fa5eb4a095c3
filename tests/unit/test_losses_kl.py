"""Clipped surrogate, aggregation weights and KL estimators against hand-computed values."""

import math

import pytest
import torch

from imagerl.algorithms.kl import kl_per_unit
from imagerl.algorithms.losses import clipped_surrogate, unit_weights
from imagerl.types import LogProbOutput


def lp(x):
    return torch.tensor(x, dtype=torch.float32)


def test_symmetric_clip_table():
    # ratios 0.5, 1.0, 1.5 with A=+1 and A=-1, eps=0.2
    old = torch.zeros(2, 3)
    new = torch.log(lp([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]))
    t = clipped_surrogate(new, old, lp([1.0, -1.0]), 0.2, 0.2)
    # A>0: min(r, clip(r)) -> [0.5, 1, 1.2];  A<0: min(-r, -clip(r)) -> [-0.8, -1, -1.5]
    assert torch.allclose(t.loss, -lp([[0.5, 1.0, 1.2], [-0.8, -1.0, -1.5]]), atol=1e-6)
    assert t.clipped.tolist() == [[False, False, True], [True, False, False]]


def test_asymmetric_clip():
    new = torch.log(lp([[1.25, 0.7]]))
    t = clipped_surrogate(new, torch.zeros(1, 2), lp([1.0]), eps_low=0.2, eps_high=0.28)
    assert torch.allclose(t.loss, -lp([[1.25, 0.7]]), atol=1e-6)  # 1.25 < 1.28: unclipped; A>0 keeps low ratio
    t2 = clipped_surrogate(torch.log(lp([[1.4]])), torch.zeros(1, 1), lp([1.0]), 0.2, 0.28)
    assert t2.loss.item() == pytest.approx(-1.28)


def test_dual_clip_bounds_negative_advantage():
    new = torch.log(lp([[10.0]]))
    plain = clipped_surrogate(new, torch.zeros(1, 1), lp([-1.0]), 0.2, 0.2)
    assert plain.loss.item() == pytest.approx(10.0)
    dual = clipped_surrogate(new, torch.zeros(1, 1), lp([-1.0]), 0.2, 0.2, dual_clip=3.0)
    assert dual.loss.item() == pytest.approx(3.0)
    assert dual.clipped.all()
    pos = clipped_surrogate(new, torch.zeros(1, 1), lp([1.0]), 0.2, 0.2, dual_clip=3.0)
    assert pos.loss.item() == pytest.approx(-1.2)  # dual clip only touches A < 0


def test_gradient_zero_when_clipped():
    new = torch.log(lp([[1.5, 1.1]])).requires_grad_()
    t = clipped_surrogate(new, torch.zeros(1, 2), lp([1.0]), 0.2, 0.2)
    t.loss.sum().backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0


def test_unit_weights_token_and_seq_mean():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    valid = torch.tensor([True, True])
    tw = unit_weights(mask, valid, "token_mean")
    assert torch.allclose(tw, mask.float() / 4)
    sw = unit_weights(mask, valid, "seq_mean")
    assert torch.allclose(sw[0], torch.tensor([1 / 6, 1 / 6, 1 / 6, 0]))
    assert torch.allclose(sw[1], torch.tensor([0.5, 0, 0, 0]))
    inval = unit_weights(mask, torch.tensor([True, False]), "token_mean")
    assert inval[1].sum() == 0 and torch.allclose(inval[0].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_unit_weights_of_rank_slices_with_global_counts_are_the_whole_batch_weights(mode):
    # two processes each hold half the rows; with the global counts their weights are the one-process weights
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, False, False],
                         [True, True, True, True]])
    valid = torch.tensor([True, False, True, True])  # (row 1 abstained)
    whole = unit_weights(mask, valid, mode)
    rows, units = float(valid.sum()), float((mask & valid[:, None]).sum())
    halves = [unit_weights(mask[s], valid[s], mode, total_rows=rows, total_units=units) for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(torch.cat(halves), whole)
    assert whole.sum().item() == pytest.approx(1.0)


def test_chunked_accumulation_equals_full_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    old = torch.randn(6, 5)
    adv = torch.randn(6)
    mask = torch.rand(6, 5) > 0.3
    w = unit_weights(mask, torch.ones(6, dtype=torch.bool), "seq_mean")
    full = (clipped_surrogate(logits, old, adv, 0.2, 0.2).loss * w).sum()
    g_full, = torch.autograd.grad(full, logits)
    acc = torch.zeros_like(logits)
    for rows in ([0, 1], [2, 3, 4], [5]):
        for cols in ([0, 1, 2], [3, 4]):
            sub = logits[rows][:, cols]
            l = (clipped_surrogate(sub, old[rows][:, cols], adv[rows], 0.2, 0.2).loss * w[rows][:, cols]).sum()
            acc += torch.autograd.grad(l, logits)[0]
    assert torch.allclose(acc, g_full, atol=1e-6)


def test_kl_estimators_table():
    cur = LogProbOutput(logp=lp([[math.log(0.5)]]))
    ref = LogProbOutput(logp=lp([[math.log(0.25)]]))
    d = math.log(0.25) - math.log(0.5)  # ref - cur
    assert kl_per_unit("k1", cur, ref).item() == pytest.approx(-d)
    assert kl_per_unit("k2", cur, ref).item() == pytest.approx(0.5 * d * d)
    assert kl_per_unit("k3", cur, ref).item() == pytest.approx(math.exp(d) - d - 1)


def test_k3_unbiased_estimate_of_true_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True)
    cur = LogProbOutput(logp=p.log()[x][None])
    ref = LogProbOutput(logp=q.log()[x][None])
    assert kl_per_unit("k3", cur, ref).mean().item() == pytest.approx(true_kl, abs=3e-3)
    assert kl_per_unit("k1", cur, ref).mean().item() == pytest.approx(true_kl, abs=3e-3)


def test_gaussian_mean_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, mu_ref = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    std = torch.full((2, 3), 0.7)
    cur = LogProbOutput(logp=torch.zeros(2, 3), mean=mu, std=std)
    ref = LogProbOutput(logp=torch.zeros(2, 3), mean=mu_ref, std=std)
    got = kl_per_unit("mean", cur, ref)
    Nrm = torch.distributions.Normal
    want = torch.distributions.kl_divergence(Nrm(mu, 0.7), Nrm(mu_ref, 0.7)).flatten(2).mean(-1)
    assert torch.allclose(got, want, atol=1e-6)
    # a deterministic step (std 0: CPS's last) has KL 0 there, not 5e17 from a clamped division
    std0 = std.clone()
    std0[:, 2] = 0
    got0 = kl_per_unit("mean", LogProbOutput(logp=cur.logp, mean=mu, std=std0), ref)
    assert (got0[:, 2] == 0).all() and torch.equal(got0[:, :2], got[:, :2])


def test_velocity_var_is_deepgen_rls_v_based_kl():
    # DeepGen-RL's trainer: (v - v_ref)^2 / (2 std^2 + 1e-7) with std the transition std, averaged over the latent
    torch.manual_seed(0)
    v, v_ref = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    std = torch.tensor([[0.3, 0.2, 0.0], [0.3, 0.2, 0.0]])
    cur = LogProbOutput(logp=torch.zeros(2, 3), velocity=v, std=std)
    ref = LogProbOutput(logp=torch.zeros(2, 3), velocity=v_ref, std=std)
    want = ((v - v_ref) ** 2 / (2 * std[..., None, None] ** 2 + 1e-7)).flatten(2).mean(-1)
    torch.testing.assert_close(kl_per_unit("velocity_var", cur, ref), want)
    torch.testing.assert_close(kl_per_unit("velocity", cur, ref), ((v - v_ref) ** 2).flatten(2).mean(-1))


def test_mean_dt_is_flow_grpo_codes_normalisation():
    # Flow-GRPO's code: ||mu - mu_ref||^2 / (2 g^2) with g the diffusion coefficient, where the transition std is
    # g * sqrt(dt): i.e. the exact Gaussian KL times dt
    from imagerl.policies.flow import sde

    torch.manual_seed(0)
    x, v, v_ref = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sig, sig_n = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.45])
    a, b = (sde.flow_grpo_step(x, u, sig, sig_n, 0.7, prev_sample=x) for u in (v, v_ref))
    g2 = (0.7 ** 2) * sig / (1 - sig)
    code = ((a.mean - b.mean) ** 2).flatten(1).mean(1) / (2 * g2)
    cur = LogProbOutput(logp=torch.zeros(2, 1), mean=a.mean[:, None], std=a.std.reshape(2, 1), dt=(sig - sig_n)[:, None])
    ref = LogProbOutput(logp=torch.zeros(2, 1), mean=b.mean[:, None], std=b.std.reshape(2, 1), dt=(sig - sig_n)[:, None])
    torch.testing.assert_close(kl_per_unit("mean_dt", cur, ref)[:, 0], code, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kl_per_unit("mean", cur, ref)[:, 0], code / (sig - sig_n), rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="flow policy"):
        kl_per_unit("mean_dt", LogProbOutput(logp=torch.zeros(1, 1)), LogProbOutput(logp=torch.zeros(1, 1)))


def test_velocity_kl():
    v, vr = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    out = kl_per_unit("velocity", LogProbOutput(logp=torch.zeros(1, 2), velocity=v), LogProbOutput(logp=torch.zeros(1, 2), velocity=vr))
    assert torch.allclose(out, torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="flow policy"):
        kl_per_unit("velocity", LogProbOutput(logp=torch.zeros(1, 1)), LogProbOutput(logp=torch.zeros(1, 1)))


def test_kl_loss_terms_expected_gradients():
    """Exact expectations over x ~ pi on a 3-token categorical (pi = softmax(theta)): the expected gradient of each
    estimator's loss term, sum_x pi(x) grad_theta k(x), against autograd of the true divergences. k1 and k2 give
    grad KL(pi || ref); k3 gives grad KL(ref || pi) (DeepSeekMath's choice: also toward the reference). A plain
    k1 = logp - ref_logp would give 0 here: no pull toward the reference at all."""
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))

    def expected_grad(name):
        pi = torch.softmax(theta, 0).detach()
        g = torch.zeros(3, dtype=torch.float64)
        for x in range(3):
            logp = torch.log_softmax(theta, 0)[x].reshape(1, 1)
            k = kl_per_unit(name, LogProbOutput(logp=logp), LogProbOutput(logp=ref_logp[x].reshape(1, 1)))
            g += pi[x] * torch.autograd.grad(k.double().sum(), theta)[0]
        return g

    logpi = torch.log_softmax(theta, 0)
    forward = torch.autograd.grad((logpi.exp() * (logpi - ref_logp)).sum(), theta)[0]  # KL(pi || ref)
    logpi = torch.log_softmax(theta, 0)
    reverse = torch.autograd.grad((ref_logp.exp() * (ref_logp - logpi)).sum(), theta)[0]  # KL(ref || pi)
    assert forward.abs().min() > 1e-3 and not torch.allclose(forward, reverse, atol=1e-3)
    torch.testing.assert_close(expected_grad("k1"), forward, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected_grad("k2"), forward, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected_grad("k3"), reverse, rtol=1e-5, atol=1e-6)
