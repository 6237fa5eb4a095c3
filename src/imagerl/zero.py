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
- Checkpoints stay one atomic directory: every rank's ZeRO partition state is gathered to rank 0 and stored in
  optimizer.pt; on resume every rank hands the list to DeepSpeed, which re-partitions it (so the number of
  processes may change between runs, as long as it stays > 1 and on DeepSpeed).

ZeRO-3 (sharded parameters) is refused at config time: the rollout reads whole weights, and parameter
sharding is what dist.strategy=fsdp2 provides.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.distributed as tdist

from .config import Config
from .dist import DistInfo

ZERO_KEY = "zero_partitions"  # optimizer.pt: the list of every rank's ZeRO optimizer state


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
    _merge(conf, copy.deepcopy(dict(d.deepspeed_extra or {})))
    # owned by the loop (see the module docstring); a user value here would silently change the update
    conf["managed_gradient_accumulation"] = False
    conf["gradient_accumulation_steps"] = 1
    conf["zero_optimization"]["stage"] = int(d.zero_stage)
    return conf


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


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
        self.info = info
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
        gn = self.engine.get_global_grad_norm()
        return float("nan") if gn is None else float(gn)

    # ---- checkpoints (collective: every rank calls them) -------------------------------------------
    def gathered_state(self) -> dict[str, Any] | None:
        """Every rank's ZeRO optimizer state, gathered to rank 0 (None on the other ranks)."""
        mine = _to_cpu(self.optimizer.state_dict())
        parts: list[Any] | None = [None] * self.info.world if self.info.is_main else None
        tdist.gather_object(mine, parts, dst=0)
        return {ZERO_KEY: parts} if self.info.is_main else None

    def load_state(self, state: dict[str, Any]) -> None:
        if ZERO_KEY not in state:
            raise ValueError(
                "the checkpoint's optimizer state was not written by dist.strategy=deepspeed; resume it with the "
                "strategy that wrote it (ddp/fsdp2 store the full AdamW state)"
            )
        # the fp32 master partitions come from the saved copies (exact); DeepSpeed re-partitions the list
        # for the current number of ranks
        self.optimizer.load_state_dict(state[ZERO_KEY], load_optimizer_states=True, load_from_fp32_weights=True)
