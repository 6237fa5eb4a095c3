"""FastLlamaDecoder against transformers' own `LlamaModel` forward on tiny real Llama configs.

Both of its paths (prepared: rearranged weights with folded norm gains, fused projections, merged LoRA,
complex RoPE; live: the module tensors, unmerged LoRA) must reproduce the transformers hidden states
for a left-padded prefill followed by single-token decode steps, with grouped-query attention, biases,
a scaled RoPE, and an active (non-zero) LoRA adapter; with the live-length cache and with the fixed-shape one
that a CUDA graph replays."""

from __future__ import annotations

import pytest
import torch

from imagerl.policies.ar.sampling import (
    FastLlamaDecoder,
    KVBuffer,
    StaticKVBuffer,
    causal_padding_mask,
    positions_from_valid,
)


def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaModel

    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=64)
    cfg.update(kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaModel(LlamaConfig(**cfg)).eval()
        with torch.no_grad():  # non-trivial norm gains and biases (init gives ones / zeros)
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(0.3 * torch.randn_like(p))
    return model


def reference_hidden(model, embeds, valid):
    """transformers' forward over the whole sequence (no cache): the ground truth for every position."""
    mask = causal_padding_mask(valid)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_valid(valid))
    return out.last_hidden_state


def fast_hidden(dec, embeds, valid, prefill: int):
    """Prefill the first `prefill` positions, then decode the rest one token at a time."""
    R, L, _ = embeds.shape
    cache = KVBuffer(L)
    pos = positions_from_valid(valid)
    v0 = valid[:, :prefill]
    outs = [dec(embeds[:, :prefill], causal_padding_mask(v0), pos[:, :prefill], cache)]
    for t in range(prefill, L):
        mask = valid[:, None, None, : t + 1]
        outs.append(dec(embeds[:, t:t + 1], mask, pos[:, t:t + 1], cache))
    return torch.cat(outs, 1)


def static_hidden(dec, embeds, valid, prefill: int):
    """`fast_hidden` with the fixed-shape cache of `rollout.cuda_graph`: every call attends over all L slots,
    writes at the device slots it is given, and hides the slots not written yet with the mask."""
    R, L, _ = embeds.shape
    cache = StaticKVBuffer(L)
    pos, slot = positions_from_valid(valid), torch.arange(L)
    cache.slots = slot[:prefill]
    mask = torch.cat([causal_padding_mask(valid[:, :prefill]), valid.new_zeros(R, 1, prefill, L - prefill)], -1)
    outs = [dec(embeds[:, :prefill], mask, pos[:, :prefill], cache)]
    for t in range(prefill, L):
        cache.slots = slot[t:t + 1]
        outs.append(dec(embeds[:, t:t + 1], valid[:, None, None, :] & (slot <= t), pos[:, t:t + 1], cache))
    return torch.cat(outs, 1)


