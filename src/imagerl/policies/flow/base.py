"""FlowPolicy: the family-independent part of every flow-matching policy (SD3, FLUX, Qwen-Image ...).

What it does (Flow-GRPO, Liu et al. 2025; MixGRPO's SDE window, Li et al. 2025; DeepGen-RL's
per-timestep training without CFG):

- `rollout`: G samples per prompt. Prompt conditions are encoded ONCE per prompt and repeated for the G
  samples; optional shared initial noise per group; CFG (cond and uncond rows in ONE transformer forward);
  SDE steps only inside a window of `rollout.sde_window` consecutive steps at a seeded random position
  inside `rollout.sde_window_range` = [lo, hi) (ODE elsewhere; 0 = every step is SDE). The latent before and
  after every step, the sigmas, the per-step noise level and the guidance are stored in `replay`;
  `old_logp` is [N, T = num_steps], `mask` False on deterministic (ODE, or zero-std) steps.
  `eval_mode`: deterministic ODE with `eval_num_steps` / `eval_cfg_scale`.
- `unit_chunks`: a random subset of floor(timestep_fraction * #SDE steps) SDE steps (at least one), each
  its own chunk, so the trainer runs one forward (+ backward) per step with gradient accumulation.
- `log_prob`: recomputes the transition density of the stored next latent at the selected steps with the
  rollout's own sigma, noise level and guidance. Only tensor rows of the micro-batch enter the forward,
  and each row's computation does not depend on the other rows, so the first-step ratio is 1 for any
  micro-batch composition (tests/integration/test_flow_sd3.py proves it to 1e-5 in fp32).
- `sft_loss`: flow-matching velocity MSE at uniformly drawn sigma on prompt+image pairs (DeepGen-RL's
  auxiliary SFT term). Departure: SD3 pre-training draws sigma from a logit-normal; uniform is simpler
  and weights all noise levels equally, which is what a small regulariser wants.

`rollout.cfg_in_training=false` (DeepGen-RL) samples the rollout WITHOUT CFG, so that the trained
distribution is the one that was sampled; CFG then applies only at evaluation (`eval_cfg_scale`).

Hooks a family adapter implements (see sd3.py for a complete example):

    encode_prompts(prompts: list[str]) -> dict[str, Tensor]
        Text conditions for B prompts, every tensor with leading dim B, computed under no_grad by the
        frozen text encoders. Called once per prompt per rollout (the base repeats rows for the G
        samples) and once for [""] (the unconditional branch, cached). All prompts must encode to the
        same sequence length (pad to a fixed max length), so that conds of different batches concatenate.
    transformer_forward(latents [n, *latent_shape], sigma [n], cond: dict) -> velocity [n, *latent_shape]
        ONE forward of the trainable transformer on a batch (no CFG here: the base batches cond and
        uncond rows into one call). `sigma` in [0, 1]; convert to the family's timestep convention
        (SD3: sigma * 1000) and pack/unpack latents inside.
    decode(latents [n, *latent_shape]) -> images [n, 3, H, W] float in [0, 1]     (frozen VAE, no_grad)
    encode_images(images [n, 3, H, W] in [0, 1]) -> latents [n, *latent_shape]    (frozen VAE, no_grad)
    latent_shape() -> tuple[int, ...]
        Shape of one sample's latent at `self.image_size` (SD3: (C, H/8, W/8); FLUX may use the unpacked
        (C, h, w) and pack inside transformer_forward).
    trainable_module() -> nn.Module                     the transformer (LoRA-wrapped or not)
    save_pretrained(path)                               family-library-loadable weights
    optional: timestep_schedule_kwargs() -> {"shift": s} or {"mu": mu}  (FLUX/Qwen: dynamic mu from the
        image token count; default: rollout.timestep_shift or the class attribute `default_shift`)
    optional: predict_velocity(...) override for guidance-distilled models (FLUX-dev passes guidance as
        an embedding instead of running an uncond branch).

A family's constructor builds/loads its modules, then calls `self.setup_trainable(self.transformer)`
(LoRA via diffusers `add_adapter`, or full fine-tuning of `model.trainable` substrings), freezes the
rest with `self.freeze(module)`, and sets `self.image_size`. Helper for tiny builds: `tiny_preset(...)`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Config
from ...registry import did_you_mean
from ...types import LogProbOutput, PromptBatch, Rollout
from ..base import Policy, not_downloaded_error, sum_sharded_gradients
from . import sde as sde_math


class _TorchvisionFallbackNotice(logging.Filter):
    """diffusers' pipeline modules import transformers' CLIP / SigLIP image processors (for IP-adapters) at import
    time; without torchvision, which imagerl does not install and no flow policy needs (those processors are never
    used here), transformers then prints a two-line notice that it falls back to its PIL processors on every run.
    This drops exactly that notice, nothing else from transformers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# (a filter on the logger that creates the record: it applies before any handler sees it)
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())


