"""DeepSpeed ZeRO stage 1/2 for the one training loop (`dist.strategy=deepspeed`, launched by torchrun).

ZeRO-1 partitions the AdamW state over the ranks, ZeRO-2 also the reduced gradients; the parameters stay
whole on every rank, so rollouts, the reference policy and the saved weights work exactly as under DDP. The
engine is built with `deepspeed.initialize` on our own process group (ECOSYSTEM.md: raw DeepSpeed under
torchrun works on CPU and GPU; through accelerate it does not), with the loop's own AdamW and LR schedule.

How the loop's invariants carry over:
- The loop runs a variable number of backward passes per update (micro-batches x unit chunks) and owns the
  boundary: DeepSpeed runs unmanaged (`managed_gradient_accumulation=false`), so `backward` only accumulates
  and `step` reduces, clips (DeepSpeed's global norm over the partitions) and applies AdamW.
- The loop's loss weights are already global (losses.unit_weights), so the update needs the SUM of the
  ranks' gradients; DeepSpeed averages, hence the loss is multiplied by the world size before backward.
- A non-finite gradient norm makes DeepSpeed skip the update (fp32 overflow check) and report an infinite
  norm; the trainer turns that into a TrainingError, as on the other strategies.
- Checkpoints stay one atomic directory: every rank writes its own ZeRO partition (AdamW moments and fp32
  master weights) into a staging directory that rank 0 moves into the checkpoint before marking it complete
  (`checkpoint.save_checkpoint(move_in=...)`); nothing is gathered, so full fine-tuning of a large model does
  not need the whole optimizer state in one process. On resume each rank reads its own file. The partitions
  are tied to the process count (DeepSpeed's default, non-elastic layout): resuming with another count is a
  clear error.

ZeRO-3 (sharded parameters) is refused at config time: the rollout reads whole weights, and parameter
sharding is what dist.strategy=fsdp2 provides.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from . import dist
from .checkpoint import reading
from .config import Config, deep_merge
from .dist import DistInfo

ZERO_KEY = "zero_partitions"  # optimizer.pt: {ZERO_KEY: number of processes whose partitions the checkpoint holds}
PARTITIONS_DIR = "zero"  # checkpoint subdirectory: rank_00000.pt, rank_00001.pt, ...


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config this loop needs, with `dist.deepspeed_extra` merged over it (e.g. reduce bucket
    sizes, or `zero_optimization.offload_optimizer` on GPU machines). The keys the loop relies on cannot be
    overridden."""
    d = cfg.dist
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # unused: the loop feeds its own micro-batches
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": int(d.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    conf = deep_merge(conf, dict(d.deepspeed_extra or {}))  # (new dicts along merged paths: extra is untouched)
    # owned by the loop (see the module docstring); a user value here would silently change the update, and
    # without the norm the loop could neither log it nor stop on a non-finite gradient
    conf["managed_gradient_accumulation"] = False
    conf["gradient_accumulation_steps"] = 1
    conf["zero_optimization"]["stage"] = int(d.zero_stage)
    conf["zero_optimization"]["compute_grad_norm"] = True
    conf["zero_optimization"]["elastic_checkpoint"] = False  # (the partitions are saved and loaded per rank, see above)
    return conf


class ZeroEngine:
    """The DeepSpeed engine around the trained module and the loop's optimizer."""

    def __init__(self, cfg: Config, module: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo):
        try:
            import deepspeed
        except ImportError:
            raise ImportError(
                "dist.strategy=deepspeed needs DeepSpeed: pip install 'imagerl[deepspeed]' (deepspeed>=0.19.8), "
                "or use dist.strategy=ddp / fsdp2"
            ) from None
        from deepspeed.runtime.engine import DeepSpeedEngine

        if not hasattr(DeepSpeedEngine, "managed_gradient_accumulation"):
            raise ImportError(
                f"dist.strategy=deepspeed needs deepspeed>=0.19.8 (caller-owned gradient accumulation boundaries); "
                f"found {deepspeed.__version__}: pip install -U 'imagerl[deepspeed]'"
            )
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown the progress bar
        # DeepSpeed's ZeRO calls a collective torch has deprecated; the FutureWarning is about DeepSpeed's code, once
        # per rank, and nothing a user of imagerl can act on
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        self.info = info
        if next(module.parameters()).device.type == "cpu":
            # DeepSpeed's torch comm backend JIT-compiles a shared-memory all-reduce op for CPU tensors (about
            # 50 s, again whenever the install path changes) that only its inference all-reduce calls; ZeRO
            # training never does. Its table of compatible ops is the switch that build step reads.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # the process group is ours (dist.init); DeepSpeed wraps it instead of creating another one
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(cfg), dist_init_required=False,
        )

    def backward(self, loss: torch.Tensor) -> None:
        # x world size: DeepSpeed averages the ranks' gradients, the loop's global loss weights need their sum
        self.engine.backward(loss * self.info.world, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce the accumulated gradients, clip, apply AdamW -> the global gradient norm (before clipping;
        inf when it was not finite, in which case DeepSpeed skipped the update)."""
        self.engine.step()
        return float(self.engine.get_global_grad_norm())  # (never None: compute_grad_norm is ours)

    # ---- checkpoints ------------------------------------------------------------------------------
    def stage_partitions(self, ckpt_root: Path, step: int) -> dict[str, Path]:
        """Collective: every rank writes its ZeRO optimizer state (its AdamW moments and fp32 master partition)
        to a staging directory, fsync'ed -> `move_in` for `checkpoint.save_checkpoint`, which rank 0 calls next.
        Nothing is gathered, so no rank ever holds the whole state."""
        with dist.staging_dir(ckpt_root, step, PARTITIONS_DIR, self.info) as staging:
            with open(staging / f"rank_{self.info.rank:05d}.pt", "wb") as f:
                torch.save(self.optimizer.state_dict(), f)  # (torch.save copies device tensors to host itself)
                f.flush()
                os.fsync(f.fileno())
        return {PARTITIONS_DIR: staging}

    def load_partition(self, ckpt: Path, state: dict[str, Any]) -> None:
        saved = int(state[ZERO_KEY])
        if saved != self.info.world:
            raise ValueError(
                f"{ckpt} holds ZeRO optimizer partitions of {saved} processes and this run has {self.info.world}: "
                f"DeepSpeed's partitions are tied to the process count; resume with --nproc_per_node {saved}"
            )
        part = ckpt / PARTITIONS_DIR / f"rank_{self.info.rank:05d}.pt"
        with reading(part, ckpt):
            sd = torch.load(part, map_location="cpu", weights_only=False)
        # DeepSpeed reads entry [rank] of the list; the fp32 master partition comes from the saved copy (exact)
        sds: list[Any] = [None] * self.info.world
        sds[self.info.rank] = sd
        self.optimizer.load_state_dict(sds, load_optimizer_states=True, load_from_fp32_weights=True)
