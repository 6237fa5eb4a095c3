"""The Policy protocol: everything model-specific the one training loop needs.

A policy adapter knows how to draw G samples per prompt (`rollout`), what to store to replay them, and
how to recompute the log-probability of the stored trained units under the current weights with exactly
the sampling distribution (`log_prob`). The loop never branches on the model family.

Trained units: image tokens for autoregressive policies (T = number of image tokens), denoising steps
for flow policies (T = number of steps; ODE steps are masked out). `unit_chunks` says how the units of a
micro-batch are grouped into forwards: AR policies score all tokens in one teacher-forced forward, flow
policies need one forward per denoising step and may train a random subset of steps.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..config import Config, get_field
from ..types import LogProbOutput, PromptBatch, Rollout


def hub_kwargs(revision: str = "", trust_remote_code: bool = False) -> dict[str, Any]:
    """The keyword arguments of a transformers `from_pretrained` for a checkpoint's `revision` ('' = the default
    branch) and `trust_remote_code`, as every loader of a model, tokenizer or processor passes them."""
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    return kw


def not_downloaded_error(path: str, err: BaseException) -> str:
    """For a from_pretrained failure of model.path: when `path` was a hub id that is neither cached nor reachable
    (no internet, or HF_HUB_OFFLINE=1), the error saying so with the fix (the cause's first line after it); "" for
    any other cause, which each family reports in its own words."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # (an older huggingface_hub: the family's own error still says why)
        return ""
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
            first = (str(err).splitlines() or [""])[0]
            return (f"model.path='{path}': '{path}' is not in the Hugging Face cache and the hub could not be reached: "
                    f"download it on a machine with internet first (`hf download {path}`, then HF_HUB_OFFLINE=1 here "
                    f"skips the network retries), or give a local directory. ({type(err).__name__}: {first})")
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return ""


class Policy(nn.Module):
    """Base class of every policy adapter. Subclasses register themselves in `registry.POLICIES`."""

    #: default LoRA target modules of the family (used when model.lora.target_modules is empty)
    default_lora_targets: tuple[str, ...] = ()
    #: config keys this family's sampler and log-prob never read (e.g. top_k for a flow model, the SDE settings
    #: for an AR one). One YAML may carry both kinds; a changed one gets a note at start instead of doing nothing.
    unused_settings: tuple[str, ...] = ()
    #: algorithm.kl_estimator values the family's log-prob outputs support
    kl_estimators: tuple[str, ...] = ("k1", "k2", "k3")
    #: what algorithm.kl_estimator=auto (the default) means for the family
    default_kl_estimator: str = "k3"

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.device = device
        self._ref_copy: nn.Module | None = None
        self._ref_shards: dict[str, torch.Tensor] | None = None  # FSDP2: this rank's shards of the reference

    # ---- sampling -------------------------------------------------------------------------------
    def rollout(
        self,
        batch: PromptBatch,
        group_size: int,
        generator: torch.Generator,
        group_id_offset: int = 0,
        eval_mode: bool = False,
    ) -> Rollout:
        """Draw `group_size` samples for each prompt of `batch` ([B] -> N = B*G rows, prompt-major).

        group ids are `group_id_offset + b` so that they are unique across ranks and steps.
        `eval_mode` samples deterministically (flow: ODE) with the evaluation settings.
        Runs under torch.no_grad; the loop calls it with the module in eval() mode.
        """
        raise NotImplementedError

    @staticmethod
    def row_generators(generator: torch.Generator, group_ids: torch.Tensor, group_size: int,
                       device: torch.device | str = "cpu") -> list[torch.Generator]:
        """One generator per sample row, keyed by (the step's seed, global group id, index in group).

        Drawing each row's randomness from its own stream makes samples independent of how rows are
        batched: the same prompt gets the same images whatever rollout.micro_batch_size is and however
        many processes share the batch (which is what makes K processes reproduce one exactly).
        `group_ids` is [N] prompt-major (G consecutive rows per group)."""
        base = int(generator.initial_seed())
        gens = []
        for i, g in enumerate(group_ids.tolist()):
            s = (base * 6_364_136_223_846_793_005 + int(g) * 1_442_695_040_888_963_407 + (i % group_size) * 2_862_933_555_777_941_757) % (2**63 - 1)
            gens.append(torch.Generator(device=device).manual_seed(s))
        return gens

    def emit_chunk(self, lo: int, hi: int, images: torch.Tensor) -> None:
        """Adapters call this inside `rollout` as soon as rows [lo, hi) are decoded to images.

        The trainer sets `chunk_callback` so that rewards (remote judges especially) score a micro-batch
        while the next one is still being generated. Calling it is optional: without it scoring simply
        starts after the rollout returns. `images` must already be final ([n,3,H,W] in [0,1])."""
        cb = getattr(self, "chunk_callback", None)
        if cb is not None:
            cb(lo, hi, images)

    # ---- training -------------------------------------------------------------------------------
    def unit_chunks(self, rollout: Rollout, generator: torch.Generator) -> list[torch.Tensor]:
        """Index tensors into the T units; each chunk is scored by one `log_prob` call.

        Default: one chunk holding every unit (AR teacher forcing)."""
        return [torch.arange(rollout.num_units)]

    def log_prob(self, rollout: Rollout, units: torch.Tensor, need_kl_terms: bool = False) -> LogProbOutput:
        """Recompute log-probs of `units` ([K] indices into T) of every row of `rollout` -> logp [N, K].

        Must use exactly the sampling distribution (temperature, CFG, masks, noise level), so that the
        first inner step gives ratio exp(logp - old_logp) == 1 for any micro-batch composition.
        """
        raise NotImplementedError

    def sft_loss(self, batch: dict[str, Any], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Auxiliary supervised loss, the mean over a prompt+image batch (flow: flow-matching loss). The trainer
        passes one generator per pair, so that a pair's noise does not depend on which process trains it."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary SFT loss")

    # ---- parameters -----------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        """The module whose parameters are trained (wrapped by DDP/FSDP)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trainable_module().parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.trainable_module().named_parameters() if p.requires_grad]

    def trainable_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The trained weights as whole tensors on the CPU. Sharded (FSDP2) parameters are gathered one at a time
        (a collective: every rank calls this), so a checkpoint never depends on the world size and no device holds
        more than one whole parameter at once; ranks that do not write (`keep=False`) drop each one right away."""
        out = {}
        for n, p in self.named_trainable_parameters():
            t = _full(p).detach()
            if keep:
                out[n] = t.to("cpu", copy=True)
            del t
        return out

    def shard(self, mesh) -> None:
        """Shard the trained module with FSDP2 (dist.strategy=fsdp2). Families that support it override."""
        raise NotImplementedError(
            f"model.family={self.cfg.model.family} does not support dist.strategy=fsdp2 yet; use dist.strategy=ddp"
        )

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_trainable_parameters())
        missing = set(params) - set(sd)
        unexpected = set(sd) - set(params)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the policy: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} "
                "(was it written with another model.family, LoRA setting or tiny preset?)"
            )
        # (a DTensor's shape is the full tensor's, like the checkpoint's)
        shapes = [f"{n} {tuple(sd[n].shape)} vs {tuple(p.shape)}" for n, p in params.items() if sd[n].shape != p.shape]
        if shapes:
            raise ValueError(f"checkpoint tensors have other shapes than the policy's (checkpoint vs policy): "
                             f"{shapes[:3]}{' ...' if len(shapes) > 3 else ''} (another model size, LoRA rank or image size?)")
        with torch.no_grad():
            for n, p in params.items():
                src = sd[n].to(p.device, p.dtype)
                if _is_dtensor(p):  # FSDP2: keep only this rank's shard of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    src = distribute_tensor(src, p.device_mesh, p.placements)
                p.copy_(src)

    @classmethod
    def resolve_config(cls, cfg: Config) -> None:
        """Fill the config values whose default depends on the family (`algorithm.kl_estimator=auto`). The
        trainer calls it once, before anything reads them, so the run's config.yaml records what ran.
        Subclasses extend it."""
        if cfg.algorithm.kl_estimator == "auto":
            cfg.algorithm.kl_estimator = cls.default_kl_estimator

    def check_training_config(self) -> None:
        """Raise ValueError, naming the field and the fix, when the config samples nothing this policy can train
        on (the trainer calls it before training; evaluation and sampling do not). Subclasses extend it."""
        a = self.cfg.algorithm
        # settings that would only fail after the first rollout (minutes on a real model): fail before it
        if a.sft_weight > 0 and type(self).sft_loss is Policy.sft_loss:
            raise ValueError(f"algorithm.sft_weight={a.sft_weight}: model.family={self.cfg.model.family} has no auxiliary "
                             "SFT loss; set algorithm.sft_weight=0")
        if a.kl_coef > 0 and self.reference_mode() == "none":
            raise ValueError(f"algorithm.kl_coef={a.kl_coef} needs a reference policy but model.reference=none; set "
                             "algorithm.kl_coef=0 or model.reference=auto")
        if a.kl_coef > 0 and self.reference_mode() == "lora_disabled" and not self.uses_lora():
            raise ValueError("model.reference=lora_disabled needs model.lora.enabled=true (the reference is the model "
                             "with its adapters off); use model.reference=auto (a frozen copy for full fine-tuning)")
        est = self.default_kl_estimator if a.kl_estimator == "auto" else a.kl_estimator  # (checks, never writes)
        if a.kl_coef > 0 and est not in self.kl_estimators:
            if est in ("k1", "k2", "k3"):
                why = ("a flow transition's log-density is averaged over the latent elements, and k1/k2/k3 of that "
                       "average estimate no KL: k3 comes out near KL^2/2 with 1/D of the KL's gradient")
            else:
                why = f"it has no {'velocity predictions' if est == 'velocity' else 'Gaussian transitions'}"
            raise ValueError(
                f"algorithm.kl_estimator={est} does not apply to model.family={self.cfg.model.family} "
                f"({why}); use one of {', '.join(self.kl_estimators)}"
            )

    def unused_changes(self) -> list[str]:
        """The `unused_settings` this config sets to something other than the schema default, as 'key=value'.
        A switch whose default is null (auto) counts as unset at false too: a run's config.yaml written when
        rollout.cuda_graph defaulted to false holds that value without anyone having set it."""
        default = Config()
        changed = []
        for k in self.unused_settings:
            v, d = get_field(self.cfg, k), get_field(default, k)
            if v != d and not (d is None and v is False):
                changed.append(f"{k}={v}")
        return changed

    # ---- reference policy -----------------------------------------------------------------------
    def uses_lora(self) -> bool:
        return bool(self.cfg.model.lora.enabled)

    def reference_mode(self) -> str:
        mode = self.cfg.model.reference
        if mode == "auto":
            return "lora_disabled" if self.uses_lora() else "frozen_copy"
        return mode

    def setup_reference(self) -> None:
        """Prepare the reference policy; called once after weights are loaded (before training)."""
        if self.reference_mode() == "frozen_copy" and self.cfg.algorithm.kl_coef > 0:
            import copy

            mod = self.trainable_module()
            if any(_is_dtensor(p) for p in mod.parameters()):
                # FSDP2: keep a copy of this rank's shards of the trained parameters only (a deep copy of
                # sharded modules would not be a usable model, and the frozen ones never change)
                with torch.no_grad():
                    self._ref_shards = {n: p.detach().clone() for n, p in self.named_trainable_parameters()}
                return
            self._ref_copy = copy.deepcopy(mod).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this context the policy computes as the frozen reference policy."""
        mode = self.reference_mode()
        if mode == "none":
            raise RuntimeError("model.reference=none but a KL term needs a reference policy; set algorithm.kl_coef=0")
        if mode == "lora_disabled":
            mod = self.trainable_module()
            if not hasattr(mod, "disable_adapter"):
                raise RuntimeError("model.reference=lora_disabled needs model.lora.enabled=true")
            with mod.disable_adapter():
                yield
            return
        if self._ref_shards is not None:
            with swap_sharded_values(self.trainable_module(), self._ref_shards):
                yield
            return
        if self._ref_copy is None:
            raise RuntimeError("frozen reference copy missing: setup_reference() was not called")
        with swap_module_state(self.trainable_module(), self._ref_copy):
            yield

    # ---- export ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        """Write weights loadable by the family's own library (LoRA merged or as adapter)."""
        raise NotImplementedError


@contextlib.contextmanager
def swap_module_state(live: nn.Module, frozen: nn.Module) -> Iterator[None]:
    """Temporarily give `live` the parameters of `frozen` (same architecture), without copying twice.

    Swapping `.data` pointers keeps hooks, DDP wrappers and parameter identity intact."""
    live_params = dict(live.named_parameters())
    frozen_params = dict(frozen.named_parameters())
    saved = {n: p.data for n, p in live_params.items()}
    try:
        for n, p in live_params.items():
            p.data = frozen_params[n].data
        yield
    finally:
        for n, p in live_params.items():
            p.data = saved[n]


def fsdp_units(root: nn.Module) -> list[nn.Module]:
    """The FSDP2 units (modules `fully_shard` was applied to) in `root`'s tree, root included; [] if none."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def sum_sharded_gradients(root: nn.Module) -> None:
    """Make every FSDP2 unit under `root` reduce-scatter plain sums of gradients (divide factor 1): our loss
    weights are already normalised by the global batch (losses.unit_weights), so summed shard gradients equal
    the single-process gradient. Forced SUM, because gloo has no PREMUL_SUM."""
    for m in fsdp_units(root):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def swap_sharded_values(root: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """FSDP2 version of `swap_module_state`: write `values` (by parameter name under `root`) into the sharded
    parameters in place, and back.

    FSDP2 all-gathers from storage it holds views of, so the shards are overwritten (`copy_`), never
    re-pointed (`.data =` would leave FSDP gathering the live values: a silently wrong KL). Every unit is
    resharded first and last, so no unit keeps gathered parameters from the other side of the swap (roots
    do not reshard after forward by default; backward gathers them again). The parameters are looked up
    after resharding: before it, a gathered unit's names point at its unsharded tensors, whose storage the
    reshard frees. Costs two copies of this rank's shards per use."""
    units = fsdp_units(root)
    with torch.no_grad():
        for u in units:
            u.reshard()
        params = {n: p for n, p in root.named_parameters() if n in values}
        saved = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.detach().copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for u in units:
                u.reshard()
            params = {n: p for n, p in root.named_parameters() if n in values}
            for n, p in params.items():
                p.detach().copy_(saved[n])


def _is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if _is_dtensor(p) else p