def move_module(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """Move a module to `device`, casting to `dtype` only when given and different (loaded pipelines
    already have their dtype, and some keep chosen submodules in fp32 on purpose)."""
    module = module.to(device)
    if dtype is not None and any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        from diffusers.utils import logging as dlogging

        # tiny random models have no fp32-only modules; silence diffusers' generic warning about casting
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            module = module.to(dtype)
        finally:
            dlogging.set_verbosity(level)
    return module


def load_pipeline(pipeline_cls: Any, path: str, dtype: torch.dtype, revision: str = "", layout: str = "",
                  example: str = "", timestep_shift: float = 0.0) -> Any:
    """`pipeline_cls.from_pretrained(path)` with the error every family gives: it names model.path, the
    directory layout diffusers expects and an example hub id (downloaded beforehand: HF_HUB_OFFLINE is honoured)."""
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if revision:
        kwargs["revision"] = revision
    try:
        pipe = pipeline_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        if msg := not_downloaded_error(path, e):
            raise OSError(msg) from e
        raise OSError(
            f"model.path='{path}': could not load a {pipeline_cls.__name__} ({e}). Give a local diffusers directory "
            f"({layout or 'model_index.json and one folder per component'}) or a hub id such as {example} "
            "(downloaded beforehand: HF_HUB_OFFLINE is honoured), or set model.tiny=true"
        ) from e
    if timestep_shift <= 0:  # (rollout.timestep_shift replaces the checkpoint's schedule: nothing of it to replicate)
        check_scheduler_options(getattr(getattr(pipe, "scheduler", None), "config", None) or {}, path)
    return pipe


# FlowMatchEulerDiscreteScheduler options that change the sigmas in ways our schedule (shift / mu, and the terminal
# stretch) does not replicate: refused, not ignored (ignored, the rollout would silently sample another schedule
# than the checkpoint's pipeline). No released SD3 / FLUX / Qwen-Image checkpoint sets them.
_UNSUPPORTED_SCHEDULER_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def check_scheduler_options(config: Any, path: str) -> None:
    on = [k for k in _UNSUPPORTED_SCHEDULER_OPTIONS if config.get(k)]
    # (the time-shift type matters only with dynamic shifting: a static shift is the same formula either way)
    if config.get("use_dynamic_shifting") and config.get("time_shift_type", "exponential") not in (None, "exponential"):
        on.append(f"time_shift_type={config.get('time_shift_type')}")
    if on:
        raise ValueError(f"model.path='{path}': its scheduler sets {', '.join(on)}, which imagerl's flow sampler does not "
                         "replicate (it would sample another schedule than the pipeline); use a checkpoint with the "
                         "family's standard scheduler, or rollout.timestep_shift for a static shift")


class FlowPolicy(Policy):
    """Base class of flow-matching policy adapters; subclasses implement the hooks in the module docstring."""

    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    unused_settings = ("rollout.temperature", "rollout.top_k", "rollout.top_p", "rollout.cuda_graph")
    # (not k1/k2/k3: the per-transition log-prob is a mean over the latent elements, see check_training_config)
    kl_estimators = ("mean", "mean_dt", "velocity", "velocity_var")
    default_kl_estimator = "mean"
    #: static timestep shift of the family (SD3: 3.0), used when rollout.timestep_shift is 0
    default_shift: float = 3.0
    #: output resolution when model.image_size is 0
    default_image_size: int = 512

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        self.image_size = cfg.model.image_size or self.default_image_size
        self._neg_cond: dict[str, torch.Tensor] | None = None
        sde_math.get_step_fn(cfg.rollout.sde)  # fail early on a bad rollout.sde

    def check_training_config(self) -> None:
        super().check_training_config()
        # GRPO scores the Gaussian transitions of the SDE steps; an ODE rollout (or no noise) has none, so every
        # step would be masked out and training would run at loss 0, changing nothing
        ro = self.cfg.rollout
        if ro.sde == "ode" or ro.noise_level <= 0:
            what = "rollout.sde=ode" if ro.sde == "ode" else f"rollout.noise_level={ro.noise_level}"
            raise ValueError(
                f"{what}: the rollout draws no noise, so no denoising step has a log-probability to train on. Use "
                "rollout.sde=flow_grpo | cps | dance with rollout.noise_level > 0 (e.g. 0.7); evaluation already "
                "samples with the ODE (rollout.eval_num_steps, rollout.eval_cfg_scale)"
            )
        if ro.sde == "cps" and ro.num_steps == 1:
            raise ValueError("rollout.sde=cps with rollout.num_steps=1: CPS's last step (to sigma 0) draws no noise, so a "
                             "one-step rollout has no log-probability to train on; use rollout.num_steps >= 2")
        # the SDE window's range is checked now, not at the first rollout (after the model loaded); the draw is thrown away
        self._sde_plan(ro.num_steps, ro.sde, torch.Generator())

    # ============================ hooks (family) ===============================================
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def transformer_forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def timestep_schedule_kwargs(self) -> dict[str, float]:
        shift = self.cfg.rollout.timestep_shift or self.default_shift
        return {"shift": float(shift)} if shift and shift != 1.0 else {}

    # ============================ setup helpers =================================================
    @staticmethod
    def freeze(module: nn.Module | None) -> None:
        """Frozen parts (VAE, text encoders) never get gradients."""
        if module is not None:
            module.requires_grad_(False).eval()

    def setup_trainable(self, transformer: nn.Module) -> None:
        """LoRA (model.lora.enabled) via diffusers' `add_adapter`, else full fine-tuning of the parameters
        whose names contain one of `model.trainable` (empty = all). LoRA weights are kept in fp32 even
        when the base weights are bf16 (optimizer updates of 1e-4-scale need the mantissa)."""
        lcfg = self.cfg.model.lora
        transformer.requires_grad_(False)
        if lcfg.enabled:
            from peft import LoraConfig

            targets = list(lcfg.target_modules) or list(self.default_lora_targets)
            transformer.add_adapter(
                LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=targets,
                           init_lora_weights="gaussian")
            )
            n = 0
            for name, p in transformer.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
                    p.data = p.data.float()
                    n += 1
            if n == 0:
                raise ValueError(f"model.lora.target_modules={targets} matched no module of {type(transformer).__name__}")
            return
        subs = list(self.cfg.model.trainable)
        n = 0
        for name, p in transformer.named_parameters():
            if not subs or any(s in name for s in subs):
                p.requires_grad_(True)
                n += 1
        if n == 0:
            raise ValueError(f"model.trainable={subs} matched no parameter of {type(transformer).__name__}")

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """LoRA: the base weights with adapters disabled (diffusers' disable_adapters/enable_adapters);
        otherwise the base class's frozen copy."""
        if self.reference_mode() == "lora_disabled":
            mod = self.trainable_module()
            if not self.uses_lora():
                raise RuntimeError("model.reference=lora_disabled needs model.lora.enabled=true")
            mod.disable_adapters()
            try:
                yield
            finally:
                mod.enable_adapters()
            return
        with super().reference():
            yield

    def shard(self, mesh) -> None:
        """FSDP2: every transformer block is its own unit, then the root (embeddings, final layers). Frozen
        and trainable (LoRA) parameters share units; the frozen VAE and text encoders stay replicated.

        The gradient divide factor is 1 because our loss weights are already normalised by the global
        batch (losses.unit_weights): summed shard gradients equal the single-process gradient."""
        from torch.distributed.fsdp import fully_shard

        mod = self.trainable_module()
        # reshard_after_forward explicit: left at its default, the root unit stays gathered after a forward without
        # backward (rollout, eval), and later forwards, state_dict() and the optimizer-state mapping then see the
        # gathered tensors instead of the shards (after an EMA eval: the averaged weights)
        for name in ("transformer_blocks", "single_transformer_blocks"):
            for blk in getattr(mod, name, None) or []:
                fully_shard(blk, mesh=mesh, reshard_after_forward=True)
        fully_shard(mod, mesh=mesh, reshard_after_forward=True)
        sum_sharded_gradients(mod)

    # ============================ sampling ======================================================
    def sigma_schedule(self, num_steps: int) -> torch.Tensor:
        return sde_math.sigma_schedule(num_steps, **self.timestep_schedule_kwargs())

    def negative_cond(self) -> dict[str, torch.Tensor]:
        """Conditions of the empty prompt (CFG's unconditional branch), leading dim 1; encoded once."""
        if self._neg_cond is None:
            with torch.no_grad():
                self._neg_cond = self.encode_prompts([""])
        return self._neg_cond

    def training_guidance(self) -> float:
        """The guidance of training rollouts (and of their log-prob recomputation): rollout.cfg_scale, or 1.0 (no
        unconditional branch) with rollout.cfg_in_training=false."""
        ro = self.cfg.rollout
        return ro.cfg_scale if ro.cfg_in_training else 1.0

    def predict_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                         guidance: float) -> torch.Tensor:
        """Velocity with classifier-free guidance v_u + g (v_c - v_u); cond and uncond rows go through ONE
        transformer forward. guidance <= 1 runs the conditional branch only."""
        n = latents.shape[0]
        if guidance <= 1.0:
            return self.transformer_forward(latents, sigma, cond)
        neg = self.negative_cond()
        both = {k: torch.cat([v, neg[k].expand(n, *neg[k].shape[1:]).to(v.dtype)], 0) for k, v in cond.items()}
        v2 = self.transformer_forward(torch.cat([latents, latents], 0), torch.cat([sigma, sigma], 0), both)
        v_c, v_u = v2[:n], v2[n:]
        return v_u + guidance * (v_c - v_u)

    def _sde_plan(self, num_steps: int, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (noise_level_T [T], sde_T [T] bool): noise only inside the SDE window (MixGRPO)."""
        ro = self.cfg.rollout
        level = torch.full((num_steps,), float(ro.noise_level))
        if kind == "ode":
            level.zero_()
        elif ro.sde_window and ro.sde_window < num_steps:
            # The whole window lies in [lo, hi) (Flow-GRPO's and MixGRPO's convention: start in [lo, hi - w]), so a
            # range copied from their configs means the same steps here. hi is capped at num_steps, so that a smoke
            # test with fewer steps keeps running; for CPS at num_steps - 1, whose last step (to sigma 0) draws no
            # noise: a window there would lose a step (of 1: a rollout with nothing to train, silently).
            lo, hi = ro.sde_window_range or [0, num_steps]
            hi = min(hi, num_steps - 1 if kind == "cps" and num_steps - 1 - lo >= ro.sde_window else num_steps)
            if not (0 <= lo and hi - lo >= ro.sde_window):
                raise ValueError(f"rollout.sde_window_range={list(ro.sde_window_range)} holds no window of "
                                 f"rollout.sde_window={ro.sde_window} steps out of rollout.num_steps={num_steps}: the "
                                 f"window must fit in [lo, hi) with 0 <= lo and lo + {ro.sde_window} <= hi <= {num_steps}")
            if kind == "cps" and lo >= num_steps - 1:
                raise ValueError(f"rollout.sde_window_range={list(ro.sde_window_range)} holds only the last of "
                                 f"rollout.num_steps={num_steps} steps, which CPS takes without noise: nothing would train; "
                                 f"start the range below {num_steps - 1}")
            start = int(torch.randint(lo, hi - ro.sde_window + 1, (1,), generator=generator, device=generator.device).item())
            inside = torch.zeros(num_steps, dtype=torch.bool)
            inside[start:start + ro.sde_window] = True
            level = torch.where(inside, level, torch.zeros_like(level))
        return level, level > 0

    def _randn(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        # drawn on the generator's device then moved: the same seed gives the same samples on any device
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

    @torch.no_grad()
    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator,
                group_id_offset: int = 0, eval_mode: bool = False) -> Rollout:
        ro = self.cfg.rollout
        B, G = len(batch), group_size
        N = B * G
        if eval_mode:
            num_steps = ro.eval_num_steps or ro.num_steps
            kind = "ode"
            guidance = ro.eval_cfg_scale or ro.cfg_scale
        else:
            num_steps, kind = ro.num_steps, ro.sde
            guidance = self.training_guidance()

        cond_B = self.encode_prompts(list(batch.prompts))  # once per prompt
        cond_N = {k: v.repeat_interleave(G, 0) for k, v in cond_B.items()}
        sigmas_T1 = self.sigma_schedule(num_steps).to(self.device)
        # (Flow-GRPO's code: the schedule's second sigma, also for one step, where it is 0 and g = a; 1 - 1e-3
        # there made g = a sqrt(1000) and the one-step sample 250x too noisy)
        sigma_cap = float(sigmas_T1[1])
        level_T, _ = self._sde_plan(num_steps, kind, generator)
        std_T = sde_math.step_std(kind, sigmas_T1[:-1].cpu(), sigmas_T1[1:].cpu(), level_T,
                                  sigma_cap=sigma_cap)
        stochastic_T = std_T > 0  # e.g. CPS's last step (sigma_next = 0) is deterministic
        level_T = torch.where(stochastic_T, level_T, torch.zeros_like(level_T))
        step_fn = sde_math.get_step_fn(kind)

        shape = self.latent_shape()
        # One random stream per sample row, keyed by its global group id: samples do not depend on the
        # micro-batch size or on how many processes share the batch (multi-process == single-process).
        group_ids_N = group_id_offset + torch.arange(N) // G
        row_gens = self.row_generators(generator, group_ids_N, G)

        def row_noise() -> torch.Tensor:
            return torch.stack([torch.randn(shape, generator=g) for g in row_gens]).to(self.device)

        if ro.shared_noise:
            x = torch.stack([torch.randn(shape, generator=row_gens[b * G]) for b in range(B)]).to(self.device)
            x = x.repeat_interleave(G, 0)
            for i, g in enumerate(row_gens):  # keep every row's stream aligned whether or not the start noise is
                if i % G:  # shared (each group's first row drew the shared noise from its own stream above)
                    torch.randn(shape, generator=g)
        else:
            x = row_noise()
        lat = torch.empty((N, num_steps + 1, *shape), dtype=torch.float32, device=self.device)
        lat[:, 0] = x
        logp_NT = torch.zeros((N, num_steps), dtype=torch.float32, device=self.device)
        mb = ro.micro_batch_size or N
        for i in range(num_steps):
            s, s_n, lvl = float(sigmas_T1[i]), float(sigmas_T1[i + 1]), float(level_T[i])
            noise = row_noise() if stochastic_T[i] else None
            fn = step_fn if stochastic_T[i] else sde_math.ode_step
            for a in range(0, N, mb):
                rows = slice(a, min(a + mb, N))
                xr = lat[rows, i]
                n = xr.shape[0]
                sig = torch.full((n,), s, device=self.device)
                v = self.predict_velocity(xr, sig, {k: c[rows] for k, c in cond_N.items()}, guidance)
                st = fn(xr, v, s, s_n, lvl, noise=None if noise is None else noise[rows], sigma_cap=sigma_cap)
                lat[rows, i + 1] = st.prev_sample
                logp_NT[rows, i] = self._unit_logp(st)
        # every row's last latent is ready only after the last step: decode per micro-batch and hand each over to the
        # scoring thread (scoring.overlap), so the rewards of the first images overlap the decoding of the rest
        chunks = []
        for a in range(0, N, mb):
            chunks.append(self.decode(lat[a:a + mb, -1]).float().clamp(0, 1))
            self.emit_chunk(a, a + chunks[-1].shape[0], chunks[-1])
        images = torch.cat(chunks, 0)

        def rep(x: Any) -> list[Any]:
            return [x[i // G] for i in range(N)]

        return Rollout(
            images=images,
            old_logp=logp_NT,
            mask=stochastic_T.to(self.device).unsqueeze(0).expand(N, -1).clone(),
            group_ids=group_ids_N.to(self.device),
            prompts=rep(batch.prompts),
            metadata=rep(batch.metadata),
            source_images=rep(batch.source_images) if batch.source_images is not None else None,
            dataset_names=rep(batch.dataset_names) if batch.dataset_names is not None else None,
            replay={
                "latents": lat,  # [N, T+1, *latent] latent before each step, and the final one
                "sigmas": sigmas_T1.unsqueeze(0).expand(N, -1).clone(),  # [N, T+1]
                "noise_level": level_T.to(self.device).unsqueeze(0).expand(N, -1).clone(),  # [N, T], 0 = ODE step
                "guidance": torch.full((N,), float(guidance), device=self.device),  # [N]
                "cond": cond_N,  # {name: [N, ...]} text conditions, one encode per prompt
                "sde": kind,  # not per-row: shared by the whole rollout
            },
        )

    # ============================ training ======================================================
    def unit_chunks(self, rollout: Rollout, generator: torch.Generator) -> list[torch.Tensor]:
        """floor(timestep_fraction * #SDE steps) SDE steps (>= 1), one chunk each; [] if none: a random subset
        (algorithm.timestep_selection=random, DanceGRPO) or the first ones (first: Flow-GRPO's code, which keeps the
        last, sharpest step out of training). (The floor is both codes' int(): Flow-GRPO's 0.99 of 10 steps is 9.)"""
        sde_steps = torch.nonzero(rollout.mask.any(0).cpu()).reshape(-1)
        if sde_steps.numel() == 0:
            return []
        k = max(1, int(self.cfg.algorithm.timestep_fraction * sde_steps.numel() + 1e-9))  # (+eps: 0.6 * 10 is 5.999..)
        if self.cfg.algorithm.timestep_selection == "first":
            picked = list(range(k))
        else:
            picked = torch.randperm(sde_steps.numel(), generator=generator, device=generator.device).cpu()[:k].sort().values.tolist()
        return [sde_steps[j:j + 1] for j in picked]

    def _unit_logp(self, st: sde_math.SDEStep) -> torch.Tensor:
        """The per-step log-probability the ratio is built from ([N]): the transition's Gaussian log-density
        (algorithm.log_prob=gaussian), or -||x_next - mean||^2 averaged over the latent (sq_dist: what Flow-GRPO's
        code uses for CPS steps; no 1 / (2 std^2) factor, so at small stds the ratio moves far less per update
        and a clip range tuned with it clips less). Rollout and training use the same one, so ratio 1 holds."""
        if self.cfg.algorithm.log_prob != "sq_dist":
            return st.log_prob
        n = st.prev_sample.shape[0]
        sq = -((st.prev_sample.float() - st.mean.float()) ** 2).reshape(n, -1).mean(1)
        return torch.where(st.std.reshape(n) > 0, sq, torch.zeros_like(sq))

    def log_prob(self, rollout: Rollout, units: torch.Tensor, need_kl_terms: bool = False) -> LogProbOutput:
        rp = rollout.replay
        lat, sig, lvl, guid = rp["latents"], rp["sigmas"], rp["noise_level"], rp["guidance"]
        step_fn = sde_math.get_step_fn(rp["sde"])
        guidance = float(guid[0]) if guid.numel() else 1.0
        cap = sig[:, 1]  # (as the rollout: the schedule's second sigma)
        logps, means, stds, vels = [], [], [], []
        for k in units.tolist():
            x, x_next = lat[:, k], lat[:, k + 1]
            v = self.predict_velocity(x, sig[:, k], rp["cond"], guidance)
            st = step_fn(x, v, sig[:, k], sig[:, k + 1], lvl[:, k], prev_sample=x_next, sigma_cap=cap)
            logps.append(self._unit_logp(st))
            if need_kl_terms:
                means.append(st.mean)
                stds.append(st.std)
                vels.append(v.float())
        out = LogProbOutput(logp=torch.stack(logps, 1))
        if need_kl_terms:
            out.mean, out.std, out.velocity = torch.stack(means, 1), torch.stack(stds, 1), torch.stack(vels, 1)
            out.dt = (sig[:, units] - sig[:, units + 1]).abs().float()
        return out

    def sft_loss(self, batch: dict[str, Any], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Flow-matching loss ||v_theta(x_sigma, sigma) - (eps - x0)||^2 on {prompts: [n], images: [n,3,H,W]}.

        Images are resized to the policy's resolution; sigma ~ U(0, 1) per sample; no CFG (conditional). With a
        list of n generators, pair i draws its sigma and noise from generator i (the trainer's per-pair streams,
        which make the noise independent of how the pairs are split over processes)."""
        prompts, images = batch.get("prompts"), batch.get("images")
        if prompts is None or images is None:
            raise ValueError("sft_loss needs a batch {'prompts': [n strings], 'images': tensor [n,3,H,W] in [0,1]}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] != len(prompts):
            raise ValueError(f"sft_loss: 'images' must be a tensor [n,3,H,W] with n={len(prompts)}, got "
                             f"{getattr(images, 'shape', type(images))}")
        images = images.to(self.device, torch.float32)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        with torch.no_grad():
            x0 = self.encode_images(images).float()
            cond = self.encode_prompts(list(prompts))
        n = x0.shape[0]
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"sft_loss: {len(generator)} generators for {n} pairs; give one per pair or one in all")
            sigma = torch.cat([torch.rand((1,), generator=g, device=g.device) for g in generator]).to(self.device)
            eps = torch.cat([self._randn((1, *x0.shape[1:]), g) for g in generator])
        else:
            sigma = torch.rand((n,), generator=generator, device=generator.device).to(self.device)
            eps = self._randn(tuple(x0.shape), generator)
        s = sigma.reshape(n, *([1] * (x0.dim() - 1)))
        x_t = (1 - s) * x0 + s * eps
        v = self.transformer_forward(x_t, sigma, cond).float()
        return F.mse_loss(v, eps - x0)


def tiny_preset(presets: dict[str, dict[str, Any]], size: str, overrides: dict[str, Any], family: str) -> dict[str, Any]:
    """Pick preset `size` (model.tiny_size) and apply model.tiny_overrides, naming bad keys."""
    if size not in presets:
        raise ValueError(f"model.tiny_size='{size}' is not a {family} tiny preset; choose one of {', '.join(presets)}")
    out = dict(presets[size])
    for k, v in (overrides or {}).items():
        if k not in out:
            hint = did_you_mean(k, list(out))
            raise ValueError(f"model.tiny_overrides.{k} is not a {family} tiny knob.{hint} Valid: {', '.join(out)}")
        out[k] = v
    return out


def lcm_multiple(x: int, m: int) -> int:
    """Smallest multiple of m that is >= x (image sizes must divide by VAE factor * patch size)."""
    return int(math.ceil(x / m) * m)
