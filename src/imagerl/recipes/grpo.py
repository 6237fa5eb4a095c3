"""The one GRPO training loop: rollout -> rewards -> advantages -> clipped policy update -> log / eval / save.

It never branches on the model family (policies are adapters, see policies/base.py) nor on the algorithm
variant (advantage estimators and KL estimators come from registries). Distributed code is confined to
`imagerl.dist` (and `imagerl.zero` for DeepSpeed): every rank draws the same global prompt batch, rolls out
its slice, rewards and group ids are gathered so advantages are computed on the global batch, per-unit loss
weights are normalised with global counts, and gradients are summed over ranks: K processes compute the
same update as one.

Determinism and exact resume: every random draw of step s comes from generators seeded by (run.seed, s) (the
rollout's per-row streams and the trained-unit subsets also ignore the rank), so a run resumed from the
checkpoint after step s reproduces steps s+1.. of an uninterrupted run bit for bit on CPU in fp32 (tested).
Checkpoints also carry the global RNG states for user code that uses them.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..algorithms.advantages import AdvantageOutput, compute_advantages
from ..algorithms.kl import kl_per_unit
from ..algorithms.losses import clipped_surrogate, unit_weights
from ..checkpoint import (
    LOCK_FILE,
    RunDirInUse,
    run_dir_lock_holders,
    latest_checkpoint,
    load_checkpoint,
    lock_run_dir,
    reading,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unlock_run_dir,
)
from ..config import Config, to_dict, to_yaml
from ..data.pairs import check_sft_datasets, sft_batch
from ..data.prompts import PromptSampler, load_datasets, make_batch, slice_for_rank
from ..devices import configure_attention, resolve_device
from ..ema import WeightEMA
from ..policies import POLICIES
from ..policies.base import Policy
from ..registry import ADVANTAGES, RegistryError, did_you_mean
from ..rewards import REWARDS  # noqa: F401  (registers reward names)
from ..rewards.base import RewardSet, ScoreTable, unique_names
from ..rewards.runner import ChunkScorer, ScoringRunner
from ..types import PromptBatch, RewardInput, Rollout
from ..zero import ZERO_KEY


class TrainingError(RuntimeError):
    pass


def seeded_generator(seed: int, step: int, rank: int, purpose: int) -> torch.Generator:
    # A 63-bit mix of the four integers; distinct purposes never share a stream.
    s = (seed * 1_000_003 + step * 9_176_867 + rank * 104_729 + purpose * 7_919) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


ROLLOUT, TRAIN, EVAL, SFT, SAMPLE = 1, 2, 3, 4, 5
EMA_DIR = "ema"  # checkpoint subdirectory: the weights' EMA (DCP format)


def optimizer_steps_per_step(cfg: Config) -> int:
    return _steps_per_step(cfg.algorithm.inner_epochs, cfg.algorithm.mini_batches)


def _steps_per_step(inner_epochs: Any, mini_batches: Any) -> int:
    return max(1, int(inner_epochs or 1)) * max(1, int(mini_batches or 1))


def _draw_changes(saved: dict | None, cfg: Config) -> str:
    """'run.seed=0 (now 7), data.datasets[0].path=... (now ...)' for what decides which prompts and samples the
    resumed steps draw (not e.g. a dataset's reward_weights, which change no draw); '' when the same or unknown."""
    if not isinstance(saved, dict) or not isinstance(saved.get("run"), dict) or not isinstance(saved.get("data"), dict):
        return ""
    now = to_dict(cfg)
    out = []
    if saved["run"].get("seed") != now["run"]["seed"]:
        out.append(f"run.seed={saved['run'].get('seed')!r} (now {now['run']['seed']!r})")
    old_ds, new_ds = saved["data"].get("datasets") or [], now["data"]["datasets"]
    for i, (a, b) in enumerate(zip(old_ds, new_ds)):
        for k in ("path", "weight", "limit", "prompt_field"):
            if isinstance(a, dict) and k in a and a[k] != b.get(k):
                out.append(f"data.datasets[{i}].{k}={a[k]!r} (now {b.get(k)!r})")
    return ", ".join(out)


def _saved_steps_per_step(saved: dict | None) -> int:
    """optimizer_steps_per_step of a checkpoint's saved config (0 when it has none)."""
    a = saved.get("algorithm") if isinstance(saved, dict) else None
    return _steps_per_step(a.get("inner_epochs"), a.get("mini_batches")) if isinstance(a, dict) else 0


def lr_lambda(cfg: Config):
    """The LR multiplier as a function of the optimizer steps taken so far (what LambdaLR counts). The schedule
    itself is over *training* steps, the unit of train.steps and optim.warmup_steps: every inner epoch of a step
    uses that step's rate, so a cosine or linear decay ends at train.steps whatever algorithm.inner_epochs is."""
    warm, total, kind, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.schedule, cfg.optim.min_lr_ratio
    per_step = optimizer_steps_per_step(cfg)

    def f(i: int) -> float:
        i //= per_step  # training steps done before this optimizer step (0 = the first step)
        if warm and i < warm:
            return (i + 1) / warm
        if kind == "constant":
            return 1.0
        prog = min(1.0, (i - warm) / max(1, total - warm))
        if kind == "linear":
            return floor + (1 - floor) * (1 - prog)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


@dataclass
class StepResult:
    rollout: Rollout
    table: ScoreTable
    adv: AdvantageOutput
    metrics: dict[str, float]


@dataclass
class _Tally:
    """One update's sums over its passes (then over ranks, so K processes log what one process would): the
    weighted policy / KL / SFT losses, clipped-unit and ratio sums over the trained units, ratio extremes."""
    pg: float = 0.0
    kl: float = 0.0  # kl_coef x the weighted KL (the loss term)
    kl_raw: float = 0.0  # the weighted KL estimate
    sft: float = 0.0
    clip: float = 0.0
    rsum: float = 0.0
    cnt: float = 0.0
    rmax: float = -math.inf
    rmin: float = math.inf
    first_dev: float = 0.0  # max |ratio - 1| in the step's first update (where ratios are exactly 1 in exact math)
    grad_norm: float = 0.0

    _SUMS = ("pg", "kl", "kl_raw", "sft", "clip", "rsum", "cnt")

    def add_ratios(self, ratio: torch.Tensor, clipped: torch.Tensor, m: torch.Tensor, first_update: bool) -> None:
        r = ratio[m]
        self.clip += float(clipped[m].float().sum())
        self.rsum += float(r.sum())
        self.cnt += float(m.sum())
        if r.numel():
            self.rmax, self.rmin = max(self.rmax, float(r.max())), min(self.rmin, float(r.min()))
            if first_update:
                self.first_dev = max(self.first_dev, float((r - 1).abs().max()))

    def reduced(self, d: Any) -> "_Tally":
        sums = dist.all_reduce_sum(torch.tensor([getattr(self, k) for k in self._SUMS], dtype=torch.float64), d).tolist()
        ext = dist.all_reduce_max(torch.tensor([self.rmax, -self.rmin, self.first_dev], dtype=torch.float64), d).tolist()
        return _Tally(**dict(zip(self._SUMS, sums)), rmax=ext[0], rmin=-ext[1], first_dev=ext[2], grad_norm=self.grad_norm)

    @staticmethod
    def summary(ts: list["_Tally"], grpo_scale: float, sft_weight: float, kl: bool) -> dict[str, float]:
        """Metrics of a step: means over its updates; ratio extremes and the first-update deviation over all."""
        def mean(f) -> float:
            return float(np.mean([f(t) for t in ts]))
        out = {
            "loss": mean(lambda t: grpo_scale * (t.pg + t.kl) + sft_weight * t.sft),
            "loss/policy": mean(lambda t: t.pg), "loss/sft": mean(lambda t: t.sft),
            "clip_frac": mean(lambda t: t.clip / max(t.cnt, 1.0)), "ratio/mean": mean(lambda t: t.rsum / max(t.cnt, 1.0)),
            "grad_norm": mean(lambda t: t.grad_norm),
            "ratio/max": max((t.rmax for t in ts if t.rmax > -math.inf), default=1.0),
            "ratio/min": min((t.rmin for t in ts if t.rmin < math.inf), default=1.0),
            "ratio/first_epoch_max_dev": max(t.first_dev for t in ts),
        }
        if kl:  # (without a reference forward there is no KL estimate to log: a 0 would read as "no drift")
            out["kl"], out["loss/kl"] = mean(lambda t: t.kl_raw), mean(lambda t: t.kl)
        return out


def _model_config_changes(saved: dict | None, cfg: Config) -> str:
    """'model.x=a (now b), ...' for the model.* settings that differ from the checkpoint's config ('' when none
    differ or the checkpoint has no config)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        return ""
    now = to_dict(cfg)["model"]

    def flat(d: dict, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved["model"], "model."), flat(now, "model.")
    unset = object()
    show = lambda v: "unset" if v is unset else repr(v)  # noqa: E731
    pairs = [(k, a.get(k, unset), b.get(k, unset)) for k in sorted(set(a) | set(b))]
    diff = [f"{k}={show(x)} (now {show(y)})" for k, x, y in pairs if x != y]
    return ", ".join(diff)


class GRPOTrainer:
    def __init__(self, cfg: Config, training: bool = True):
        """`training=False` (imagerl eval / export): load the policy and the latest checkpoint only; write no
        run files (the run's metrics.jsonl and config.yaml are left untouched)."""
        self.cfg = cfg
        self._run_lock = ""  # (set when this trainer writes into run.output_dir)
        self._made_dir: Path | None = None  # (run.output_dir, when this start created it)
        try:
            self._setup(cfg, training)
        except BaseException:
            self._abandon_start()
            raise

    def _abandon_start(self) -> None:
        """A refused or failed start: `close` what the setup got to (the scoring thread, reward sessions, the run
        directory's lock, the process group), and remove the run directory where this start created it and left
        nothing in it but the lock (a typo in a reward name must not leave an empty run folder behind)."""
        # (the lock file goes while this process still holds the lock: a second `imagerl train` that takes the lock
        # right after the release must not lose its lock file and folder; rmdir fails harmlessly if it wrote there)
        d, emptied = self._made_dir, False
        if d is not None and self._run_lock and run_dir_lock_holders(self._run_lock) == 1:
            with contextlib.suppress(OSError):
                if [p.name for p in d.iterdir()] == [LOCK_FILE]:
                    (d / LOCK_FILE).unlink()
                    emptied = True
        with contextlib.suppress(Exception):  # (the start's own error is the one to report)
            if getattr(self, "logger", None) is not None:  # (a failure after the logger opened: its W&B / SwanLab
                self.logger.finish(curve=False)            # run and TensorBoard file end instead of dangling)
        with contextlib.suppress(Exception):
            self.close()
        if emptied:
            with contextlib.suppress(OSError):
                d.rmdir()

    def _setup(self, cfg: Config, training: bool) -> None:
        self.device = resolve_device(cfg.run.device)
        configure_attention(self.device, cfg.run.cudnn_attention)
        # Names the config resolves through registries are looked up now, not when first used: an unknown
        # algorithm.advantage would otherwise surface after the first rollout (minutes into a GPU run).
        ADVANTAGES.get(cfg.algorithm.advantage, field="algorithm.advantage")
        policy_cls = POLICIES.get(cfg.model.family, field="model.family")
        if not (isinstance(policy_cls, type) and issubclass(policy_cls, Policy)):
            raise RegistryError(f"model.family={cfg.model.family}: {getattr(policy_cls, '__name__', policy_cls)!r} is not a "
                                "policy: a model.family of your own must subclass imagerl.policies.base.Policy (or a "
                                "family's class, e.g. imagerl.policies.ar.janus:JanusPolicy)")
        policy_cls.resolve_config(cfg)
        self.dist = dist.init(cfg.dist.backend, self.device)
        if self.dist.enabled and self.device.type == "cuda" and self.device.index not in (None, self.dist.local_rank):
            raise TrainingError(f"run.device={cfg.run.device} with {self.dist.world} processes would put them all on one GPU: "
                                "each process uses the GPU of its LOCAL_RANK; set run.device=cuda (or auto) and choose "
                                "the GPUs with CUDA_VISIBLE_DEVICES")
        if training and cfg.data.prompts_per_step % self.dist.world:  # (every rank raises: none waits on the others)
            raise TrainingError(f"data.prompts_per_step={cfg.data.prompts_per_step} must be divisible by the number of "
                                f"processes ({self.dist.world}): each takes an equal share of the prompts")
        per_rank = cfg.data.prompts_per_step // self.dist.world
        if training and per_rank % cfg.algorithm.mini_batches:
            raise TrainingError(f"algorithm.mini_batches={cfg.algorithm.mini_batches} must divide the prompts of each process "
                                f"(data.prompts_per_step / processes = {per_rank}): every update takes whole groups, an "
                                "equal share from each process")
        if training and cfg.algorithm.sft_weight > 0 and cfg.algorithm.sft_batch_size % self.dist.world:
            raise TrainingError(f"algorithm.sft_batch_size={cfg.algorithm.sft_batch_size} must be divisible by the number "
                                f"of processes ({self.dist.world}): each takes an equal share of the SFT pairs")
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        # Same seed on every rank: tiny random weights and LoRA init must be identical across processes.
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed % 2**32)
        torch.manual_seed(cfg.run.seed)
        self.out = Path(cfg.run.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if self.dist.is_main and training:
            try:
                self._made_dir = None if self.out.exists() else self.out
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrainingError(f"run.output_dir={cfg.run.output_dir}: cannot write there ({e.strerror or e}); "
                                    "give a writable directory") from None
            try:  # before anything is written into it (config.yaml, metrics.jsonl, checkpoints)
                self._run_lock = lock_run_dir(self.out)
            except RunDirInUse as e:
                raise TrainingError(str(e)) from None
            self._refuse_overwrite()
            from ..logging import check_backends

            check_backends(cfg)  # (a missing W&B login fails now, not after minutes of loading the model)
        # Training reads every prompt file now, so that a bad eval or SFT file fails at start, not at the first
        # evaluation (steps or hours in). eval / sample / export read them when they use them (eval: its prompts):
        # a run's relative data path need not resolve from wherever `imagerl export` is called.
        self._datasets: list | None = None
        self._eval_sets: list | None = None
        if training:
            self.sampler = PromptSampler(self.datasets, cfg.run.seed)
            _ = self.eval_sets
        if training and cfg.algorithm.sft_weight > 0:
            check_sft_datasets(cfg.data.sft_datasets)
        self.rewards = RewardSet(cfg.rewards)
        self._check_reward_weights()
        self.scorer = ScoringRunner(self.rewards)
        self.policy: Policy = policy_cls(cfg, self.device)
        if cfg.model.trained_dtype == "fp32":
            # fp32 master weights for what trains, while frozen parts (text encoders, VAE, VQ) stay in model.dtype;
            # autocast (run.dtype, checked at config time) computes in bf16 all the same. Before sharding and the
            # reference copy, so both see the fp32 parameters.
            for _, p in self.policy.named_trainable_parameters():
                p.data = p.data.float()
        # FSDP2 shards the trained module's parameters over the ranks; otherwise every rank holds the full
        # model and gradients are summed explicitly (dist.sum_gradients), which is DDP's update.
        self.fsdp = cfg.dist.strategy == "fsdp2" and self.dist.enabled
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            try:
                self.policy.shard(init_device_mesh(self.device.type, (self.dist.world,)))
            except NotImplementedError as e:
                raise TrainingError(str(e)) from None
        self.policy.setup_reference()
        self.params = self.policy.trainable_parameters()
        if not self.params:
            raise TrainingError("the policy has no trainable parameters: enable model.lora or list model.trainable modules")
        if training:  # (eval / export only read weights)
            self._check_update_precision()
            self.policy.check_training_config()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.ema = WeightEMA(self.policy.named_trainable_parameters(), o.ema_decay, o.ema_every) if o.ema_decay > 0 else None
        # DeepSpeed ZeRO-1/2 partitions the AdamW state (and gradients) over the ranks; the LR schedule stays
        # ours (it sets the learning rate of the same AdamW, which DeepSpeed steps on its partitions)
        self.zero = None
        if cfg.dist.strategy == "deepspeed" and self.dist.enabled:
            from ..zero import ZeroEngine

            try:
                self.zero = ZeroEngine(cfg, self.policy.trainable_module(), self.optimizer, self.dist)
            except ImportError as e:
                raise TrainingError(str(e)) from None
        # every rank must run the same forward/backward passes (collectives inside them)
        self.lockstep = self.fsdp or self.zero is not None
        self.start_step = 0
        self.resumed_from: Path | None = None  # the checkpoint loaded at start (what eval / sample name their files by)
        self._resume_note = ""
        if cfg.run.resume:
            self._maybe_resume(weights_only=not training)
        from ..logging import RunLogger, atomic_write_text

        self.logger = RunLogger(cfg, self.out, total_steps=cfg.train.steps, start_step=self.start_step,
                                is_main=self.dist.is_main and training)
        if training and self.dist.is_main:
            # only now that setup, the resume and the logging backends succeeded: a refused start (other model
            # settings, a backend that is not installed) must leave the run's config.yaml, which eval / sample /
            # export read, as the checkpoints' own
            atomic_write_text(self.out / "config.yaml", to_yaml(cfg))
        if training and self.start_step < cfg.train.steps:
            self.logger.print(self._banner())
        if self.dist.enabled and training:  # (so a launcher that silently starts one process is noticed)
            engine = "fsdp2" if self.fsdp else "deepspeed" if self.zero is not None else "ddp"
            self.logger.print(f"{self.dist.world} processes: dist.strategy={engine}, {torch.distributed.get_backend()}")
        elif training and cfg.dist.strategy in ("fsdp2", "deepspeed"):
            # (its checkpoints hold a plain AdamW state, which a later multi-process DeepSpeed run cannot resume)
            self.logger.print(f"note: dist.strategy={cfg.dist.strategy} with one process trains with plain AdamW on whole "
                              "weights (nothing to shard); launch with torchrun for several processes")
        if self.start_step and training:
            self.logger.print(f"resumed from {self.ckpt_dir}/step_{self.start_step:06d}")
            if self.start_step >= cfg.train.steps:
                self.logger.print(f"nothing to train: the run is at step {self.start_step} and train.steps={cfg.train.steps}; "
                                  "raise train.steps to train further")
        if self._resume_note:
            self.logger.print(self._resume_note)
        unused = self.policy.unused_changes() if training else []
        if unused:
            self.logger.print(f"note: model.family={cfg.model.family} does not use {', '.join(unused)} (left as set; "
                              "they apply to other policy families)")
        if training and cfg.model.lora.enabled and cfg.model.lora.dropout > 0:
            self.logger.print(f"note: model.lora.dropout={cfg.model.lora.dropout} has no effect: the policy runs in eval "
                              "mode throughout, so that recomputed log-probs equal the rollout's")

    # ------------------------------------------------------------------------------------------------
    @property
    def datasets(self) -> list:
        if self._datasets is None:
            self._datasets = load_datasets(self.cfg.data.datasets)
        return self._datasets

    @property
    def eval_sets(self) -> list:
        if self._eval_sets is None:
            d = self.cfg.data.eval_datasets
            self._eval_sets = load_datasets(d, "data.eval_datasets") if d else []
        return self._eval_sets

    def _banner(self) -> str:
        """One line at the start of training: what trains on what, against what, for how long."""
        cfg, m = self.cfg, self.cfg.model
        n = sum(p.numel() for p in self.params)
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)
        how = f"LoRA r={m.lora.r}" if m.lora.enabled else "full fine-tune"
        model = f"tiny {m.tiny_size}" if m.tiny else m.path
        data = ", ".join(f"{d.name} ({len(d)} prompts)" for d in self.datasets)
        rewards = ", ".join(f"{nm} x{w:g}" for nm, w in zip(self.rewards.names, self.rewards.weights))
        return (f"{m.family} ({model}): {size} trained parameters, {how} | data: {data} | rewards: {rewards} | "
                f"{cfg.data.prompts_per_step} prompts x {cfg.rollout.group_size} samples per step, steps "
                f"{self.start_step + 1}..{cfg.train.steps} -> {cfg.run.output_dir}")

    # ------------------------------------------------------------------------------------------------
    def _check_reward_weights(self) -> None:
        """Per-dataset reward_weights name rewards by their metric names (rewards[].name, else the type): a name
        that matches none would be ignored silently. And some weight must be non-zero, or the total reward is
        constant and every advantage 0."""
        names = self.rewards.names
        for section, specs in (("data.datasets", self.cfg.data.datasets), ("data.eval_datasets", self.cfg.data.eval_datasets)):
            for i, d in enumerate(specs):
                for key in d.reward_weights:
                    if key not in names:
                        raise TrainingError(f"{section}[{i}].reward_weights: no reward is named '{key}'."
                                            f"{did_you_mean(key, names)} "
                                            f"The rewards are: {', '.join(names)} (rewards[].name, else the type, or its class name for a package.module:Class type)")
        dataset_weights = [w for d in self.cfg.data.datasets for w in d.reward_weights.values()]
        if not any(self.rewards.weights) and not any(dataset_weights):
            raise TrainingError("every reward has weight 0 (rewards[].weight): the total reward is constant, so every "
                                "advantage is 0 and nothing trains; give at least one reward a non-zero weight")

    def _refuse_overwrite(self) -> None:
        """run.resume=false into a directory that holds a run would truncate its metrics.jsonl and leave its
        checkpoints beside the new run's, so that a later resume could continue from the old run's weights."""
        if self.cfg.run.resume:
            return
        ck = latest_checkpoint(self.ckpt_dir)
        metrics = self.out / "metrics.jsonl"
        if ck is not None or (metrics.exists() and metrics.stat().st_size > 0):
            what = f"checkpoints up to {ck.name}" if ck is not None else "a metrics.jsonl"
            raise TrainingError(
                f"run.output_dir={self.cfg.run.output_dir} already holds a run ({what}) and run.resume=false would "
                "overwrite it: give a new run.output_dir, delete the old run, or drop run.resume=false to continue it"
            )

    def _check_update_precision(self) -> None:
        """AdamW on bf16/fp16 weights loses every update smaller than half the weight's rounding step: at
        optim.lr=1e-6 (the Janus-Pro recipe) nearly no bf16 weight ever changes, and training silently does
        nothing (measured on the tiny Janus: 1.8% of the weights changed after a step at 1e-6, 11% at 1e-5).
        So trained parameters must be fp32 unless DeepSpeed runs the update (its ZeRO optimizer steps fp32
        master partitions of bf16 weights). fp16 compute would need loss scaling (a GradScaler), which the loop
        does not have, so it is refused for training too."""
        if self.cfg.run.dtype == "fp16":
            raise TrainingError(
                "run.dtype=fp16 trains without loss scaling, so small fp16 activation gradients would underflow to "
                "zero; use run.dtype=bf16 (the same speed and memory on GPUs that have it, with fp32's range) or fp32. "
                "fp16 is fine for `imagerl eval`"
            )
        low = sorted({str(p.dtype).removeprefix("torch.") for p in self.params if p.dtype in (torch.bfloat16, torch.float16)})
        if not low or (self.cfg.dist.strategy == "deepspeed" and self.dist.enabled):
            return
        raise TrainingError(
            f"the trained parameters are {'/'.join(low)} (model.dtype={self.cfg.model.dtype}): AdamW updates smaller than "
            f"their rounding step are lost, so at optim.lr={self.cfg.optim.lr:g} most weights would never change. Keep "
            "trained weights in fp32: model.trained_dtype=fp32 (only the trained parameters, the rest stays "
            f"{self.cfg.model.dtype}; with run.dtype=bf16), or model.dtype=fp32 with run.dtype=bf16 for bf16 compute, or "
            "train LoRA adapters (model.lora.enabled=true; they stay fp32 over a low-precision base), or launch "
            "dist.strategy=deepspeed with torchrun (fp32 master partitions)"
        )

    def autocast(self):
        dt = self.cfg.run.dtype
        if dt == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dt])

    def _maybe_resume(self, weights_only: bool = False) -> None:
        """Load the latest complete checkpoint: weights, and unless `weights_only` (eval / export) the optimizer,
        schedule, sampler and RNG states."""
        ck = latest_checkpoint(self.ckpt_dir)
        if ck is None:
            return
        state = load_checkpoint(ck)
        self.resumed_from = ck
        saved_cfg = state["state"].get("config")
        changed = _model_config_changes(saved_cfg, self.cfg)
        try:
            self.policy.load_trainable_state_dict(state["trainable"])
        except ValueError as e:
            written = f" It was written with {changed}." if changed else ""
            raise TrainingError(f"{ck}: {e}.{written} Resume with the model settings that wrote it, or give a new "
                                "run.output_dir") from None
        self.start_step = int(state["state"]["step"])
        if changed:  # the weights fit, but e.g. another model.path, lora.alpha or dtype: say so, in case it is a slip
            self._resume_note = (f"note: resuming from {ck}, whose weights load, but it was written with {changed}; "
                                 "check these are intended.")
        # another seed or other prompt files resume fine but make a run that its config.yaml no longer reproduces
        # (the metrics would mix two seeds' draws): say so too
        drawn = "" if weights_only else _draw_changes(saved_cfg, self.cfg)
        if drawn:
            self._resume_note += ("\n" if self._resume_note else "") + (
                f"note: resuming from {ck}, written with {drawn}: the steps from here on draw differently from the "
                "run that wrote it")
        if self.ema is not None:
            if dist.dcp_complete(ck / EMA_DIR):
                with reading(ck / EMA_DIR, ck):
                    dist.load_dcp(self.ema.state_dict(), ck / EMA_DIR, self.dist)
                # (in optimizer steps of the run that wrote it: rescaled to this run's steps per training step, which
                # the resumed schedule position uses, so that another inner_epochs / mini_batches keeps the EMA going)
                old_per = _saved_steps_per_step(saved_cfg) or optimizer_steps_per_step(self.cfg)
                self.ema.start = int(state["state"].get("ema_start", 0)) // old_per * optimizer_steps_per_step(self.cfg)
            elif (ck / EMA_DIR).exists():
                raise TrainingError(f"{ck / EMA_DIR} is incomplete (a damaged checkpoint): remove {ck} to resume from the "
                                    "checkpoint before it")
            else:  # EMA switched on for a run that had none: average from the resumed weights on, warm-up included
                self.ema = WeightEMA(self.policy.named_trainable_parameters(), self.cfg.optim.ema_decay,
                                     self.cfg.optim.ema_every, start=self.start_step * optimizer_steps_per_step(self.cfg))
                self._resume_note += ("\n" if self._resume_note else "") + f"{ck} holds no EMA (optim.ema_decay was 0): the average starts from its weights"
        if weights_only:
            return
        saved = state["optimizer"] if isinstance(state["optimizer"], dict) else {}
        zero_ckpt = ZERO_KEY in saved
        if zero_ckpt and self.zero is None and self.cfg.dist.strategy == "deepspeed":  # (one process: plain AdamW)
            raise TrainingError(f"{ck} holds ZeRO optimizer partitions of {saved[ZERO_KEY]} processes and this run has one "
                                f"process: resume with --nproc_per_node {saved[ZERO_KEY]}")
        if not zero_ckpt and self.zero is not None and saved.get(dist.OPTIM_KEY) == 1:
            raise TrainingError(f"{ck} was written by one process, where dist.strategy=deepspeed runs plain AdamW (no ZeRO "
                                f"partitions to load into {self.dist.world} processes): resume it with one process, or "
                                "with dist.strategy=ddp or fsdp2, which load it with any process count")
        if zero_ckpt != (self.zero is not None):
            raise TrainingError(
                f"{ck}: its optimizer state was written {'with' if zero_ckpt else 'without'} dist.strategy=deepspeed; "
                "resume with the strategy that wrote it (DeepSpeed stores its own ZeRO partitions; the other strategies "
                "store an AdamW state any of them can load)"
            )
        if self.zero is not None:
            try:
                self.zero.load_partition(ck, saved)
            except ValueError as e:
                raise TrainingError(str(e)) from None
        elif dist.OPTIM_KEY in saved:  # any strategy but DeepSpeed, any process count
            if not dist.dcp_complete(ck / dist.OPTIM_DIR):
                raise TrainingError(f"{ck / dist.OPTIM_DIR} is missing or incomplete (a damaged checkpoint): "
                                    f"remove {ck} to resume from the checkpoint before it")
            with reading(ck / dist.OPTIM_DIR, ck):
                dist.load_optimizer_state(self.policy.trainable_module(), self.optimizer, ck, self.dist)
        else:
            raise TrainingError(f"{ck} has no optimizer state this version can read (written by an older imagerl?); "
                                "start a new run.output_dir")
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optim_config()
        try:
            self.sampler.load_state_dict(state["state"]["sampler"])
        except ValueError as e:
            raise TrainingError(f"{ck}: {e} ({len(self.datasets)} now): resume with the data.datasets that wrote it, or "
                                "give a new run.output_dir") from None
        set_rng_state(state["rng"], self.dist.rank, self.dist.world)

    def _apply_optim_config(self) -> None:
        """After a resume: the AdamW hyper-parameters and the rate come from this run's config, not the checkpoint's
        (the optimizer and scheduler states carry the old run's lr, base lr, betas, eps and weight decay). The rate
        is the schedule's value at the resumed optimizer step, so a changed optim.lr, or a longer train.steps
        that stretches a decay which had reached its floor, applies from the first resumed step."""
        o = self.cfg.optim
        # the position from the resumed *training* step: the optimizer-step count is start_step times the old run's
        # steps per training step, so another algorithm.inner_epochs or mini_batches moved it (2 -> 1 epochs halved
        # the position's divisor: a cosine schedule hit 0 at 60% of the run)
        self.scheduler.last_epoch = self.start_step * optimizer_steps_per_step(self.cfg)
        scale = lr_lambda(self.cfg)(self.scheduler.last_epoch)
        self.scheduler.base_lrs = [o.lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g.update(initial_lr=o.lr, lr=o.lr * scale, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def save(self, step: int) -> Path | None:
        path = None
        self.logger.sync()  # (metrics.jsonl durable up to this step before the checkpoint that holds it)
        # Gathering sharded (FSDP2) weights and staging the optimizer state are collective: every rank takes part.
        weights = self.policy.trainable_state_dict(keep=self.dist.is_main)  # (only rank 0 writes them)
        # every rank writes its own part of the optimizer state (ZeRO partitions, or DCP: FSDP2 shards / whole
        # tensors), and rank 0 moves the staged directory into the checkpoint before its atomic rename
        if self.zero is not None:
            opt_state, move_in = {ZERO_KEY: self.dist.world}, self.zero.stage_partitions(self.ckpt_dir, step)
        else:
            opt_state = {dist.OPTIM_KEY: self.dist.world}
            move_in = dist.stage_optimizer_state(self.policy.trainable_module(), self.optimizer, self.ckpt_dir, step,
                                                 self.dist)
        if self.ema is not None:  # (FSDP2: each rank's shards of the average, like the optimizer state)
            move_in.update(dist.stage_dcp(self.ema.state_dict(), self.ckpt_dir, step, EMA_DIR, self.dist))
        rng = dist.gather_objects(rng_state(), self.dist)  # every rank's own global RNG states (for user code)
        if self.dist.is_main:
            path = save_checkpoint(
                self.ckpt_dir, step, weights, opt_state,
                self.scheduler.state_dict(), {"sampler": self.sampler.state_dict(), "config": to_dict(self.cfg),
                                              "ema_start": self.ema.start if self.ema is not None else 0},
                keep_last=self.cfg.checkpoint.keep_last, move_in=move_in, rng=rng,
            )
        dist.barrier(self.dist)
        return path

    # ------------------------------------------------------------------------------------------------
    def rollout_and_score(self, step: int) -> tuple[Rollout, ScoreTable, float, float]:
        """Roll out this rank's slice of the step's prompts and score it -> (rollout, table, t_rollout, t_reward).

        With scoring.overlap the policy hands over each decoded micro-batch (whole groups) to the scoring
        thread while it generates the next one; t_reward is then only the wait after the rollout ends."""
        cfg = self.cfg
        B, G = cfg.data.prompts_per_step, cfg.rollout.group_size
        batch, rweights = self.sampler.next_batch(B)
        local, lw, first = slice_for_rank(batch, rweights, self.dist.rank, self.dist.world)
        per_sample = [w for w in lw for _ in range(G)]
        # Rank-independent on purpose: adapters derive one random stream per sample row from it and the row's
        # global group id (Policy.row_generators), so K processes draw exactly the samples one process would.
        gen = seeded_generator(cfg.run.seed, step, 0, ROLLOUT)
        offset = (step - 1) * B + first  # global group ids: unique over steps and ranks
        chunker = None
        if cfg.scoring.overlap:
            chunker = ChunkScorer(self.scorer, local.prompts, local.metadata, G, per_sample, local.source_images,
                                  group_id_offset=offset)
        self.policy.chunk_callback = chunker
        self.policy.eval()
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), self.autocast():
                ro = self.policy.rollout(local, G, gen, group_id_offset=offset)
        finally:
            self.policy.chunk_callback = None
        t1 = time.perf_counter()
        if chunker is not None and chunker.covers_all() and ro.texts is None:
            table = chunker.collect()
        else:
            table = self.scorer.score(RewardInput.from_rollout(ro), per_sample)
        return ro, table, t1 - t0, time.perf_counter() - t1

    def advantages(self, ro: Rollout, table: ScoreTable) -> tuple[AdvantageOutput, torch.Tensor, torch.Tensor]:
        a = self.cfg.algorithm
        scores = table.scores
        if self.cfg.scoring.fallback is not None:
            scores = torch.nan_to_num(scores, nan=self.cfg.scoring.fallback)
        g_scores = dist.all_gather_cat(scores, self.dist)
        g_weights = dist.all_gather_cat(table.weights, self.dist)
        g_ids = dist.all_gather_cat(ro.group_ids.cpu(), self.dist)
        out = compute_advantages(a.advantage, g_scores, g_ids, g_weights, a.adv_eps, a.adv_clip)
        n = len(ro)
        lo = self.dist.rank * n
        local = AdvantageOutput(out.adv[lo: lo + n], out.valid[lo: lo + n], out.total[lo: lo + n])
        return local, g_scores, out.total

    def _check_abstains(self, g_scores: torch.Tensor, g_total: torch.Tensor, table: ScoreTable) -> None:
        # (a sample has no reward when no reward with a non-zero weight scored it: the combined total is NaN; a
        # weight-0 reward that is only monitored does not hide a weighted judge that abstained on everything)
        nan_rows = torch.isnan(g_total)
        frac = float(nan_rows.float().mean()) if len(nan_rows) else 0.0
        limit = self.cfg.scoring.max_abstain_fraction
        if frac >= 1.0 or frac > limit:
            per = {n: int(torch.isnan(g_scores[:, j]).sum()) for j, n in enumerate(table.names)}
            raise TrainingError(
                f"{frac:.0%} of samples have no reward (every reward with a non-zero weight abstained/NaN; abstains per "
                f"reward: {per}). "
                "Check that the rewards fit the prompts (e.g. OCR needs quoted text), that judge servers are up, "
                "or set scoring.fallback=<value> to use a fixed score for abstains."
            )

    # ------------------------------------------------------------------------------------------------
    def train_on(self, ro: Rollout, adv: AdvantageOutput, step: int) -> dict[str, float]:
        """algorithm.inner_epochs x algorithm.mini_batches optimizer steps on one step's rollout -> metrics."""
        a = self.cfg.algorithm
        gen = seeded_generator(self.cfg.run.seed, step, self.dist.rank, TRAIN)
        self.policy.eval()  # no dropout: the recomputed distribution must be the sampling distribution
        # Update j of an epoch trains the groups whose (global) id is j modulo algorithm.mini_batches, shifted by the
        # epoch: that depends on the group only, so K processes form the same updates as one (each holds an equal
        # share of every update: the divisibility is checked at start).
        n_upd = max(1, a.mini_batches)
        update_of = ro.group_ids.cpu().long() % n_upd
        tallies: list[_Tally] = []
        for epoch in range(a.inner_epochs):
            epoch_order = torch.randperm(len(ro), generator=gen) if a.inner_epochs > 1 else torch.arange(len(ro))
            # Which units are trained this epoch (flow: the timestep subset) is drawn from a stream that depends on
            # (seed, step, epoch) only, identically for every update, micro-batch and rank, so the update does not
            # depend on micro-batch size or process count.
            units_seed = int(seeded_generator(self.cfg.run.seed, step, 0, TRAIN + 100 * (epoch + 1)).initial_seed())
            for j in range(n_upd):
                order = epoch_order[((update_of[epoch_order] + epoch) % n_upd) == j]
                plan, w_NT = self._plan_update(ro, adv, order, units_seed)
                tally = self._accumulate_gradients(plan, w_NT, adv, first_update=epoch == 0 and j == 0)
                if a.sft_weight > 0:  # this rank's share of the mean over the step's pairs (summed over ranks)
                    tally.sft = self._sft_step(step, epoch, j)
                tally.grad_norm = self._optimizer_step(step)
                tallies.append(tally.reduced(self.dist))
        return _Tally.summary(tallies, grpo_scale=1.0 - a.sft_weight, sft_weight=a.sft_weight, kl=a.kl_coef > 0)

    def _plan_update(self, ro: Rollout, adv: AdvantageOutput, order: torch.Tensor, units_seed: int
                     ) -> tuple[list[tuple[torch.Tensor, Rollout, list[torch.Tensor]]], torch.Tensor]:
        """The update's passes [(rows, their sub-rollout, unit chunks)] in micro-batches of the rows in `order`, and
        the per-unit loss weights [N, T], normalised with the counts of the update's whole global batch."""
        a = self.cfg.algorithm
        plan = []
        sel = torch.zeros_like(ro.mask)
        for lo in range(0, len(order), a.micro_batch_size):
            idx = order[lo: lo + a.micro_batch_size]
            sub = ro.select(idx)
            chunks = self.policy.unit_chunks(sub, torch.Generator().manual_seed(units_seed))
            for units in chunks:
                sel[idx.to(sel.device).unsqueeze(1), units.to(sel.device).unsqueeze(0)] = True
            plan.append((idx, sub, chunks))
        eff = sel & ro.mask
        in_update = torch.zeros(len(ro), dtype=torch.bool, device=eff.device)
        in_update[order.to(eff.device)] = True
        valid = adv.valid.to(eff.device) & in_update
        tot_units = dist.all_reduce_sum(torch.tensor(float((eff & valid.unsqueeze(1)).sum())), self.dist)
        tot_rows = dist.all_reduce_sum(torch.tensor(float(valid.sum())), self.dist)
        return plan, unit_weights(eff, valid, a.loss_agg, total_rows=float(tot_rows), total_units=float(tot_units))

    def _accumulate_gradients(self, plan: list, w_NT: torch.Tensor, adv: AdvantageOutput, first_update: bool) -> _Tally:
        """Backward of (1 - sft_weight) x (clipped surrogate + kl_coef x KL) over the planned passes -> their sums."""
        a = self.cfg.algorithm
        need_kl = a.kl_coef > 0
        if self.zero is None:  # DeepSpeed clears its gradient partitions after each step itself
            self.optimizer.zero_grad(set_to_none=True)
        t = _Tally()
        adv_dev = adv.adv.to(w_NT.device)
        for idx, sub, chunks in plan:
            idx_d = idx.to(w_NT.device)
            for units in chunks:
                w = w_NT[idx_d][:, units.to(w_NT.device)]
                if float(w.sum()) == 0.0 and not self.lockstep:
                    continue
                with self.autocast():
                    cur = self.policy.log_prob(sub, units, need_kl_terms=need_kl)
                terms = clipped_surrogate(cur.logp, sub.old_logp[:, units], adv_dev[idx_d], a.clip_eps_low,
                                          a.clip_eps_high, a.dual_clip)
                loss_pg = (terms.loss * w).sum()
                loss = loss_pg
                if need_kl:
                    with torch.no_grad(), self.policy.reference(), self.autocast():
                        ref = self.policy.log_prob(sub, units, need_kl_terms=True)
                    kl_u = kl_per_unit(a.kl_estimator, cur, ref)
                    loss_kl = a.kl_coef * (kl_u * w).sum()
                    loss = loss + loss_kl
                    t.kl += float(loss_kl.detach())
                    t.kl_raw += float((kl_u.detach() * w).sum())
                self._backward(loss * (1.0 - a.sft_weight))
                t.pg += float(loss_pg.detach())
                t.add_ratios(terms.ratio.detach(), terms.clipped, w > 0, first_update)
        return t

    def _optimizer_step(self, step: int) -> float:
        """Sum the gradients over ranks, clip, step the optimizer, scheduler and EMA -> the gradient norm."""
        cfg = self.cfg
        if self.zero is not None:  # reduce-scatter, clip and AdamW on this rank's partition
            gn = torch.tensor(self.zero.step())
        else:
            # A parameter without a gradient (no trained unit in this update on this rank: every group of the update
            # abstained) counts as a zero gradient, so AdamW steps every parameter in every update: its step count,
            # moments and weight decay then do not depend on how the rows were spread over processes (a rank that
            # joins the gradient sum, or DeepSpeed's lockstep backward, has zeros there too), and every parameter
            # has optimizer state to checkpoint.
            dist.zero_missing_grads(self.params)
            if not self.fsdp:  # FSDP2 reduce-scatters (sums) gradients during backward
                dist.sum_gradients(self.params, self.dist)
            gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
            if hasattr(gn, "full_tensor"):
                gn = gn.full_tensor()
        if not torch.isfinite(gn):  # (DeepSpeed has skipped its update in that case; the others never ran it)
            raise TrainingError(f"step {step}: gradient norm is {float(gn)} (NaN/inf); lower optim.lr or check the rewards")
        if self.zero is None:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.scheduler.last_epoch)  # (= optimizer steps so far, restored on resume)
        return float(gn)

    def _sft_step(self, step: int, epoch: int, update: int = 0) -> float:
        """Backward of sft_weight x the SFT loss's share of this rank -> that share (the ranks' shares sum to the
        mean over the step's algorithm.sft_batch_size pairs). The pairs are drawn the same on every rank and split
        in equal slices, and each pair's noise comes from its own stream, so K processes train on the same pairs
        and noise as one process, and the gradients, summed over ranks, are the one-process mean's."""
        a, seed, world = self.cfg.algorithm, self.cfg.run.seed, self.dist.world
        per = a.sft_batch_size // world  # (divisibility checked at start)
        mine = range(self.dist.rank * per, (self.dist.rank + 1) * per)
        key = step * 97 + epoch + 1_000_003 * update
        batch = sft_batch(self.cfg.data.sft_datasets, a.sft_batch_size, seeded_generator(seed, key, 0, SFT),
                          size=int(getattr(self.policy, "image_size", 64)), keep=mine)
        with self.autocast():
            loss = self.policy.sft_loss(batch, [seeded_generator(seed, key, 1 + i, SFT) for i in mine])
        self._backward(a.sft_weight * loss / world)
        return float(loss.detach()) / world

    def _backward(self, loss: torch.Tensor) -> None:
        if self.zero is not None:
            self.zero.backward(loss)
        else:
            loss.backward()

    # ------------------------------------------------------------------------------------------------
    def step(self, step: int) -> StepResult:
        t0 = time.perf_counter()
        ro, table, t_roll, t_rew = self.rollout_and_score(step)
        t2 = time.perf_counter()
        adv, g_scores, g_total = self.advantages(ro, table)
        self._check_abstains(g_scores, g_total, table)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step's updates use (the scheduler moves on after)
        train_stats = self.train_on(ro, adv, step)
        t3 = time.perf_counter()
        m = reward_summary("reward/", g_total, g_scores, table.names)
        ok = ~torch.isnan(g_total)
        m["reward/std"] = float(g_total[ok].std(unbiased=False)) if ok.sum() > 1 else 0.0
        # fractions of the step's samples: where each reward abstained, and where all did (no combined reward)
        m.update({f"reward/{n}/abstain": float(torch.isnan(g_scores[:, j]).float().mean()) for j, n in enumerate(table.names)})
        m["reward/abstain"] = float((~ok).float().mean())
        # the global batch's numbers, like every other metric: |advantage| over all ranks' samples, and the rewards'
        # counters (failures, retries, gate passes, ...) summed over the ranks' tables
        s_n = dist.all_reduce_sum(torch.tensor([float(adv.adv.abs().sum()), float(len(adv.adv))], dtype=torch.float64), self.dist)
        m["adv/abs_mean"] = float(s_n[0] / s_n[1].clamp_min(1.0))
        counters = {k: float(v) for k, v in table.details.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        m.update({f"reward/{k}": v for k, v in dist.sum_counters(counters, self.dist).items()})
        m.update(train_stats)
        m["lr"] = lr
        m["time/rollout"], m["time/reward"], m["time/train"], m["time/step"] = t_roll, t_rew, t3 - t2, t3 - t0
        return StepResult(ro, table, adv, m)

    def eval_rollout(self) -> tuple[dict[str, float], Rollout, torch.Tensor]:
        """Deterministic evaluation (flow: ODE with the eval steps/CFG) -> (metrics, the first round's rollout on
        this rank, its total reward per sample [N]).

        The prompts: train.eval_prompts of data.eval_datasets (0 = all of them), or without an eval set the first
        data.prompts_per_step of the training data. They are sampled in rounds of data.prompts_per_step split over
        the processes like a training step (the last round padded with repeats whose scores are dropped), so
        every rank runs the same forwards (FSDP2 / ZeRO collectives) and memory stays that of a training rollout.
        Each prompt's samples are seeded by its global index, so the numbers do not depend on the process count;
        the means are sums and counts reduced over the ranks. With several eval datasets each also gets its own
        means (eval/<dataset>/reward/...)."""
        cfg = self.cfg
        ds = self.eval_sets or self.datasets
        rows = [r for d in ds for r in d.rows]
        row_ds = torch.tensor([i for i, d in enumerate(ds) for _ in d.rows])
        limit = cfg.train.eval_prompts or (len(rows) if cfg.data.eval_datasets else cfg.data.prompts_per_step)
        rows, row_ds = rows[:limit], row_ds[:limit]
        B, G = cfg.data.prompts_per_step, cfg.rollout.group_size
        R = len(self.rewards.names)
        # [datasets, total + rewards]: NaN-aware sums and counts
        sums, counts = torch.zeros(len(ds), R + 1, dtype=torch.float64), torch.zeros(len(ds), R + 1, dtype=torch.float64)
        first: tuple[Rollout, torch.Tensor] | None = None
        for k, start in enumerate(range(0, len(rows), B)):
            real = rows[start:start + B]
            part = real + [rows[i % len(rows)] for i in range(B - len(real))]
            # (the padding repeats rows from the start, so prompt i of the round is row (start + i) mod len(rows))
            of = [ds[int(row_ds[(start + i) % len(rows)])] for i in range(B)]
            batch = make_batch(list(zip(of, part)))
            rw = [d.reward_weights for d in of]  # each prompt scored with its dataset's reward_weights, as in training
            local, lw, lo = slice_for_rank(batch, rw, self.dist.rank, self.dist.world)
            ro = self.sample(local, G, seeded_generator(cfg.run.seed, 0, 0, EVAL), eval_mode=True,
                             group_id_offset=start + lo)
            t = self.scorer.score(RewardInput.from_rollout(ro), [w for w in lw for _ in range(G)])
            tot = t.weighted_total(cfg.scoring.fallback)
            if first is None:
                first = (ro, tot)
            prompt = lo + torch.arange(len(ro)) // G  # index in this round of each sample's prompt
            keep = prompt < len(real)  # (not the padding prompts)
            vals = torch.cat([tot[:, None].double(), t.scores.double()], 1)[keep]
            ok = ~torch.isnan(vals)
            which = row_ds[start + prompt[keep]]
            sums.index_add_(0, which, torch.where(ok, vals, torch.zeros_like(vals)))
            counts.index_add_(0, which, ok.double())
        sums, counts = dist.all_reduce_sum(sums, self.dist), dist.all_reduce_sum(counts, self.dist)

        def means(s: torch.Tensor, c: torch.Tensor, prefix: str) -> dict[str, float]:
            m = [float(a / b) if b > 0 else math.nan for a, b in zip(s.tolist(), c.tolist())]
            return {f"{prefix}mean": m[0], **{f"{prefix}{n}/mean": x for n, x in zip(self.rewards.names, m[1:])}}

        metrics = {**means(sums.sum(0), counts.sum(0), "eval/reward/"), "eval/prompts": float(len(rows))}
        if len(ds) > 1:
            names = unique_names([d.name for d in ds])
            evaluated = torch.bincount(row_ds, minlength=len(ds))  # (eval_prompts may stop before the last ones)
            for i, name in enumerate(names):
                if evaluated[i] > 0:
                    metrics.update(means(sums[i], counts[i], f"eval/{name}/reward/"))
        assert first is not None
        return metrics, first[0], first[1]

    def sample(self, batch: PromptBatch, n: int, gen: torch.Generator, eval_mode: bool = False,
               group_id_offset: int = 0) -> Rollout:
        """n images per prompt from the evaluated weights (`eval_weights`), without gradients: the training
        sampler (rollout.* settings), or with `eval_mode` the deterministic evaluation one (flow: ODE with the
        eval steps/CFG)."""
        self.policy.eval()
        with torch.no_grad(), self.autocast(), self.eval_weights():
            return self.policy.rollout(batch, n, gen, group_id_offset=group_id_offset, eval_mode=eval_mode)

    def eval_weights(self) -> contextlib.AbstractContextManager:
        """The weights to evaluate, sample and export: the EMA when optim.ema_decay > 0, else the trained ones."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        last: dict[str, float] = {}
        ok = False
        try:
            for step in range(self.start_step + 1, cfg.train.steps + 1):
                res = self.step(step)
                last = res.metrics
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    ev = self.eval_rollout()[0]
                    last.update(ev)
                    self.logger.print(f"eval at step {step}: " + ", ".join(
                        f"{k[len('eval/'):]} {v:.4g}" for k, v in ev.items() if k.endswith("/mean") and math.isfinite(v)))
                self.logger.log_step(step, last)
                if cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or step == 1 or step == cfg.train.steps):
                    # (this rank's samples; the title's mean is the whole step's, as logged)
                    self.logger.log_samples(step, res.rollout.images, res.rollout.prompts,
                                            res.table.weighted_total(cfg.scoring.fallback), res.rollout.group_ids,
                                            batch_mean=last.get("reward/mean"))
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    self.save(step)
            # (not again when the periodic save just wrote the last step: a second full write of the weights)
            periodic_last = bool(cfg.checkpoint.every) and cfg.train.steps % cfg.checkpoint.every == 0
            if cfg.checkpoint.save_final and self.start_step < cfg.train.steps and not periodic_last:
                self.save(cfg.train.steps)
            ok = True
        finally:
            paths = self.logger.finish()
            self.close(synced=ok)
        return {"metrics": last, "paths": paths}


    def close(self, synced: bool = False) -> None:
        """Stop the scoring thread, release reward servers/sessions and the run directory, and end the process
        group this trainer started (under torchrun; train, eval and sample all end here). `synced`: every rank
        finished without an error (see dist.shutdown). Also after a failed start, so each part may be missing."""
        for part in (getattr(self, "scorer", None), getattr(self, "rewards", None)):
            if part is not None:
                part.close()
        unlock_run_dir(self._run_lock)
        if hasattr(self, "dist"):
            dist.shutdown(self.dist, synced=synced)


def reward_summary(prefix: str, total_N: torch.Tensor, scores_NR: torch.Tensor, names: list[str]) -> dict[str, float]:
    """NaN-aware means: {prefix+'mean': mean total reward, prefix+'<name>/mean': mean of each reward}."""

    def nanmean(x: torch.Tensor) -> float:
        ok = ~torch.isnan(x)
        return float(x[ok].mean()) if ok.any() else math.nan

    out = {f"{prefix}mean": nanmean(total_N)}
    out.update({f"{prefix}{n}/mean": nanmean(scores_NR[:, j]) for j, n in enumerate(names)})
    return out


def train(cfg: Config) -> dict[str, Any]:
    return GRPOTrainer(cfg).train()  # (train() closes the trainer, and with it the process group, however it ends)
