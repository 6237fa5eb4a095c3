"""Builders shared by the flow-family integration tests (test_flow_sd3/flux/qwen_image.py): a tiny policy of
the real classes on CPU, prompt batches and seeded generators."""

from __future__ import annotations

import torch

from imagerl.config import Config
from imagerl.policies import POLICIES  # importing the package registers the built-in families
from imagerl.types import PromptBatch


def make_flow_policy(family: str, cfg_scale: float, **over):
    """A tiny `family` policy in eval mode: 4 rollout steps, noise level 0.7, the given CFG scale, plus
    overrides written `section__key=value` (`lora__key` for model.lora)."""
    cfg = Config()
    cfg.model.family, cfg.model.tiny, cfg.model.tiny_size = family, True, "test"
    cfg.rollout.num_steps, cfg.rollout.cfg_scale, cfg.rollout.noise_level = 4, cfg_scale, 0.7
    for k, v in over.items():
        sec, key = k.split("__")
        setattr(getattr(cfg, sec) if sec != "lora" else cfg.model.lora, key, v)
    pol = POLICIES.get(family)(cfg, torch.device("cpu"))
    pol.eval()
    return pol


def prompt_batch(prompts: list[str]) -> PromptBatch:
    return PromptBatch(prompts=list(prompts), metadata=[{"i": i} for i in range(len(prompts))])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
