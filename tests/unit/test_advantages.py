"""Advantage estimators against hand-computed tables."""

import math

import pytest
import torch

from imagerl.algorithms.advantages import compute_advantages, group_stats, weighted_total

NAN = math.nan


def adv(name, rewards, gids, weights=None, eps=0.0, clip=0.0):
    r = torch.tensor(rewards, dtype=torch.float32)
    if r.dim() == 1:
        r = r[:, None]
    w = torch.ones_like(r) if weights is None else torch.tensor(weights, dtype=torch.float32).expand_as(r).clone()
    return compute_advantages(name, r, torch.tensor(gids), w, eps, clip)


def test_group_zscore_table():
    # group 0: [1, 3] -> mean 2, pop std 1 -> [-1, 1]; group 1: [0, 0, 3, 1] -> mean 1, var (1+1+4+0)/4=1.5
    out = adv("group_zscore", [1, 3, 0, 0, 3, 1], [0, 0, 1, 1, 1, 1])
    s = math.sqrt(1.5)
    expected = [-1, 1, -1 / s, -1 / s, 2 / s, 0]
    assert torch.allclose(out.adv, torch.tensor(expected), atol=1e-6)
    assert out.valid.all()


def test_eps_and_constant_group():
    out = adv("group_zscore", [2, 2, 0, 1], [0, 0, 1, 1], eps=1e-4)
    assert torch.allclose(out.adv[:2], torch.zeros(2))  # a constant group carries no signal
    assert torch.allclose(out.adv[2:], torch.tensor([-0.5 / 0.5001, 0.5 / 0.5001]), atol=1e-6)


def test_eps_in_the_batch_std_estimators():
    # global_std: (r - mean_g) / (batch std + eps); gdpo: per-reward (z with eps), then batch z-score with eps
    r = [1, 3, 0, 0, 3, 1]
    std = torch.tensor(r, dtype=torch.float64).std(unbiased=False).item()
    out = adv("global_std", r, [0, 0, 1, 1, 1, 1], eps=0.5)
    assert torch.allclose(out.adv, torch.tensor([-1, 1, -1, -1, 2, 0], dtype=torch.float32) / (std + 0.5), atol=1e-6)
    g = adv("gdpo", [1, 3, 0, 0], [0, 0, 1, 1], eps=0.5)
    z = torch.tensor([-1 / 1.5, 1 / 1.5, 0.0, 0.0])  # group {1, 3}: std 1 (+0.5); group {0, 0}: constant -> 0
    assert torch.allclose(g.adv, (z - z.mean()) / (z.std(unbiased=False) + 0.5), atol=1e-6)


def test_mean_only_drgrpo():
    out = adv("mean_only", [1, 3, 0, 0, 3, 1], [0, 0, 1, 1, 1, 1])
    assert torch.allclose(out.adv, torch.tensor([-1.0, 1, -1, -1, 2, 0]))


def test_global_std():
    r = [1, 3, 0, 0, 3, 1]
    out = adv("global_std", r, [0, 0, 1, 1, 1, 1])
    std = torch.tensor(r, dtype=torch.float64).std(unbiased=False).item()  # 8/6 mean -> pop std
    expected = torch.tensor([-1, 1, -1, -1, 2, 0], dtype=torch.float32) / std
    assert torch.allclose(out.adv, expected, atol=1e-6)


def test_clipping():
    out = adv("mean_only", [0, 10], [0, 0], clip=2.0)
    assert out.adv.tolist() == [-2.0, 2.0]


def test_nan_abstain_excluded_from_stats():
    # group 0: [1, NaN, 3] -> stats over {1, 3}; the NaN sample is invalid with advantage 0
    out = adv("group_zscore", [1, NAN, 3], [5, 5, 5])
    assert out.valid.tolist() == [True, False, True]
    assert torch.allclose(out.adv, torch.tensor([-1.0, 0.0, 1.0]))


def test_weighted_total_rescales_voting_weights():
    r = torch.tensor([[1.0, 0.0], [NAN, 0.5], [NAN, NAN]])
    w = torch.tensor([[2.0, 1.0]]).expand(3, 2)
    t = weighted_total(r, w)
    assert t[0].item() == pytest.approx(2.0)  # 2*1 + 1*0
    assert t[1].item() == pytest.approx(0.5 * 3.0)  # only reward 1 voted: 1*0.5 scaled by 3/1
    assert math.isnan(t[2].item())
    # an infinite score stays infinite (nan_to_num made it float32's max, a finite value every inf check passed)
    assert weighted_total(torch.tensor([[math.inf, 0.0]]), torch.tensor([[0.5, 1.0]])).item() == math.inf


