"""SD3 flow policy on tiny random diffusers/transformers models (the real classes): rollout structure,
log-prob consistency across micro-batch compositions for every SDE, with and without CFG in training and
with an SDE window, SFT gradients, evaluation determinism, export. The invariants shared by every flow
family (every trainable parameter trains, reference = initial policy) are in test_flow_common.py."""

from __future__ import annotations

import os

import pytest
import torch

from flow_helpers import gen, make_flow_policy, prompt_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red square on the left", "a blue circle on the top"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(**over):
    return make_flow_policy("sd3", 4.5, **over)


def batch(prompts=PROMPTS):
    return prompt_batch(prompts)


@pytest.mark.parametrize("sde", ["flow_grpo", "cps", "dance"])
@pytest.mark.parametrize("cfg_in_training", [True, False])
def test_first_step_ratio_is_one_for_any_micro_batch(sde, cfg_in_training):
    """The recomputed log-prob equals the rollout's to 1e-5 when the training micro-batch differs from the
    rollout batch (sizes 1, 2, 4, shuffled rows), with CFG on and off and an SDE window."""
    pol = make(rollout__sde=sde, rollout__cfg_in_training=cfg_in_training, rollout__num_steps=6,
               rollout__sde_window=3, rollout__sde_window_range=[1, 5])
    ro = pol.rollout(batch(), 3, gen())
    assert ro.old_logp.shape == (6, 6) and ro.mask.shape == (6, 6)
    window = ro.mask[0].nonzero().reshape(-1)
    assert 1 <= len(window) <= 3 and 1 <= int(window[0]) <= 2  # CPS may lose the last step (std 0)
    assert (ro.old_logp[~ro.mask] == 0).all() and (ro.old_logp[ro.mask] != 0).all()
    assert float(ro.replay["guidance"][0]) == (4.5 if cfg_in_training else 1.0)
    order = torch.randperm(6, generator=gen(1))
    for mb in (1, 2, 4):
        for lo in range(0, 6, mb):
            idx = order[lo: lo + mb]
            sub = ro.select(idx)
            units = window
            with torch.no_grad():
                out = pol.log_prob(sub, units)
            ratio = torch.exp(out.logp - sub.old_logp[:, units])
            assert (ratio - 1).abs().max() < 1e-5, (mb, (ratio - 1).abs().max())


def test_rollout_encodes_once_per_prompt_and_batches_cfg():
    pol = make(rollout__num_steps=3)
    seen_prompts, fwd_batches = [], []
    orig = pol.encode_prompts
    pol.encode_prompts = lambda p: (seen_prompts.append(list(p)), orig(p))[1]
    h = pol.transformer.register_forward_pre_hook(lambda m, args, kwargs: fwd_batches.append(kwargs["hidden_states"].shape[0]),
                                                  with_kwargs=True)
    pol._neg_cond = None
    ro = pol.rollout(batch(), 4, gen())
    h.remove()
    assert [p for p in seen_prompts if p != [""]] == [PROMPTS]  # B prompts, not N = B*G
    assert fwd_batches == [16, 16, 16]  # one forward per step: 8 cond + 8 uncond rows
    assert ro.images.shape == (8, 3, 16, 16) and 0 <= ro.images.min() and ro.images.max() <= 1
    assert ro.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ro.prompts[3] == PROMPTS[0] and ro.metadata[4] == {"i": 1}
    assert ro.replay["latents"].shape == (8, 4, 4, 8, 8)  # [N, T+1, C, h, w]
    torch.testing.assert_close(ro.replay["cond"]["pooled"][0], ro.replay["cond"]["pooled"][3])


def test_rollout_micro_batches_and_shared_noise():
    pol = make(rollout__shared_noise=True)
    full = pol.rollout(batch(), 3, gen())
    lat0 = full.replay["latents"][:, 0]
    assert torch.equal(lat0[0], lat0[2]) and not torch.equal(lat0[0], lat0[3])
    # every row's stream stays where an unshared run has it: a group's first row, whose start noise is the shared
    # one, follows the same whole trajectory in both
    pol.cfg.rollout.shared_noise = False
    own = pol.rollout(batch(), 3, gen())
    pol.cfg.rollout.shared_noise = True
    for r in (0, 3):
        assert torch.equal(own.replay["latents"][r], full.replay["latents"][r])
    pol.cfg.rollout.micro_batch_size = 2
    chunked = pol.rollout(batch(), 3, gen())
    torch.testing.assert_close(chunked.old_logp, full.old_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.images, full.images, atol=1e-5, rtol=0)


