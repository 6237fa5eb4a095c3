"""Qwen-Image flow policy on tiny random models of the real classes (QwenImageTransformer2DModel,
AutoencoderKLQwenImage, Qwen2_5_VLForConditionalGeneration): schedule with shift_terminal equals diffusers',
the deterministic rollout reproduces `QwenImagePipeline` (template + drop index, norm-preserving true CFG),
cond and uncond rows share one forward, loading from a local directory. The invariants shared by every flow
family (ratio 1 with prompts of different lengths, every trainable parameter trains, reference = initial
policy) are in test_flow_common.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from flow_helpers import gen, make_flow_policy, prompt_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# prompts of different token lengths: text conditions are padded and masked
PROMPTS = ["a red square on the left", "a cat"]


def make(**over):
    return make_flow_policy("qwen_image", 4.0, **over)


def batch(prompts=PROMPTS):
    return prompt_batch(prompts)


def test_schedule_and_cfg_math():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from imagerl.policies.flow.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG, norm_preserving_cfg, qwen_image_sigmas

    sch = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in QWEN_IMAGE_SCHEDULER_CONFIG.items() if v is not None})
    for steps, seq_len in [(4, 16), (10, 1024), (50, 4096)]:
        mu = 0.5 + (0.9 - 0.5) / (8192 - 256) * (seq_len - 256)
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = qwen_image_sigmas(QWEN_IMAGE_SCHEDULER_CONFIG, steps, seq_len)
        torch.testing.assert_close(ours, sch.sigmas.float(), atol=1e-6, rtol=0)
        assert abs(float(ours[-2]) - 0.02) < 1e-6  # stretched to shift_terminal
    vc, vu = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    v = norm_preserving_cfg(vc, vu, 4.0)
    torch.testing.assert_close(v.norm(dim=-1), vc.norm(dim=-1))  # per-token norm of the conditional velocity
    direction = vu + 4.0 * (vc - vu)
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), direction / direction.norm(dim=-1, keepdim=True))


def test_deterministic_rollout_reproduces_qwen_image_pipeline():
    pol = make()
    ro = pol.rollout(batch(), 1, gen(3), eval_mode=True)
    with torch.no_grad():
        ref = pol.pipeline()(
            PROMPTS, negative_prompt=[" "] * 2, true_cfg_scale=4.0, latents=ro.replay["latents"][:, 0],
            num_inference_steps=4, height=16, width=16, output_type="pt",
        ).images
    assert ref.shape == ro.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ro.images, ref, atol=1e-4, rtol=0)


def test_rollout_shapes_cfg_batching_and_prompts_encoded_once():
    pol = make(rollout__num_steps=3)
    encoded, fwd = [], []
    h1 = pol.text_encoder.register_forward_pre_hook(lambda m, a, kw: encoded.append(kw["input_ids"].shape[0]), with_kwargs=True)
    h2 = pol.transformer.register_forward_pre_hook(
        lambda m, a, kw: fwd.append((kw["hidden_states"].shape[0], kw["encoder_hidden_states_mask"].clone())), with_kwargs=True)
    ro = pol.rollout(batch(), 4, gen())
    ro2 = pol.rollout(batch(), 4, gen(1))
    for h in (h1, h2):
        h.remove()
    assert encoded == [2, 1, 2]  # the B = 2 prompts, the negative prompt once (cached), the next rollout's 2
    assert [n for n, _ in fwd] == [16] * 6  # one forward per step: 8 cond + 8 uncond rows
    lens = ro.replay["cond"]["mask"].sum(1)
    assert lens[0] > lens[4] and (ro.replay["cond"]["mask"][4, int(lens[4]):] == 0).all()  # padded + masked
    assert ro.images.shape == (8, 3, 16, 16) and ro.images.min() >= 0 and ro.images.max() <= 1
    assert ro.old_logp.shape == (8, 3) and ro.mask.all() and torch.isfinite(ro.old_logp).all()
    assert ro.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and ro.metadata[5] == {"i": 1}
    assert ro.replay["latents"].shape == (8, 4, 16, 16)  # [N, T+1, (8/2)^2 tokens, 4 * 4 channels]
    assert not torch.equal(ro.images, ro2.images)


def test_sft_loss_and_image_encoding_roundtrip_shapes():
    pol = make()
    imgs = torch.rand(2, 3, 16, 16)
    lat = pol.encode_images(imgs)
    assert lat.shape == (2, *pol.latent_shape())
    assert pol.decode(lat).shape == (2, 3, 16, 16)
    loss = pol.sft_loss({"prompts": PROMPTS, "images": imgs}, gen())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in pol.trainable_parameters())
    assert all(p.grad is None for n, p in pol.named_parameters() if not n.startswith("transformer."))


def test_loads_from_local_directory(tmp_path):
    src = make()
    src.pipeline().save_pretrained(str(tmp_path / "ckpt"))
    pol = make(model__tiny=False, model__path=str(tmp_path / "ckpt"), model__image_size=16, lora__enabled=True, lora__r=4)
    sd = src.transformer.state_dict()
    loaded = {k.replace(".base_layer", ""): v for k, v in pol.transformer.state_dict().items() if "lora_" not in k}
    assert loaded.keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in loaded.items())
    assert pol.comps.drop_idx == 34  # the upstream pipeline's template drop index
    assert not any(p.requires_grad for p in pol.text_encoder.parameters())
    assert all("lora_" in n for n, _ in pol.named_trainable_parameters())
    ro = pol.rollout(batch(), 2, gen())
    assert ro.images.shape == (4, 3, 16, 16) and torch.isfinite(ro.old_logp).all()
    with pytest.raises(OSError, match="model.path"):
        make(model__tiny=False, model__path=str(tmp_path / "missing"))


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="model.image_size"):
        make(model__image_size=18)
    with pytest.raises(ValueError, match="tiny_overrides.num_layer"):
        make(model__tiny_overrides={"num_layer": 3})


def test_recipe_trains_one_step_with_tiny_weights(tmp_path):
    """configs/qwen_image_grpo.yaml validates as written and trains with model.tiny=true (fp32: ratio 1)."""
    import json
    from pathlib import Path

    from imagerl.config import load_config
    from imagerl.recipes.grpo import GRPOTrainer

    recipe = Path(__file__).resolve().parents[2] / "configs" / "qwen_image_grpo.yaml"
    real = load_config(recipe)
    assert (real.model.family, real.model.path, real.rollout.cfg_scale) == ("qwen_image", "Qwen/Qwen-Image", 4.0)
    assert real.model.lora.enabled and real.rollout.sde_window == 2
    cfg = load_config(recipe, [
        "model.tiny=true", "model.tiny_size=test", "model.dtype=fp32", "run.dtype=fp32", "train.steps=1",
        "data.prompts_per_step=2", "rollout.group_size=2", "rollout.num_steps=4", "logging.console=false",
        "logging.progress_bar=false", "logging.sample_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
        f"run.output_dir={tmp_path}",
    ])
    GRPOTrainer(cfg).train()
    m = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert m["step"] == 1 and m["ratio/first_epoch_max_dev"] < 1e-5
