"""Typed records passed between the stages of the one training loop.

Shapes are the contract (see DESIGN.md):  N = samples in the (local) batch, T = trained units per
sample (image tokens for AR policies, denoising steps for flow policies), R = number of rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PromptBatch:
    """B prompts drawn by the sampler; a policy expands them to B*G samples."""

    prompts: list[str]  # [B]
    metadata: list[dict[str, Any]]  # [B] dataset fields kept for rewards (e.g. colour, target text)
    source_images: list[Any] | None = None  # [B] PIL images for editing tasks, else None
    dataset_names: list[str] | None = None  # [B] which mixture component each prompt came from

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Rollout:
    """What a policy returns from `rollout`: enough to score the samples and to replay them.

    `replay` is adapter-private (token ids, latents, timesteps, prompt embeddings ...); the loop never
    looks inside it, it only slices it along dim 0 with `Rollout.select`.
    """

    images: torch.Tensor  # [N, 3, H, W] float in [0, 1]
    old_logp: torch.Tensor  # [N, T] log-prob of each trained unit under the sampling policy
    mask: torch.Tensor  # [N, T] bool, which units are trained / valid
    group_ids: torch.Tensor  # [N] long, unique across ranks: samples of one prompt share an id
    prompts: list[str]  # [N]
    metadata: list[dict[str, Any]]  # [N]
    replay: dict[str, Any] = field(default_factory=dict)  # tensors with leading dim N, or lists of len N
    texts: list[str] | None = None  # [N] generated text (planner policies, thinking prefills)
    source_images: list[Any] | None = None  # [N] editing sources
    dataset_names: list[str] | None = None  # [N]
    ref_logp: torch.Tensor | None = None  # [N, T] optional, filled when a KL term needs it

    def __len__(self) -> int:
        return int(self.group_ids.shape[0])

    @property
    def num_units(self) -> int:
        return int(self.old_logp.shape[1])

    def select(self, idx: torch.Tensor | list[int]) -> "Rollout":
        """Rows `idx` of every per-sample field (used for micro-batches)."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        idx_l = idx_t.tolist()

        def pick(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == len(self):
                return v.index_select(0, idx_t.to(v.device))
            if isinstance(v, list) and len(v) == len(self):
                return [v[i] for i in idx_l]
            if isinstance(v, dict):
                return {k: pick(x) for k, x in v.items()}
            return v

        return Rollout(
            images=pick(self.images),
            old_logp=pick(self.old_logp),
            mask=pick(self.mask),
            group_ids=pick(self.group_ids),
            prompts=pick(self.prompts),
            metadata=pick(self.metadata),
            replay=pick(self.replay),
            texts=pick(self.texts) if self.texts is not None else None,
            source_images=pick(self.source_images) if self.source_images is not None else None,
            dataset_names=pick(self.dataset_names) if self.dataset_names is not None else None,
            ref_logp=pick(self.ref_logp) if self.ref_logp is not None else None,
        )


@dataclass
class LogProbOutput:
    """What `Policy.log_prob` returns for the selected units.

    For AR policies `logp` is the log-prob of the sampled token; `kl_extra` is unused.
    For flow policies `logp` is the Gaussian log-density of the stored next latent and `mean`/`std`
    are the transition's mean and std (mean-space KL needs them); `velocity` is the model output
    (velocity-space KL needs it).
    """

    logp: torch.Tensor  # [N, K]
    mean: torch.Tensor | None = None  # [N, K, ...] flow transition means
    std: torch.Tensor | None = None  # [N, K] or broadcastable
    velocity: torch.Tensor | None = None  # [N, K, ...]
    dt: torch.Tensor | None = None  # [N, K] flow: |sigma_next - sigma| of each transition
    logits: torch.Tensor | None = None  # [N, K, V] only when asked for (full-distribution KL)


@dataclass
class RewardInput:
    """Everything a reward may look at. Rewards ignore what they do not need."""

    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    prompts: list[str]  # [N]
    metadata: list[dict[str, Any]]  # [N]
    group_ids: torch.Tensor | None = None  # [N]
    texts: list[str] | None = None  # [N] generated text (planners)
    source_images: list[Any] | None = None  # [N] editing sources (PIL or tensors)

    def __post_init__(self) -> None:
        # A diverged generator (NaN weights, a bf16 overflow in the VAE) yields NaN pixels, which every 8-bit encoder
        # turns into black: judges would score a black picture and JPEG compressibility would reward it. Stop instead.
        if self.images.is_floating_point():
            bad = (~torch.isfinite(self.images.flatten(1))).any(1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"{len(bad)} of {len(self)} generated images contain NaN/inf pixels (samples {bad[:8]}, first prompt "
                    f"{self.prompts[bad[0]]!r}): the generator diverged. Lower optim.lr, use run.dtype=fp32, or resume "
                    f"from an earlier checkpoint")

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_rollout(cls, r: Rollout) -> "RewardInput":
        return cls(
            images=r.images,
            prompts=r.prompts,
            metadata=r.metadata,
            group_ids=r.group_ids,
            texts=r.texts,
            source_images=r.source_images,
        )


@dataclass
class RewardOutput:
    """Scores [N] float32; NaN means the reward abstains for that sample (never a neutral value)."""

    scores: torch.Tensor  # [N] float32
    details: dict[str, Any] = field(default_factory=dict)  # named per-sample values or counters

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).reshape(-1)

    @property
    def num_abstain(self) -> int:
        return int(torch.isnan(self.scores).sum())


@dataclass
class StepMetrics:
    """Scalars logged for one training step (flattened into metrics.jsonl)."""

    values: dict[str, float] = field(default_factory=dict)

    def update(self, prefix: str, d: dict[str, float]) -> None:
        for k, v in d.items():
            self.values[f"{prefix}{k}"] = float(v)