def test_unit_chunks_timestep_fraction():
    pol = make(algorithm__timestep_fraction=0.6, rollout__num_steps=10)
    ro = pol.rollout(batch(), 2, gen())
    chunks = pol.unit_chunks(ro, gen(3))
    assert len(chunks) == 6 and all(c.numel() == 1 for c in chunks)  # 0.6 * 10
    assert len({int(c) for c in chunks}) == 6 and all(ro.mask[0, int(c)] for c in chunks)
    assert [int(c) for c in chunks] != [int(c) for c in pol.unit_chunks(ro, gen(4))]
    # the floor, as Flow-GRPO's int(): its 0.99 of 10 steps trains 9 of them
    pol.cfg.algorithm.timestep_fraction = 0.99
    assert len(pol.unit_chunks(ro, gen(3))) == 9
    # timestep_selection=first: the first 9 SDE steps in order, whatever the stream (the last step never trains)
    pol.cfg.algorithm.timestep_selection = "first"
    sde = [int(i) for i in torch.nonzero(ro.mask[0]).flatten()]
    assert [int(c) for c in pol.unit_chunks(ro, gen(3))] == [int(c) for c in pol.unit_chunks(ro, gen(4))] == sde[:9]


def test_sft_loss_is_the_flow_matching_loss_on_the_vae_latents():
    """sft_loss = mean ||v(x_sigma, sigma) - (eps - x0)||^2 with x_sigma = (1 - sigma) x0 + sigma eps, where x0 is
    the VAE's posterior mean in the transformer's latent units ((z - shift) * scale: what decode undoes)."""
    import torch.nn.functional as F

    pol = make()
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = pol.sft_loss({"prompts": PROMPTS, "images": imgs}, gen(5))
    g, c = gen(5), pol.vae.config
    with torch.no_grad():
        z = pol.vae.encode(imgs * 2 - 1).latent_dist.mean
        x0 = (z - c.shift_factor) * c.scaling_factor
        torch.testing.assert_close(pol.decode(x0), (pol.vae.decode(z).sample + 1) / 2)  # (the units decode reads)
        sigma = torch.rand((2,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.reshape(2, 1, 1, 1)
        v = pol.transformer_forward((1 - s) * x0 + s * eps, sigma, pol.encode_prompts(PROMPTS)).float()
    torch.testing.assert_close(loss, F.mse_loss(v, eps - x0))
    assert not torch.allclose(loss, F.mse_loss(v, x0 - eps))  # (the target's sign matters)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_loss_grads_only_on_trainable(lora):
    pol = make(lora__enabled=lora, lora__r=4)
    imgs = torch.rand(2, 3, 24, 24)  # resized to the policy's 16 px
    loss = pol.sft_loss({"prompts": PROMPTS, "images": imgs}, gen())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for n, p in pol.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0 or "lora_A" in n, n  # LoRA A: zero grad while B == 0
        else:
            assert p.grad is None, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pol.trainable_parameters())
    with pytest.raises(ValueError, match="images"):
        pol.sft_loss({"prompts": PROMPTS, "images": imgs[:1]}, gen())


def test_eval_mode_is_deterministic_ode():
    pol = make(rollout__eval_num_steps=5, rollout__eval_cfg_scale=2.0)
    a = pol.rollout(batch(), 2, gen(7), eval_mode=True)
    b = pol.rollout(batch(), 2, gen(7), eval_mode=True)
    assert a.old_logp.shape == (4, 5) and not a.mask.any() and (a.old_logp == 0).all()
    assert float(a.replay["guidance"][0]) == 2.0 and a.replay["sde"] == "ode"
    assert torch.equal(a.images, b.images)
    assert pol.unit_chunks(a, gen()) == []
    # ODE: the image is a function of the initial noise only (no noise is drawn after it)
    # each row's start noise is the first draw of its own stream (Policy.row_generators)
    rows = pol.row_generators(gen(7), a.group_ids.cpu(), 2)
    x0 = torch.stack([torch.randn(pol.latent_shape(), generator=g) for g in rows])
    torch.testing.assert_close(a.replay["latents"][:, 0], x0)


def test_bad_inputs_name_the_field():
    from diffusers import StableDiffusion3Pipeline

    from imagerl.policies.flow.base import load_pipeline

    # a hub id that is neither cached nor reachable (HF_HUB_OFFLINE=1 here): the fix for that, first
    with pytest.raises(OSError, match=r"^model.path='stabilityai/stable-diffusion-3.5-medium': 'stabilityai/stable-"
                                      r"diffusion-3.5-medium' is not in the Hugging Face cache and the hub could not be "
                                      r"reached: download it .*`hf download stabilityai/stable-diffusion-3.5-medium`"):
        load_pipeline(StableDiffusion3Pipeline, "stabilityai/stable-diffusion-3.5-medium", torch.float32)
    with pytest.raises(ValueError, match="rollout.sde"):
        make(rollout__sde="ddpm")
    with pytest.raises(ValueError, match="model.tiny_size"):
        make(model__tiny_size="huge")
    with pytest.raises(ValueError, match="tiny_overrides.num_layer"):
        make(model__tiny_overrides={"num_layer": 3})
    pol = make(rollout__sde_window=2, rollout__sde_window_range=[5, 9])
    with pytest.raises(ValueError, match="sde_window_range"):
        pol.rollout(batch(), 2, gen())
    with pytest.raises(ValueError, match="sde_window_range"):  # (and before training starts)
        pol.check_training_config()
    with pytest.raises(ValueError, match=r"holds only the last of rollout.num_steps=4 steps, which CPS takes without noise"):
        make(rollout__sde="cps", rollout__num_steps=4, rollout__sde_window=1,
             rollout__sde_window_range=[3, 4]).check_training_config()
    # a rollout without noise has nothing to train on (every step masked: loss 0, no update): refused before
    # training, while the same policy still samples and evaluates
    for over, field in (({"rollout__sde": "ode"}, "rollout.sde=ode"), ({"rollout__noise_level": 0.0}, "rollout.noise_level=0.0")):
        pol = make(**over)
        with pytest.raises(ValueError, match=f"^{field}: the rollout draws no noise"):
            pol.check_training_config()
        assert not pol.rollout(batch(), 2, gen()).mask.any()
    make().check_training_config()
    with pytest.raises(ValueError, match=r"^rollout.sde=cps with rollout.num_steps=1: CPS's last step"):
        make(rollout__sde="cps", rollout__num_steps=1).check_training_config()


def test_one_step_flow_grpo_rollout_has_the_papers_noise():
    # one step from sigma 1 to 0: g = a (Flow-GRPO's cap is the schedule's second sigma, 0 here), so the step's std
    # is a = 0.7, not a sqrt(1000); and the recomputed log-prob still equals the rollout's
    pol = make(rollout__num_steps=1)
    ro = pol.rollout(batch(), 2, gen())
    lat = ro.replay["latents"]
    assert ro.mask.all() and float(lat[:, -1].std()) < 2 * float(lat[:, 0].std())
    with torch.no_grad():
        out = pol.log_prob(ro, torch.tensor([0]), need_kl_terms=True)
    assert torch.allclose(out.std.float().flatten(), torch.full((4,), 0.7))
    assert (torch.exp(out.logp - ro.old_logp) - 1).abs().max() < 1e-5


def test_save_pretrained_loads_in_diffusers(tmp_path):
    from diffusers import SD3Transformer2DModel

    pol = make()
    pol.save_pretrained(str(tmp_path / "full"))
    t = SD3Transformer2DModel.from_pretrained(str(tmp_path / "full" / "transformer"))
    sd = pol.transformer.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in t.state_dict().items())

    lp = make(lora__enabled=True, lora__r=4)
    with torch.no_grad():
        for n, p in lp.named_trainable_parameters():
            p.add_(0.01)
    lp.save_pretrained(str(tmp_path / "lora"))
    fresh = make()
    fresh._pipe.load_lora_weights(str(tmp_path / "lora"))
    x = torch.randn(2, *lp.latent_shape())
    cond = lp.encode_prompts(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(fresh.transformer_forward(x, torch.tensor([0.5, 0.5]), cond),
                                   lp.transformer_forward(x, torch.tensor([0.5, 0.5]), cond), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_demo_flow_reward_goes_up(tmp_path):
    """configs/demo_flow.yaml through the real trainer: the brightness reward rises (about 35 s)."""
    import json

    from imagerl.config import load_config
    from imagerl.recipes.grpo import train

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo_flow.yaml")
    cfg = load_config(path, [f"run.output_dir={tmp_path}", "train.steps=40",
                                                  "logging.sample_every=0", "logging.progress_bar=false",
                                                  "logging.console=false", "checkpoint.save_final=false"])
    train(cfg)
    r = [json.loads(line)["reward/mean"] for line in open(tmp_path / "metrics.jsonl")]
    assert len(r) == 40
    assert sum(r[-10:]) / 10 > sum(r[:10]) / 10 + 0.1, r


def test_sigma_schedule_is_the_sd3_pipelines():
    """Sampling steps are the SD3 pipeline's default ones (what Flow-GRPO samples with): the model's scheduler
    with no sigmas passed, at the configured shift; rollout.timestep_shift changes the shift of both."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift, over in ((3.0, {}), (5.0, {"rollout__timestep_shift": 5.0})):
        pol = make(**over)
        for n in (1, 10, 40):
            sch = FlowMatchEulerDiscreteScheduler(shift=shift)
            sch.set_timesteps(n)
            torch.testing.assert_close(pol.sigma_schedule(n), sch.sigmas.float(), atol=1e-6, rtol=1e-5)
        # the last sigma before 0 is small (0.009 at shift 3); the 1/T schedule's would be 0.25 (shift 3) or 0.36
        assert float(pol.sigma_schedule(10)[-2]) < 0.03


def test_a_checkpoints_own_shift_is_sampled_with(tmp_path):
    # model.path's scheduler sets the static shift (3.0 in every SD3 release); one with another shift samples with
    # it, as its pipeline does (the policy used 3.0 always); options whose sigmas we do not replicate are refused
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    make()._pipe.save_pretrained(str(tmp_path / "ck"))
    conf = tmp_path / "ck" / "scheduler" / "scheduler_config.json"
    c = json.loads(conf.read_text())
    conf.write_text(json.dumps({**c, "shift": 5.0}))
    pol = make(model__tiny=False, model__path=str(tmp_path / "ck"), model__image_size=16)
    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "ck" / "scheduler"))
    sch.set_timesteps(10)
    torch.testing.assert_close(pol.sigma_schedule(10), sch.sigmas.float(), atol=1e-6, rtol=1e-5)
    for key, match in (("use_dynamic_shifting", "dynamic .* shifting"), ("use_karras_sigmas", "sets use_karras_sigmas")):
        conf.write_text(json.dumps({**c, key: True}))
        with pytest.raises(ValueError, match=rf"^model.path='.*ck': its scheduler .*{match}"):
            make(model__tiny=False, model__path=str(tmp_path / "ck"), model__image_size=16)
        # the fix both errors give: a static shift of one's own, which replaces the checkpoint's schedule
        pol = make(model__tiny=False, model__path=str(tmp_path / "ck"), model__image_size=16, rollout__timestep_shift=4.0)
        assert pol.timestep_schedule_kwargs()["shift"] == 4.0


def test_sq_dist_log_prob_is_flow_grpo_cps_convention_and_keeps_ratio_one():
    # algorithm.log_prob=sq_dist: -||x_next - mean||^2 (latent mean), the same in rollout and training
    pol = make(rollout__sde="cps", rollout__num_steps=4, algorithm__log_prob="sq_dist")
    ro = pol.rollout(batch(), 2, gen())
    units = ro.mask[0].nonzero().reshape(-1)
    with torch.no_grad():
        out = pol.log_prob(ro.select(torch.tensor([3, 1])), units, need_kl_terms=True)
    old = ro.old_logp[[3, 1]][:, units]
    assert (torch.exp(out.logp - old) - 1).abs().max() < 1e-5
    lat = ro.replay["latents"][[3, 1]]
    want = -((lat[:, units + 1] - out.mean) ** 2).flatten(2).mean(-1)
    torch.testing.assert_close(out.logp, want, atol=1e-6, rtol=1e-5)
    assert (old < 0).all() and (old > -1).all()  # the squared distance of a sigma' sin(eta pi / 2)-wide step


def test_deterministic_rollout_reproduces_sd3_pipeline():
    """eval_mode (ODE, true CFG 4.5 with the empty negative prompt) from the same initial noise gives the image
    StableDiffusion3Pipeline gives with its default schedule: same encoders, CFG batching, sigmas, Euler steps
    and VAE scaling."""
    pol = make(rollout__eval_num_steps=4)
    prompts = ["a red cube on a table", "two blue dogs"]
    ro = pol.rollout(batch(prompts), 1, gen(3), eval_mode=True)
    with torch.no_grad():
        ref = pol.pipeline()(prompts, latents=ro.replay["latents"][:, 0], num_inference_steps=4, guidance_scale=4.5,
                        height=16, width=16, max_sequence_length=pol.max_sequence_length, output_type="pt").images
    assert ref.shape == ro.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ro.images, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(ro.replay["sigmas"][0], pol.pipeline().scheduler.sigmas.float(), atol=1e-6, rtol=0)