CASES = {
    "plain": {},
    "gqa+bias": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "rope-scaling": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prepared", [True, False])
def test_fast_decoder_matches_transformers(case, prepared):
    model = tiny_llama(**CASES[case])
    R, L, D = 3, 9, model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(R, L, D, generator=g)
    valid = torch.ones(R, L, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    valid[2, :1] = False
    with torch.no_grad():
        ref = reference_hidden(model, embeds, valid)
        dec = FastLlamaDecoder.build(model, fuse=prepared)
        assert dec is not None and (dec.prepared is not None) == prepared
        got = fast_hidden(dec, embeds, valid, prefill=4)
        assert (dec.prepared is not None) == prepared  # the path did not silently change
        got_static = static_hidden(dec, embeds, valid, prefill=4)
    keep = valid[..., None].expand_as(ref)  # pad positions' outputs are never used
    for out in (got, got_static):
        err = (out - ref)[keep].abs().max().item()
        assert err < 1e-5, err


@pytest.mark.parametrize("prepared", [True, False])
def test_fast_decoder_with_active_lora(prepared):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(num_key_value_heads=2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn_like(p))
    base = peft_model.base_model.model
    R, L, D = 2, 7, model.config.hidden_size
    embeds = torch.randn(R, L, D, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(R, L, dtype=torch.bool)
    valid[0, :2] = False
    with torch.no_grad():
        ref = reference_hidden(base, embeds, valid)
        with peft_model.disable_adapter():
            ref_off = reference_hidden(base, embeds, valid)
        assert (ref - ref_off).abs().max() > 1e-2  # the adapter changes the output
        got = fast_hidden(FastLlamaDecoder.build(base, fuse=prepared), embeds, valid, prefill=3)
    keep = valid[..., None].expand_as(ref)
    err = (got - ref)[keep].abs().max().item()
    assert err < 1e-5, err


def test_bf16_weights_with_fp32_lora_adapters_without_autocast():
    """bf16 base weights with fp32 adapters (how the trainer keeps LoRA on a bf16 model), no autocast: the live
    path casts the adapter's input and output as peft does, instead of failing on a dtype mismatch."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama().to(torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.data = (0.2 * torch.randn(p.shape)).float()  # fp32 adapters, non-zero
    base = peft_model.base_model.model
    embeds = torch.randn(2, 6, model.config.hidden_size).to(torch.bfloat16)
    valid = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        ref = reference_hidden(base, embeds, valid)
        got = fast_hidden(FastLlamaDecoder.build(base), embeds, valid, prefill=3)
    assert got.dtype == ref.dtype == torch.bfloat16
    with peft_model.disable_adapter():
        without = reference_hidden(base, embeds, valid)
    tol = 0.01 * ref.float().abs().max()  # (bf16 rounding; the adapters themselves move the output far more)
    assert (got.float() - ref.float()).abs().max() < tol < (without.float() - ref.float()).abs().max() / 10


def test_prepared_weights_are_copies_and_rebuilt_per_rollout():
    """The prepared path copies the weights at build time: a later weight update is seen only by a new
    build (the Janus policy builds one per rollout, shared by its micro-batches)."""
    model = tiny_llama()
    emb = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        dec = FastLlamaDecoder.build(model, fuse=True)
        before = fast_hidden(dec, emb, valid, prefill=2)
        model.layers[0].mlp.down_proj.weight.mul_(2.0)
        stale = fast_hidden(dec, emb, valid, prefill=2)
        fresh = fast_hidden(FastLlamaDecoder.build(model, fuse=True), emb, valid, prefill=2)
        ref = reference_hidden(model, emb, valid)
    assert torch.equal(before, stale)
    assert (fresh - ref).abs().max() < 1e-5 and (fresh - before).abs().max() > 1e-3


def test_path_choice_by_size_and_dtype():
    """Prepared weights only for small fp32 models; bf16 keeps transformers' op order (live path)."""
    model = tiny_llama()
    assert FastLlamaDecoder.build(model).prepared is not None
    assert FastLlamaDecoder.build(model.to(torch.bfloat16)).prepared is None
    model = tiny_llama()
    old = FastLlamaDecoder.FUSE_MAX_BYTES
    try:
        FastLlamaDecoder.FUSE_MAX_BYTES = 1000  # "a large model": no weight copy
        assert FastLlamaDecoder.build(model).prepared is None
    finally:
        FastLlamaDecoder.FUSE_MAX_BYTES = old


def test_fast_decoder_sees_through_fsdp2(tmp_path):
    """fully_shard turns LlamaModel into a dynamic FSDPLlamaModel subclass; the lean decoder (and with it
    rollout.cuda_graph) must still apply under dist.strategy=fsdp2 (one real gloo process here)."""
    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_llama()
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert type(model).__name__ == "FSDPLlamaModel"
        emb = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        valid = torch.ones(2, 5, dtype=torch.bool)
        with torch.no_grad():
            model.unshard()
            for layer in model.layers:
                layer.unshard()
            dec = FastLlamaDecoder.build(model)
            assert dec is not None
            got = fast_hidden(dec, emb, valid, prefill=2)
            ref = reference_hidden(model, emb, valid)
        assert (got - ref).abs().max() < 1e-5
    finally:
        tdist.destroy_process_group()
