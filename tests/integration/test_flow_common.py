"""Invariants every flow family keeps, on tiny random models of its real classes. A new family (the editing
models next) gets them by adding a row to FAMILIES:
- the log-prob recomputed for training equals the rollout's (ratio 1 within 1e-5) for training micro-batches
  that differ from the rollout's, with and without LoRA;
- a few updates change every trainable parameter and nothing frozen;
- inside `reference()` the policy is the initial one (LoRA disabled, or the frozen copy for full fine-tuning),
  and leaving the context restores the trained policy.
Family-specific behaviour (schedules, CFG batching, SDE windows, loading, export) stays in test_flow_<family>.py."""

from __future__ import annotations

import os

import pytest
import torch

from flow_helpers import gen, make_flow_policy, prompt_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAME_LENGTH = ["a red square on the left", "a blue circle on the top"]
# family -> (CFG scale, prompts, prefixes of frozen modules that must exist); Qwen-Image gets prompts of
# different token lengths: its text conditions are padded and masked
FAMILIES = {
    "sd3": (4.5, SAME_LENGTH, ("text_encoder.", "vae.")),
    "flux": (3.5, SAME_LENGTH, ("text_encoder_2.", "vae.")),
    "qwen_image": (4.0, ["a red square on the left", "a cat"], ("text_encoder.", "vae.")),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(family, **over):
    return make_flow_policy(family, FAMILIES[family][0], **over)


def batch(family):
    return prompt_batch(FAMILIES[family][1])


def train_steps(pol, ro, steps):
    """`steps` clipped-surrogate updates on the rollout (4 rows, fixed advantages), every unit chunk."""
    opt = torch.optim.Adam(pol.trainable_parameters(), lr=1e-2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for _ in range(steps):
        opt.zero_grad()
        for units in pol.unit_chunks(ro, gen(5)):
            out = pol.log_prob(ro, units)
            ratio = torch.exp(out.logp - ro.old_logp[:, units])
            loss = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.2)).mean()
            loss.backward()
        opt.step()


# SD3's SDE variants, CFG-in-training and SDE windows are covered in test_flow_sd3.py
RATIO_CASES = [("sd3", "flow_grpo", lora) for lora in (False, True)] + \
    [("flux", sde, lora) for sde in ("flow_grpo", "dance") for lora in (False, True)] + \
    [("qwen_image", "flow_grpo", lora) for lora in (False, True)]