@pytest.mark.parametrize("name", ["group_zscore", "global_std", "gdpo", "mean_only"])
def test_a_weight_zero_reward_does_not_make_a_sample_scored(name):
    # reward 0 is only monitored (weight 0), reward 1 trains (weight 3) and abstains on samples 1, 2 and 3 (all of
    # group 1): those have no reward. (Imputed, group 1 took the batch mean and counted as valid: with a judge
    # abstaining on the whole batch, every advantage was 0, every sample valid, and the run trained on nothing.)
    r = [[0.1, 0.2], [0.5, NAN], [0.3, NAN], [0.7, NAN], [0.2, 0.6]]
    out = adv(name, r, [0, 0, 1, 1, 0], weights=[0.0, 3.0])
    assert out.valid.tolist() == [True, False, False, False, True]
    assert math.isnan(out.total[2]) and math.isnan(out.total[3]) and out.adv[1:4].tolist() == [0.0, 0.0, 0.0]
    every = adv(name, [[0.5, NAN], [0.3, NAN]], [0, 0], weights=[0.0, 3.0])
    assert not every.valid.any() and torch.isnan(every.total).all()


def test_partial_abstain_counts_as_the_group_mean_of_that_reward():
    # weights [+1 quality, -1 penalty]; the penalty judge abstains on the middle sample: it counts as the group's
    # mean penalty (0.2), so totals [0.4, 0.6, 0.8] and the middle sample sits at the group mean (advantage 0).
    # (Dropping the penalty and rescaling would give it 0.8 * 2 = 1.6, the top advantage: a bonus for the abstain.)
    r = [[0.8, 0.4], [0.8, NAN], [0.8, 0.0], [0.1, NAN], [0.3, NAN]]
    out = adv("group_zscore", r, [0, 0, 0, 1, 1], weights=[1.0, -1.0])
    z = 0.2 / math.sqrt(2 * 0.2**2 / 3)
    assert torch.allclose(out.adv[:3], torch.tensor([-z, 0.0, z]), atol=1e-3)
    assert out.total[:3].tolist() == pytest.approx([0.4, 0.6, 0.8])
    # group 1 has no penalty score at all: the batch mean (0.2) for both, so only the quality differs
    assert out.total[3:].tolist() == pytest.approx([-0.1, 0.1]) and out.valid.all()
    # GDPO: an abstain's z-score within its group is 0, and the reward's group std is that of the samples it scored
    g = adv("gdpo", [[1, 0], [3, NAN], [2, 1]], [0, 0, 0], weights=[1.0, 1.0])
    # z in the group: quality [1, 3, 2] -> [-1, 1, 0] / sqrt(2/3); penalty [0, -, 1]: mean 0.5, std 0.5 over the two
    # it scored -> [-1, 0, 1] (imputing 0.5 first would give std sqrt(1/6) and z [-1, 0, 1] / sqrt(2/3): a reward that
    # abstains more would weigh more)
    comb = torch.tensor([-1.0, 1.0, 0.0]) / math.sqrt(2 / 3) + torch.tensor([-1.0, 0.0, 1.0])
    assert torch.allclose(g.adv, (comb - comb.mean()) / comb.std(unbiased=False), atol=1e-3)
    assert g.total.tolist() == pytest.approx([1.0, 3.5, 3.0])  # (the logged total: the abstain as the group mean)


@pytest.mark.parametrize("name", ["group_zscore", "global_std", "gdpo", "mean_only"])
def test_abstaining_samples_stay_invalid_with_zero_eps(name):
    # algorithm.adv_eps=0: a group with one scored sample has std 0; its abstaining siblings must stay invalid
    # (they were valid with advantage 0, entering the loss's token count and the KL term)
    out = adv(name, [[0.5], [0.5], [NAN], [NAN], [NAN], [0.2], [0.9]], [0, 0, 0, 1, 1, 2, 2], eps=0.0)
    assert out.valid.tolist() == [True, True, False, False, False, True, True]
    assert out.adv[2:5].tolist() == [0.0, 0.0, 0.0]


def test_gdpo_table():
    # two rewards, two groups of two. Each reward z-scored in its group, then weighted sum, then batch z-score.
    r = [[1, 0], [3, 0], [0, 5], [2, 1]]
    out = adv("gdpo", r, [0, 0, 1, 1], weights=[1.0, 0.5])
    # per-group z: reward0: g0 [-1, 1], g1 [-1, 1]; reward1: g0 [0, 0] (constant), g1 [1, -1]
    comb = torch.tensor([-1 + 0.0, 1 + 0.0, -1 + 0.5, 1 - 0.5])
    expected = (comb - comb.mean()) / comb.std(unbiased=False)
    assert torch.allclose(out.adv, expected, atol=1e-5)


def test_group_stats_matches_torch():
    x = torch.randn(12)
    g = torch.tensor([0, 1, 2] * 4)
    mean, std, cnt = group_stats(x, g)
    for k in range(3):
        sel = x[g == k]
        assert torch.allclose(mean[g == k], sel.mean().expand(4), atol=1e-6)
        assert torch.allclose(std[g == k], sel.std(unbiased=False).expand(4), atol=1e-6)
    assert (cnt == 4).all()


def test_unknown_estimator_names_field():
    with pytest.raises(KeyError, match="algorithm.advantage"):
        adv("group_zcore", [1, 2], [0, 0])
