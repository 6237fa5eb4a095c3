"""Autoregressive sampling utilities: filtering against hand-computed tables and transformers' warpers,
CFG mixing, exact draws, masks/positions, the KV buffer, and the decode loop's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from imagerl.policies.ar.sampling import (
    KVBuffer,
    SamplingParams,
    causal_padding_mask,
    cfg_decode,
    cfg_mix,
    draw_tokens,
    filter_logits,
    gather_logprobs,
    positions_from_valid,
    sampling_logits,
)

NEG = float("-inf")


def test_top_k_hand_table():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert torch.equal(filter_logits(x, top_k=2), torch.tensor([[NEG, 3.0, 2.0, NEG]]))
    assert torch.equal(filter_logits(x, top_k=1), torch.tensor([[NEG, 3.0, NEG, NEG]]))
    # ties at the boundary are kept (as transformers does)
    t = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert torch.equal(filter_logits(t, top_k=1), torch.tensor([[NEG, 2.0, 2.0, NEG]]))
    # k >= V and k == 0 are no-ops
    assert torch.equal(filter_logits(x, top_k=4), x)
    assert torch.equal(filter_logits(x, top_k=0), x)


def test_top_p_breaks_exact_ties_by_token_id_for_any_shape():
    # 33 equal logits, top_p 0.3: ten tokens carry mass before them below 0.3 (9/33), the eleventh does not
    # (10/33); which ten must not depend on the sort's internals, nor on the batch shape (rollout [R, V] vs
    # teacher-forced [N, K, V]), or the recomputed log-prob of a boundary token would differ from the rollout's
    want = [True] * 10 + [False] * 23
    assert torch.isfinite(filter_logits(torch.zeros(1, 33), top_p=0.3))[0].tolist() == want
    assert (torch.isfinite(filter_logits(torch.zeros(5, 7, 33), top_p=0.3)) == torch.tensor(want)).all()


def test_top_p_hand_table():
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    x = p.log()
    # descending: 0.5 (mass before 0), 0.3 (0.5), 0.15 (0.8), 0.05 (0.95); keep where mass before < top_p
    kept = lambda top_p: torch.isfinite(filter_logits(x, top_p=top_p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.51) == [False, True, False, True]
    assert kept(0.8) == [False, True, False, True]
    assert kept(0.81) == [False, True, True, True]
    assert kept(0.96) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # the most likely token always stays


def test_top_k_then_top_p_renormalises():
    # top-k=3 drops 0.05; renormalised masses 0.5/0.95, 0.3/0.95, 0.15/0.95 -> cumulative before: 0, .526, .842
    x = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    out = filter_logits(x, top_k=3, top_p=0.84)
    assert torch.isfinite(out)[0].tolist() == [False, True, False, True]
    out = filter_logits(x, top_k=3, top_p=0.85)
    assert torch.isfinite(out)[0].tolist() == [False, True, True, True]


def test_keep_forces_token_into_support():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 5.0, 0.0]])
    out = filter_logits(x, top_k=1, top_p=0.5, keep=torch.tensor([3, 0]))
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, True, False]]
    assert out[0, 3] == 0.5  # kept value untouched


def test_temperature_and_logprobs_hand_computed():
    x = torch.tensor([[0.0, math.log(3.0)]])
    params = SamplingParams(temperature=0.5)
    lg = sampling_logits(x, params)
    assert torch.allclose(lg, torch.tensor([[0.0, 2 * math.log(3.0)]]))
    # softmax at T=0.5: weights 1 : 9
    lp = gather_logprobs(lg, torch.tensor([[1]]).squeeze(-1))
    assert torch.allclose(lp, torch.tensor([math.log(0.9)]), atol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)])
def test_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g) * 2
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p))
    ref = procs(None, x.clone())
    ours = sampling_logits(x, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], atol=1e-6)


def test_cfg_mix():
    c, u = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_mix(c, u, 5.0), torch.tensor([6.0, -4.0]))  # u + 5 (c - u)
    assert cfg_mix(c, u, 1.0) is c
    assert torch.equal(cfg_mix(c, u, 0.0), u)


def test_params_validation():
    with pytest.raises(ValueError, match="rollout.temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="rollout.top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="rollout.top_k"):
        SamplingParams(top_k=-1)
    assert not SamplingParams(cfg_scale=1.0).uses_cfg and SamplingParams(cfg_scale=5.0).uses_cfg


def test_draw_tokens_exact_inverse_cdf():
    x = torch.tensor([[0.0, 1.0, NEG, 2.0, NEG]]).repeat(4000, 1)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = draw_tokens(x, u)
    assert torch.equal(a.tokens, draw_tokens(x, u).tokens)  # a function of the uniforms only
    assert not ((a.tokens == 2) | (a.tokens == 4)).any()  # filtered tokens are never drawn
    p = x[0].softmax(-1)
    assert torch.allclose(a.logp, p.log()[a.tokens])
    freq = torch.bincount(a.tokens, minlength=5).float() / len(a.tokens)
    assert torch.allclose(freq, p, atol=0.03)  # empirical frequencies follow the distribution
    # hand-checked CDF edges: p = [.090, .245, 0, .665, 0]
    edges = draw_tokens(x[:4], torch.tensor([0.0, 0.0899, 0.0901, 1 - 1e-12], dtype=torch.float64)).tokens
    assert edges.tolist() == [0, 0, 1, 3]


def test_positions_and_mask_with_left_padding():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    assert positions_from_valid(valid).tolist() == [[0, 0, 1], [0, 1, 2]]
    m = causal_padding_mask(valid)[:, 0]
    assert m.shape == (2, 3, 3)
    # row 0: pad query sees only itself; real queries see real keys up to themselves
    assert m[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert m[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_kv_buffer_appends_in_place():
    buf = KVBuffer(5)
    k1, v1 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k, v = buf.update(k1, v1, 0)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    k2, v2 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    k, v = buf.update(k2, v2, 0)
    assert torch.equal(k, torch.cat([k1, k2], 2)) and torch.equal(v, torch.cat([v1, v2], 2))
    assert buf.get_seq_length(0) == 3 and buf.get_seq_length(1) == 0
    with pytest.raises(RuntimeError, match="overflow"):
        buf.update(torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4), 0)


def test_cfg_decode_bookkeeping():
    """A toy model whose logits depend on (position, row kind): checks positions, mask lengths, the
    CFG row layout and that logp is the log-prob of the drawn token under the mixed distribution."""
    V, T, scale = 6, 4, 3.0
    calls = []
    table = torch.randn(32, V, generator=torch.Generator().manual_seed(0))

    def forward(emb, mask, pos, cache):
        calls.append((emb.shape[1], None if mask is None else tuple(mask.shape), pos.clone()))
        cache.update(emb[:, None], emb[:, None], 0)  # keep the cache length honest
        # hidden = [position, is_uncond] in the first two features
        h = torch.zeros(emb.shape[0], emb.shape[1], 2)
        h[..., 0] = pos.float()
        h[emb.shape[0] // 2:, :, 1] = 1.0
        return h

    def guided(h):
        logits = table[h[:, 0].long()] + h[:, 1:2] * 0.5  # uncond rows shifted by a constant
        n = h.shape[0] // 2
        return cfg_mix(logits[:n], logits[n:], scale)

    def embed(tok):
        return torch.zeros(2 * tok.shape[0], 1, 3)

    valid = torch.tensor([[False, True, True], [True, True, True]])  # B = 2 prompts, one left-padded
    valid_R = torch.cat([valid, valid])
    u = torch.rand(2, T, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = cfg_decode(forward, guided, embed, torch.zeros(4, 3, 3), valid_R, u, SamplingParams(cfg_scale=scale))
    assert out.tokens.shape == (2, T) and out.logp.shape == (2, T)
    assert len(calls) == T  # prefill + T-1 decode steps
    assert calls[0][0] == 3 and calls[0][1] == (4, 1, 3, 3)
    for t in range(1, T):
        L, mshape, pos = calls[t]
        assert L == 1 and mshape == (4, 1, 1, 3 + t)
        assert pos[:, 0].tolist() == [2 + t - 1, 3 + t - 1] * 2  # n_real + (t-1): padding skipped
    # logp is exact for the drawn tokens: prompt row 0 has 2 real tokens, token t sits at position 1 + t
    for t in range(T):
        pos = torch.tensor([1 + t, 2 + t])
        mixed = cfg_mix(table[pos], table[pos] + 0.5, scale)
        ref = mixed.log_softmax(-1).gather(-1, out.tokens[:, t:t + 1]).squeeze(-1)
        assert torch.allclose(out.logp[:, t], ref, atol=1e-6)


def test_cfg_decode_without_padding_passes_no_mask():
    seen = []

    def forward(emb, mask, pos, cache):
        seen.append(mask)
        return torch.zeros(emb.shape[0], emb.shape[1], 4)

    cfg_decode(forward, lambda h: torch.zeros(h.shape[0], 5), lambda tok: torch.zeros(tok.shape[0], 1, 4),
               torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.rand(2, 3), SamplingParams())
    assert seen == [None, None, None]
    # u = 1 would draw past the last CDF step (a filtered token of log-prob -inf): refused
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        cfg_decode(forward, lambda h: torch.zeros(h.shape[0], 5), lambda tok: torch.zeros(tok.shape[0], 1, 4),
                   torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3), SamplingParams())