@pytest.mark.parametrize("family,sde,lora", RATIO_CASES)
def test_first_step_ratio_is_one_for_any_micro_batch(family, sde, lora):
    pol = make(family, rollout__sde=sde, lora__enabled=lora, lora__r=4, rollout__micro_batch_size=4)
    ro = pol.rollout(batch(family), 3, gen())  # N = 6 rows, rolled out in chunks of 4
    order = torch.randperm(6, generator=gen(1))
    for mb in (1, 4):  # training micro-batches that differ from the rollout's
        for lo in range(0, 6, mb):
            sub = ro.select(order[lo: lo + mb])
            for units in pol.unit_chunks(sub, gen(2)):
                with torch.no_grad():
                    out = pol.log_prob(sub, units)
                ratio = torch.exp(out.logp - sub.old_logp[:, units])
                assert (ratio - 1).abs().max() < 1e-5, (mb, units, (ratio - 1).abs().max())


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_changes_every_trainable_parameter_and_nothing_frozen(family, lora):
    pol = make(family, lora__enabled=lora, lora__r=4, lora__alpha=8.0)
    params = pol.named_trainable_parameters()
    assert params and all("lora_" in n for n, _ in params) == lora
    frozen = {n: p.detach().clone() for n, p in pol.named_parameters() if not p.requires_grad}
    for prefix in FAMILIES[family][2]:
        assert any(n.startswith(prefix) for n in frozen), prefix
    before = {n: p.detach().clone() for n, p in params}
    ro = pol.rollout(batch(family), 2, gen())
    # LoRA's B starts at zero, so A has no gradient in the first step; the second step moves it as well
    train_steps(pol, ro, 2 if lora else 1)
    unchanged = [n for n, p in params if torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged[:5]
    for n, p in pol.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_context_is_the_initial_policy(family, lora):
    pol = make(family, lora__enabled=lora, lora__r=4, algorithm__kl_coef=0.01)
    pol.setup_reference()
    ro = pol.rollout(batch(family), 2, gen())
    units = pol.unit_chunks(ro, gen())[0]
    with torch.no_grad():
        init = pol.log_prob(ro, units, need_kl_terms=True)
    train_steps(pol, ro, 2)
    with torch.no_grad():
        cur = pol.log_prob(ro, units, need_kl_terms=True)
        with pol.reference():
            ref = pol.log_prob(ro, units, need_kl_terms=True)
        after = pol.log_prob(ro, units, need_kl_terms=True)
    assert (cur.velocity - init.velocity).abs().max() > 1e-4  # training moved the policy
    torch.testing.assert_close(ref.velocity, init.velocity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.logp, init.logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.logp, ro.old_logp[:, units], atol=1e-5, rtol=0)  # = the rollout's policy
    torch.testing.assert_close(after.velocity, cur.velocity)  # leaving the context restores the policy
    assert ref.mean.shape == ref.velocity.shape and ref.std.shape[0] == len(ro)
    sig = ro.replay["sigmas"]  # the step sizes mean_dt weights by
    torch.testing.assert_close(ref.dt, (sig[:, units] - sig[:, units + 1]).float())
    assert (ref.dt > 0).all()


def test_building_bf16_policies_and_their_pipelines_prints_nothing():
    """A user's console shows our progress, not library chatter: importing diffusers' pipelines (which import
    transformers' CLIP/SigLIP image processors and, without torchvision, made transformers print a fallback
    notice on every run) and casting tiny random modules to bf16 (diffusers' warning about fp32-only modules,
    of which tiny models have none) write nothing to stderr. One fresh interpreter builds every family."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; from flow_helpers import make_flow_policy\n"
            f"for family in {sorted(FAMILIES)!r}:\n"
            "    pol = make_flow_policy(family, 1.0, model__dtype='bf16')\n"
            "    assert pol.transformer.dtype == torch.bfloat16\n"
            "    if hasattr(type(pol), 'pipeline'): pol.pipeline()  # (SD3 builds its pipeline up front)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr == "", p.stderr[-2000:]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_transformers_get_the_pipelines_timesteps(family):
    """The timestep a bf16 transformer is conditioned on is its pipeline's: fp32 t = 1000 sigma for SD3, t rounded
    to the latents' dtype then / 1000 for FLUX and Qwen-Image (the transformer multiplies by 1000 again)."""
    pol = make(family, model__dtype="bf16")
    seen = []
    pol.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    sigma = torch.tensor([0.92308, 0.81818])
    with torch.no_grad():
        pol.transformer_forward(torch.randn(2, *pol.latent_shape()), sigma, pol.encode_prompts(SAME_LENGTH))
    if family == "sd3":
        assert seen[0].dtype == torch.float32 and torch.equal(seen[0], sigma * 1000)
    else:
        assert torch.equal(seen[0], (sigma * 1000).to(torch.bfloat16) / 1000)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_pretrained_lora_loads_in_diffusers(family, tmp_path):
    """Trained LoRA weights exported with save_pretrained load into the family's diffusers pipeline
    (`load_lora_weights`) and give the trained policy's velocity."""
    g = FAMILIES[family][0]
    lp = make(family, lora__enabled=True, lora__r=4)
    with torch.no_grad():
        for _, p in lp.named_trainable_parameters():
            p.add_(0.01)
    lp.save_pretrained(str(tmp_path / "lora"))
    fresh = make(family)
    fresh.pipeline().load_lora_weights(str(tmp_path / "lora"))
    x = torch.randn(2, *lp.latent_shape())
    cond = lp.encode_prompts(FAMILIES[family][1])
    sig = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        loaded, trained = fresh.predict_velocity(x, sig, cond, g), lp.predict_velocity(x, sig, cond, g)
        torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
        assert (make(family).predict_velocity(x, sig, cond, g) - trained).abs().max() > 1e-4  # the adapter matters


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encode_images_is_in_the_units_decode_reads(family):
    """The SFT targets (`encode_images`: the VAE posterior mean, shifted/scaled or normalised, packed) are in the
    units the rollout's latents have: decoding them is the VAE's own round trip of the image (decode is tied to the
    diffusers pipelines elsewhere, so a wrong scale, shift or per-channel statistic here would show)."""
    pol = make(family)
    imgs = torch.rand(2, 3, pol.image_size, pol.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lat = pol.encode_images(imgs)
        assert lat.shape[1:] == tuple(pol.latent_shape())
        x = imgs * 2 - 1
        if family == "qwen_image":  # (a video VAE: one frame)
            raw = pol.vae.decode(pol.vae.encode(x.unsqueeze(2)).latent_dist.mean).sample[:, :, 0]
        else:
            raw = pol.vae.decode(pol.vae.encode(x).latent_dist.mean).sample
        torch.testing.assert_close(pol.decode(lat).clamp(0, 1), ((raw.float() + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)
