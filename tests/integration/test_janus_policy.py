"""JanusPolicy on the tiny "test" preset (real transformers Janus classes, random weights, offline).

Proves: rollout shapes and ranges, reproducibility, the ratio-1 invariant (log_prob == old_logp within
1e-5) for any micro-batch split, with LoRA on/off and non-trivial temperature/top-k/top-p, argmax
consistency, agreement with transformers' own generate, that one optimizer step changes every trainable
parameter, the reference policy in both modes, and save/reload.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagerl.config import load_config  # noqa: E402
from imagerl.policies.ar.janus import PALETTE, JanusPolicy, build_tiny_janus  # noqa: E402
from imagerl.types import PromptBatch  # noqa: E402

PROMPTS = ["a red square on the left", "blue", "a green circle on the top of a yellow star"]  # lengths differ


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(*overrides: str) -> JanusPolicy:
    cfg = load_config(None, ["model.tiny=true", "model.tiny_size=test", "rollout.cfg_scale=5", *overrides])
    return JanusPolicy(cfg, torch.device("cpu")).eval()


def batch(prompts=PROMPTS) -> PromptBatch:
    return PromptBatch(prompts=list(prompts), metadata=[{"i": i} for i in range(len(prompts))])


def roll(pol: JanusPolicy, seed: int = 0, G: int = 2, prompts=PROMPTS, **kw):
    with torch.no_grad():
        return pol.rollout(batch(prompts), G, torch.Generator().manual_seed(seed), **kw)


def all_units(ro) -> torch.Tensor:
    return torch.arange(ro.num_units)


def assert_ratio_one(pol: JanusPolicy, ro, idx=None) -> None:
    sub = ro if idx is None else ro.select(idx)
    with torch.no_grad():
        out = pol.log_prob(sub, all_units(sub))
    ratio = torch.exp(out.logp - sub.old_logp)
    assert torch.isfinite(out.logp).all()
    assert (ratio - 1).abs().max().item() < 1e-5, (ratio - 1).abs().max().item()


# ---------------------------------------------------------------------------------------------------


def test_rollout_shapes_ranges_and_records():
    pol = make()
    ro = roll(pol, G=3, group_id_offset=10)
    N, T = 9, pol.num_image_tokens
    assert T == 16 and pol.grid == 4
    assert ro.images.shape == (N, 3, 16, 16) and ro.images.dtype == torch.float32
    assert ro.images.min() >= 0 and ro.images.max() <= 1
    assert ro.old_logp.shape == (N, T) and (ro.old_logp <= 0).all()
    assert ro.mask.shape == (N, T) and ro.mask.all()
    assert ro.group_ids.tolist() == [10, 10, 10, 11, 11, 11, 12, 12, 12]
    assert ro.prompts[3] == PROMPTS[1] and ro.metadata[8] == {"i": 2}
    tok = ro.replay["image_tokens"]
    assert tok.shape == (N, T) and tok.min() >= 0 and tok.max() < pol.model.config.vq_config.num_embeddings
    ids, valid = ro.replay["prompt_ids"], ro.replay["prompt_mask"]
    assert ids.shape == valid.shape and ids.shape[0] == N
    assert (ids[:, -1] == pol.boi_id).all()
    assert not valid[3].all() and valid[6].all()  # the short prompt is left-padded, the longest is not
    assert not ro.old_logp.requires_grad and not ro.images.requires_grad


def test_samples_do_not_depend_on_micro_batching():
    a = roll(make(), seed=5, G=3)
    b = roll(make("rollout.micro_batch_size=2"), seed=5, G=3)
    assert torch.equal(a.replay["image_tokens"], b.replay["image_tokens"])
    assert torch.allclose(a.old_logp, b.old_logp, atol=1e-5)
    # and a prompt's samples do not depend on the other prompts of the batch (padding, group offset)
    c = roll(make(), seed=5, G=3, prompts=PROMPTS[1:2], group_id_offset=1)
    assert torch.equal(c.replay["image_tokens"], a.replay["image_tokens"][3:6])


def test_rollout_reproducible_from_seed():
    pol = make()
    a, b, c = roll(pol, seed=1), roll(pol, seed=1), roll(pol, seed=2)
    assert torch.equal(a.replay["image_tokens"], b.replay["image_tokens"])
    assert torch.equal(a.images, b.images) and torch.equal(a.old_logp, b.old_logp)
    assert not torch.equal(a.replay["image_tokens"], c.replay["image_tokens"])
    # a second policy built from the same preset has the same weights -> same samples
    d = roll(make(), seed=1)
    assert torch.equal(a.replay["image_tokens"], d.replay["image_tokens"])


@pytest.mark.parametrize("overrides", [
    (),
    ("rollout.temperature=0.7", "rollout.top_k=9", "rollout.top_p=0.8"),
    ("rollout.temperature=1.3", "rollout.top_p=0.9"),
    ("model.lora.enabled=true",),
    ("model.lora.enabled=true", "rollout.temperature=0.8", "rollout.top_k=5"),
    ("rollout.cfg_scale=1",),
])
def test_log_prob_matches_old_logp_any_split(overrides):
    pol = make("rollout.micro_batch_size=4", *overrides)
    ro = roll(pol, G=3)
    assert_ratio_one(pol, ro)  # full batch (rollout ran in chunks of 4)
    perm = torch.randperm(len(ro), generator=torch.Generator().manual_seed(0))
    for idx in perm.split(2):  # other micro-batches, shuffled across prompts
        assert_ratio_one(pol, ro, idx.tolist())
    # a subset of units scores the same values
    units = torch.tensor([0, 5, 15])
    with torch.no_grad():
        out = pol.log_prob(ro, units)
    assert torch.allclose(out.logp, ro.old_logp[:, units], atol=1e-5)


def test_fast_decoder_and_transformers_modules_sample_the_same_distribution():
    pol = make()
    ro_fast = roll(pol, seed=4)
    pol.use_fast_decoder = False
    ro_hf = roll(pol, seed=4)
    assert_ratio_one(pol, ro_hf)
    # same seed, same distribution up to float rounding -> identical draws here
    assert torch.equal(ro_fast.replay["image_tokens"], ro_hf.replay["image_tokens"])
    assert torch.allclose(ro_fast.old_logp, ro_hf.old_logp, atol=1e-5)


@pytest.mark.parametrize("overrides", [(), ("rollout.temperature=0.7", "rollout.top_k=9", "rollout.top_p=0.8"),
                                       ("rollout.cfg_scale=1", "model.lora.enabled=true")])
def test_fixed_shape_decode_step_samples_the_same(overrides):
    # rollout.cuda_graph: the step a CUDA graph replays (attention over the whole masked buffer, step index and
    # hidden state on the device) runs eagerly on a CPU; it must draw what the live-length loop draws, with
    # left-padded prompts, and the training recompute must give ratio 1
    assert make(*overrides).decode_static == ""  # rollout.cuda_graph null (the default): off on a CPU
    pol = make("rollout.cuda_graph=true", *overrides)
    assert pol.decode_static == "eager"
    ro_static = roll(pol, seed=4, G=3)
    assert_ratio_one(pol, ro_static)
    pol.decode_static = ""
    ro_live = roll(pol, seed=4, G=3)
    assert torch.equal(ro_static.replay["image_tokens"], ro_live.replay["image_tokens"])
    assert torch.allclose(ro_static.old_logp, ro_live.old_logp, atol=1e-5)


@pytest.mark.parametrize("static", ["", "eager"])
def test_rollout_under_bf16_autocast_decodes_what_training_scores(static):
    # the Janus-Pro recipe's precision: fp32 weights, bf16 compute by autocast (run.dtype=bf16). The lean decoder
    # takes its live path (the modules' ops in their order, which autocast casts as it casts log_prob), the image-
    # token inputs keep the text embeddings' dtype as in log_prob's sequence, and both decode loops run (the
    # fixed-shape cache once crashed on keys that were fp32 in the prefill and bf16 in the decode steps)
    pol = make("rollout.top_k=9")
    pol.decode_static = static
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, embed = pol._sampler_parts(pol.params, 4)
        assert fast is not None and fast.prepared is None
        assert embed(torch.tensor([0, 1])).dtype == torch.float32
        ro = roll(pol, seed=4, G=3)
        out = pol.log_prob(ro, all_units(ro))
    dev = (torch.exp(out.logp - ro.old_logp) - 1).abs().max().item()
    print("max |ratio - 1|", dev)
    assert dev < 2e-3, dev  # bf16 (fp32 above): the live loop attends over fewer keys than the training forward


@pytest.mark.gpu
def test_cuda_graph_decode_samples_the_same():
    # the captured step replayed T - 1 times equals the live-length loop on the same GPU (fp32), and the
    # training recompute gives ratio 1; on CUDA it is the default (rollout.cuda_graph null)
    cfg = load_config(None, ["model.tiny=true", "model.tiny_size=test", "rollout.cfg_scale=5", "rollout.top_k=9"])
    pol = JanusPolicy(cfg, torch.device("cuda")).eval()
    assert pol.decode_static == "graph"
    ro_graph = roll(pol, seed=4, G=3)
    assert_ratio_one(pol, ro_graph)
    pol.decode_static = ""
    ro_live = roll(pol, seed=4, G=3)
    assert torch.equal(ro_graph.replay["image_tokens"].cpu(), ro_live.replay["image_tokens"].cpu())
    assert torch.allclose(ro_graph.old_logp, ro_live.old_logp, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_decode_under_bf16_autocast():
    # the recipe's precision (fp32 weights, bf16 autocast, whose weight-cast cache the warm-up step fills before
    # the capture): the replayed graph draws what the same fixed-shape step draws eagerly, and training agrees
    cfg = load_config(None, ["model.tiny=true", "model.tiny_size=test", "rollout.cfg_scale=5", "rollout.top_k=9",
                             "rollout.cuda_graph=true"])
    pol = JanusPolicy(cfg, torch.device("cuda")).eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ro_graph = roll(pol, seed=4, G=3)
        pol.decode_static = "eager"
        ro_eager = roll(pol, seed=4, G=3)
        with torch.no_grad():
            out = pol.log_prob(ro_graph, all_units(ro_graph))
    assert torch.equal(ro_graph.replay["image_tokens"].cpu(), ro_eager.replay["image_tokens"].cpu())
    assert torch.allclose(ro_graph.old_logp, ro_eager.old_logp, atol=1e-5)
    assert (torch.exp(out.logp - ro_graph.old_logp) - 1).abs().max().item() < 2e-3


def test_argmax_consistency_and_cfg_matters():
    import dataclasses

    from imagerl.policies.ar.sampling import causal_padding_mask, positions_from_valid

    pol = make("rollout.top_k=1")
    ro = roll(pol)
    assert torch.allclose(ro.old_logp, torch.zeros_like(ro.old_logp))  # top-1 -> probability 1
    # the argmax of the teacher-forced CFG logits (no filtering) reproduces every sampled token
    rp = ro.replay
    ids, valid, img = rp["prompt_ids"], rp["prompt_mask"], rp["image_tokens"]
    with torch.no_grad():
        text = pol._text_embeds(torch.cat([ids, pol.uncond_ids(ids)]))
        imgs = pol._image_embeds(img[:, :-1])
        emb = torch.cat([text, torch.cat([imgs, imgs])], 1)
        v = torch.cat([valid, valid.new_ones(img.shape[0], img.shape[1] - 1)], 1)
        v = torch.cat([v, v])
        h = pol._lm_forward(emb, causal_padding_mask(v), positions_from_valid(v))
        logits = pol._guided_logits(h[:, ids.shape[1] - 1:], 5.0)
    assert torch.equal(logits.argmax(-1), img)
    # CFG is part of the scored distribution: the same tokens without guidance score differently
    pol2 = make()
    ro2 = roll(pol2)
    plain = ro2.select(list(range(len(ro2))))
    plain.replay = {**ro2.replay, "sampling": dataclasses.replace(ro2.replay["sampling"], cfg_scale=1.0)}
    with torch.no_grad():
        no_cfg = pol2.log_prob(plain, all_units(ro2))
    assert (no_cfg.logp - ro2.old_logp).abs().max() > 1e-3


def test_greedy_matches_transformers_generate():
    """Same prompt ids, CFG 5, greedy: our sampler and transformers' generate(generation_mode="image")
    pick the same tokens (equal-length prompts: transformers counts pad slots as positions)."""
    from transformers import GenerationConfig

    pol = make("rollout.top_k=1")
    enc = pol.encode_prompts(["a red square on the left", "a blue star on the right"])
    assert enc.valid.all()
    with torch.no_grad():
        ours = pol.sample_tokens(enc.ids, enc.valid, pol.params, torch.Generator().manual_seed(0)).tokens
        gc = GenerationConfig(do_sample=False, guidance_scale=5.0, bos_token_id=pol.bos_id, pad_token_id=pol.pad_id,
                              eos_token_id=pol.tokenizer.eos_token_id, max_new_tokens=pol.num_image_tokens,
                              generation_kwargs={"boi_token_id": pol.boi_id})
        ref = pol.model.generate(enc.ids, attention_mask=enc.valid.long(), generation_mode="image", generation_config=gc)
    assert torch.equal(ours, ref)


def _train_step(pol: JanusPolicy, ro, steps: int = 1) -> None:
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-2)
    adv = torch.linspace(-1, 1, len(ro))
    for _ in range(steps):
        out = pol.log_prob(ro, all_units(ro))
        loss = -(adv[:, None] * torch.exp(out.logp - ro.old_logp)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("lora", [False, True])
def test_every_trainable_parameter_changes_and_frozen_parts_do_not(lora):
    pol = make(f"model.lora.enabled={str(lora).lower()}")
    ro = roll(pol)
    before = {n: p.detach().clone() for n, p in pol.named_trainable_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in pol.model.named_parameters()
                     if "vqmodel" in n or "vision_model" in n or n.startswith("lm_head")}
    assert before and frozen_before
    # LoRA B starts at zero, so A gets its first gradient in the second step
    _train_step(pol, ro, steps=2 if lora else 1)
    unchanged = [n for n, p in pol.named_trainable_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    frozen_now = dict(pol.model.named_parameters())
    assert all(torch.equal(frozen_now[n], v) for n, v in frozen_before.items())
    names = list(before)
    if lora:
        assert all("lora_" in n for n in names)
    else:
        assert any("generation_head" in n for n in names) and any("layers.0.self_attn.q_proj" in n for n in names)
        assert not any("vqmodel" in n or "vision_model" in n for n in names)


@pytest.mark.parametrize("lora", [False, True])
def test_reference_gives_pre_training_logprobs(lora):
    pol = make(f"model.lora.enabled={str(lora).lower()}", "algorithm.kl_coef=0.04")
    assert pol.reference_mode() == ("lora_disabled" if lora else "frozen_copy")
    pol.setup_reference()
    ro = roll(pol)
    _train_step(pol, ro, steps=2)
    with torch.no_grad():
        now = pol.log_prob(ro, all_units(ro)).logp
        with pol.reference():
            ref = pol.log_prob(ro, all_units(ro)).logp
        after = pol.log_prob(ro, all_units(ro)).logp
    assert (now - ro.old_logp).abs().max() > 1e-3  # the weights did change the policy
    assert (ref - ro.old_logp).abs().max() < 1e-5  # the reference is the pre-training policy
    assert torch.equal(now, after)  # and leaving the context restores the live weights


def test_trainable_substrings_and_bad_config_errors():
    pol = make("model.trainable=[generation_head]")
    names = [n for n, _ in pol.named_trainable_parameters()]
    assert names and all("generation_head" in n for n in names)
    with pytest.raises(ValueError, match="model.trainable"):
        make("model.trainable=[no_such_module]")
    with pytest.raises(ValueError, match="model.tiny_overrides.hiden_size"):
        make("model.tiny_overrides.hiden_size=64")
    with pytest.raises(ValueError, match="rollout.temperature"):
        make("rollout.temperature=0")


def test_image_size_and_palette_decoder():
    pol = make("model.tiny_overrides.image_size=32", "model.image_size=384")  # tiny ignores the real 384
    assert pol.grid == 8 and pol.num_image_tokens == 64
    ro = roll(pol, G=2, prompts=["red"])
    assert ro.images.shape[-2:] == (32, 32)
    # painted decoder: code c renders PALETTE[c % 8] over its 4x4 patch; left half red (1), right blue (3)
    tokens = torch.full((1, 8, 8), 3)
    tokens[:, :, :4] = 1
    with torch.no_grad():
        img = pol.decode_images(tokens.view(1, 64))[0]
    assert torch.allclose(img[:, :, :16], torch.tensor(PALETTE[1], dtype=torch.float32).view(3, 1, 1).expand(3, 32, 16))
    assert torch.allclose(img[:, :, 16:], torch.tensor(PALETTE[3], dtype=torch.float32).view(3, 1, 1).expand(3, 32, 16))


def test_build_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    m1, _ = build_tiny_janus("test")
    got = torch.rand(1)
    m2, tok = build_tiny_janus("test")
    assert torch.equal(expected, got)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    assert tok.convert_tokens_to_ids("<begin_of_image>") != tok.unk_token_id


def test_gradient_checkpointing_same_values_and_gradients():
    pol = make("model.gradient_checkpointing=true")
    ro = roll(pol)
    assert_ratio_one(pol, ro)
    # the layers' forward runs again in backward (checkpointing is on) and the gradients are those without it
    calls = []
    h = pol._base_lm().layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    pol.log_prob(ro, all_units(ro)).logp.sum().backward()
    h.remove()
    plain = make()
    plain.log_prob(ro, all_units(ro)).logp.sum().backward()
    assert len(calls) == 2
    for (n, p), (_, q) in zip(pol.named_trainable_parameters(), plain.named_trainable_parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("lora", [False, True])
def test_save_pretrained_reloads(tmp_path, lora):
    from transformers import JanusForConditionalGeneration

    pol = make(f"model.lora.enabled={str(lora).lower()}")
    ro = roll(pol)
    _train_step(pol, ro, steps=2)
    with torch.no_grad():
        expected = pol.log_prob(ro, all_units(ro)).logp
    pol.save_pretrained(str(tmp_path))
    assert (tmp_path / "config.json").exists()
    plain = JanusForConditionalGeneration.from_pretrained(str(tmp_path))
    assert not any("lora" in n for n, _ in plain.named_parameters())
    cfg = load_config(None, ["model.tiny=false", f"model.path={tmp_path}", "rollout.cfg_scale=5"])
    again = JanusPolicy(cfg, torch.device("cpu"))
    assert again.boi_id == pol.boi_id and again.pad_id == pol.pad_id
    with torch.no_grad():
        got = again.log_prob(ro, all_units(ro)).logp
    assert torch.allclose(got, expected, atol=1e-5)


def test_bad_model_path_error_names_the_field(tmp_path):
    cfg = load_config(None, ["model.tiny=false", f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="model.path"):
        JanusPolicy(cfg, torch.device("cpu"))
    # the original deepseek-ai/* remote-code format (model_type multi_modality), which transformers cannot load:
    # the error names the transformers-format repos to use instead
    import json

    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"model_type": "multi_modality", "architectures":
                                                                 ["MultiModalityCausalLM"]}))
    cfg = load_config(None, ["model.tiny=false", f"model.path={tmp_path / 'remote'}"])
    with pytest.raises(ValueError, match=r"model.path='.*remote': cannot load a transformers Janus checkpoint .*"
                                         r"deepseek-community/Janus-Pro-7B"):
        JanusPolicy(cfg, torch.device("cpu"))
    # a hub id that is not downloaded, with no hub to reach (these tests run with HF_HUB_OFFLINE=1): the fix for that
    # first, not the advice to use the repo that was given
    cfg = load_config(None, ["model.tiny=false", "model.path=deepseek-community/Janus-Pro-1B"])
    with pytest.raises(ValueError, match=r"^model.path='deepseek-community/Janus-Pro-1B': 'deepseek-community/Janus-Pro-1B' "
                                         r"is not in the Hugging Face cache and the hub could not be reached: download it "
                                         r"on a machine with internet first \(`hf download deepseek-community/Janus-Pro-1B`"):
        JanusPolicy(cfg, torch.device("cpu"))


def test_mps_is_refused_before_loading():
    # the sampler's inverse CDF is fp64, which MPS lacks: one message at start, not a TypeError at the first token
    # (the device object alone: this machine has no MPS, and nothing touches it before the check)
    with pytest.raises(ValueError, match=r"run.device=mps: .*no float64; use run.device=cpu"):
        JanusPolicy(load_config(None, ["model.tiny=true"]), torch.device("mps"))


def test_fsdp2_needs_fp32_weights():
    # checked before any process group is touched (the 2-process FSDP2 runs are in test_trainer.py)
    pol = make("model.dtype=bf16")
    with pytest.raises(NotImplementedError, match=r"model.dtype=fp32.*run.dtype=bf16"):
        pol.shard(None)


@pytest.mark.gpu
def test_cuda_graph_capture_beside_a_gpu_reward_thread():
    # scoring.overlap scores the previous micro-batch in a worker thread while the next one decodes: a GPU reward
    # there allocates, computes and synchronises while the decode step is being captured, which must break neither
    # (the capture is thread-local) nor the samples
    import threading

    cfg = load_config(None, ["model.tiny=true", "model.tiny_size=test", "rollout.cfg_scale=5", "rollout.top_k=9"])
    pol = JanusPolicy(cfg, torch.device("cuda")).eval()
    stop, errors = threading.Event(), []

    def reward_work():
        try:
            while not stop.is_set():
                x = torch.randn(256, 256, device="cuda")
                float((x @ x).sum())  # (an allocation, a kernel and a synchronising copy)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    worker = threading.Thread(target=reward_work)
    worker.start()
    try:
        rollouts = [roll(pol, seed=4, G=3) for _ in range(3)]
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    pol.decode_static = ""
    ro_live = roll(pol, seed=4, G=3)
    for ro in rollouts:
        assert torch.equal(ro.replay["image_tokens"].cpu(), ro_live.replay["image_tokens"].cpu())
