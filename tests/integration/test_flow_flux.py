"""FLUX.1 flow policy on tiny random models of the real classes (FluxTransformer2DModel, AutoencoderKL,
CLIPTextModel, T5EncoderModel): latent packing / ids / schedule equal diffusers', the deterministic rollout
reproduces `FluxPipeline`, distilled guidance runs one forward per step, real loading from a local
directory, LoRA export loadable by diffusers. The invariants shared by every flow family (ratio 1, every
trainable parameter trains, reference = initial policy) are in test_flow_common.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from flow_helpers import gen, make_flow_policy, prompt_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red square on the left", "a blue circle on the top"]


def make(**over):
    return make_flow_policy("flux", 3.5, **over)


def batch(prompts=PROMPTS):
    return prompt_batch(prompts)


def test_packing_ids_and_schedule_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from imagerl.policies.flow import sde
    from imagerl.policies.flow.flux import FLUX_SCHEDULER_CONFIG, flux_image_ids, flux_schedule_kwargs, pack_latents, unpack_latents

    z = torch.randn(2, 4, 8, 6)
    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), z)
    assert torch.equal(flux_image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))
    sch = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in FLUX_SCHEDULER_CONFIG.items() if v is not None})
    for steps, seq_len in [(4, 16), (16, 1024), (28, 4096)]:
        kw = flux_schedule_kwargs(FLUX_SCHEDULER_CONFIG, seq_len)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        torch.testing.assert_close(sde.sigma_schedule(steps, **kw), sch.sigmas.float(), atol=1e-6, rtol=0)
    assert flux_schedule_kwargs(FLUX_SCHEDULER_CONFIG, 4096, timestep_shift=3.0) == {"shift": 3.0}


def test_deterministic_rollout_reproduces_flux_pipeline():
    """eval_mode (ODE) from the same initial noise gives the image FluxPipeline gives: same text encoding,
    guidance embedding, shifted sigmas, Euler steps, unpacking and VAE scaling."""
    pol = make(rollout__eval_num_steps=4)
    ro = pol.rollout(batch(), 1, gen(3), eval_mode=True)
    with torch.no_grad():
        ref = pol.pipeline()(
            PROMPTS, latents=ro.replay["latents"][:, 0], num_inference_steps=4, guidance_scale=3.5, height=16, width=16,
            max_sequence_length=pol.comps.max_sequence_length, output_type="pt",
        ).images
    assert ref.shape == ro.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ro.images, ref, atol=1e-4, rtol=0)


def test_rollout_shapes_guidance_embedding_and_prompts_encoded_once():
    pol = make(rollout__num_steps=3)
    assert pol.guidance_distilled
    rows_encoded, fwd = [], []
    h1 = pol.text_encoder.register_forward_pre_hook(lambda m, a, kw: rows_encoded.append(("clip", a[0].shape[0])), with_kwargs=True)
    h2 = pol.text_encoder_2.register_forward_pre_hook(lambda m, a, kw: rows_encoded.append(("t5", a[0].shape[0])), with_kwargs=True)
    h3 = pol.transformer.register_forward_pre_hook(
        lambda m, a, kw: fwd.append((kw["hidden_states"].shape[0], kw["guidance"].clone())), with_kwargs=True)
    ro = pol.rollout(batch(), 4, gen())
    for h in (h1, h2, h3):
        h.remove()
    assert rows_encoded == [("clip", 2), ("t5", 2)]  # B = 2 prompts, once, no negative prompt
    # guidance-distilled: ONE forward of the N = 8 rows per step, guidance 3.5 as an embedding, no uncond rows
    assert [n for n, _ in fwd] == [8, 8, 8] and all(torch.all(g == 3.5) for _, g in fwd)
    assert ro.images.shape == (8, 3, 16, 16) and ro.images.min() >= 0 and ro.images.max() <= 1
    assert ro.images.std() > 0  # not a constant image
    assert ro.old_logp.shape == (8, 3) and ro.mask.all() and torch.isfinite(ro.old_logp).all()
    assert ro.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and ro.prompts[4] == PROMPTS[1]
    assert ro.replay["latents"].shape == (8, 4, 16, 16)  # [N, T+1, (8/2)^2 tokens, 4 * 4 channels]
    assert ro.replay["cond"]["t5"].shape == (8, 16, 32) and ro.replay["cond"]["pooled"].shape == (8, 32)
    torch.testing.assert_close(ro.replay["cond"]["t5"][0], ro.replay["cond"]["t5"][3])
    sig = ro.replay["sigmas"][0]
    assert sig[0] == 1 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()


def test_distilled_guidance_is_kept_without_cfg_in_training():
    # cfg_in_training=false saves the unconditional forward of true CFG; FLUX-dev's embedded guidance has none, so
    # rollouts, their log-probs and the SFT term all stay at cfg_scale (the value the model is deployed with)
    pol = make(rollout__num_steps=2, rollout__cfg_in_training=False)
    seen = []
    pol.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["guidance"][0])), with_kwargs=True)
    ro = pol.rollout(batch(), 2, gen())
    with torch.no_grad():
        out = pol.log_prob(ro, torch.arange(2))
    pol.sft_loss({"prompts": PROMPTS, "images": torch.rand(2, 3, 16, 16)}, gen())
    assert seen == [3.5] * 5 and float(ro.replay["guidance"][0]) == 3.5
    assert (torch.exp(out.logp - ro.old_logp) - 1).abs().max() < 1e-5


def test_true_cfg_for_models_without_guidance_embedding():
    """FLUX.1-schnell-like (guidance_embeds=False): cfg_scale > 1 runs cond + uncond rows in one forward."""
    pol = make(model__tiny_overrides={"guidance_embeds": False}, rollout__num_steps=2, rollout__cfg_scale=4.0)
    assert not pol.guidance_distilled
    fwd = []
    h = pol.transformer.register_forward_pre_hook(
        lambda m, a, kw: fwd.append((kw["hidden_states"].shape[0], kw["guidance"])), with_kwargs=True)
    ro = pol.rollout(batch(), 2, gen())
    h.remove()
    assert fwd == [(8, None), (8, None)]  # 4 cond + 4 uncond rows per step
    # the training forward recomputes the same CFG-mixed transitions (ratio 1), also one sample at a time
    for i in range(len(ro)):
        sub = ro.select(torch.tensor([i]))
        with torch.no_grad():
            out = pol.log_prob(sub, torch.arange(sub.old_logp.shape[1]))
        assert (torch.exp(out.logp - sub.old_logp) - 1).abs().max() < 1e-5


def test_sft_loss_gradients_reach_only_the_transformer():
    pol = make()
    loss = pol.sft_loss({"prompts": PROMPTS, "images": torch.rand(2, 3, 16, 16)}, gen())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in pol.trainable_parameters())
    assert all(p.grad is None for n, p in pol.named_parameters() if not n.startswith("transformer."))


def test_loads_real_layout_from_local_directory(tmp_path):
    """model.tiny=false: FluxPipeline.from_pretrained(model.path) of a saved (tiny) checkpoint."""
    src = make()
    src.pipeline().save_pretrained(str(tmp_path / "ckpt"))
    pol = make(model__tiny=False, model__path=str(tmp_path / "ckpt"), model__image_size=16)
    assert pol.guidance_distilled and pol.comps.max_sequence_length == 512  # FLUX.1-dev's T5 length
    sd = src.transformer.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in pol.transformer.state_dict().items())
    assert not any(p.requires_grad for p in pol.text_encoder.parameters()) and pol.trainable_parameters()
    ro = pol.rollout(batch(), 2, gen())
    assert ro.images.shape == (4, 3, 16, 16) and ro.replay["cond"]["t5"].shape[1] == 512
    # a scheduler that ends at shift_terminal (FLUX.1 leaves it null) is sampled as its pipeline does (was: ignored)
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    conf = tmp_path / "ckpt" / "scheduler" / "scheduler_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "shift_terminal": 0.02}))
    pol = make(model__tiny=False, model__path=str(tmp_path / "ckpt"), model__image_size=16)
    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "ckpt" / "scheduler"))
    seq = pol.latent_shape()[0]
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    torch.testing.assert_close(pol.sigma_schedule(6), sch.sigmas.float(), atol=1e-6, rtol=0)
    assert abs(float(pol.sigma_schedule(6)[-2]) - 0.02) < 1e-6
    with pytest.raises(OSError, match="model.path"):
        make(model__tiny=False, model__path=str(tmp_path / "missing"))


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="model.image_size"):
        make(model__image_size=18)
    with pytest.raises(ValueError, match="tiny_overrides.num_layer"):
        make(model__tiny_overrides={"num_layer": 3})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        make(model__tiny_overrides={"attention_head_dim": 32})
    with pytest.raises(ValueError, match="model.tiny_size"):
        make(model__tiny_size="huge")


def test_recipe_trains_one_step_with_tiny_weights(tmp_path):
    """configs/flux_grpo.yaml validates as written (real FLUX.1-dev settings) and trains with model.tiny=true;
    the trainer's first inner step sees ratio 1 (fp32)."""
    import json
    from pathlib import Path

    from imagerl.config import load_config
    from imagerl.recipes.grpo import GRPOTrainer

    recipe = Path(__file__).resolve().parents[2] / "configs" / "flux_grpo.yaml"
    real = load_config(recipe)
    assert (real.model.family, real.model.path, real.rollout.cfg_scale) == ("flux", "black-forest-labs/FLUX.1-dev", 3.5)
    assert real.model.lora.enabled and real.rewards[0].args["tiny"] is False
    cfg = load_config(recipe, [
        "model.tiny=true", "model.tiny_size=test", "model.dtype=fp32", "run.dtype=fp32", "train.steps=1",
        "data.prompts_per_step=2", "rollout.group_size=2", "rollout.num_steps=3", "logging.console=false",
        "logging.progress_bar=false", "logging.sample_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
        f"run.output_dir={tmp_path}",
    ])
    assert cfg.rewards[0].args["tiny"] is True  # ${model.tiny}: the reward is tiny too, so this runs offline
    GRPOTrainer(cfg).train()
    m = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert m["step"] == 1 and m["ratio/first_epoch_max_dev"] < 1e-5
