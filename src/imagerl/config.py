"""One typed config, validated and derived once at start.

Sources, in order of precedence (last wins): the schema defaults (paper defaults), a YAML or jsonnet
file, then ``key=value`` overrides from the command line. Values may read environment variables with
``${oc.env:NAME}`` or ``${oc.env:NAME,default}`` (omegaconf's resolver, short alias ``${env:NAME}``);
jsonnet files receive every environment variable as an external variable (``std.extVar('NAME')``).

Unknown or mistyped keys fail at start with the full key, the closest valid name and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .registry import did_you_mean

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_CONFIG = "demo.yaml"
# Recipes ship inside the package (src/imagerl/configs, package data of the wheel); the repository's configs/
# is a link to that folder, so `imagerl train configs/demo.yaml` and `imagerl train demo` both work, installed
# editable or not.
CONFIG_DIRS = (PACKAGE_DIR / "configs",)


class ConfigError(ValueError):
    """A bad config: the message names the key and says how to fix it."""


# --------------------------------------------------------------------------------------------------
# Schema. Defaults follow the papers the recipes reproduce (DeepSeekMath GRPO, Janus-Pro-R1, Flow-GRPO).
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"  # metrics.jsonl, samples/, checkpoints/, reward_curve.png, config.yaml; rerun = resume
    seed: int = 0  # seeds LoRA and tiny flow weights, prompt order and every sampling stream (tiny Janus weights: model.tiny_overrides.seed, default 0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (auto: CUDA when torch sees a GPU)
    dtype: str = "fp32"  # compute dtype under autocast: fp32 | bf16 | fp16 (fp16: eval only, no loss scaling)
    name: str = ""  # run name for loggers; defaults to the output dir's name
    resume: bool = True  # resume from the last checkpoint in output_dir/checkpoints if one exists; false: start anew (refused where output_dir holds a run)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    cudnn_attention: bool = False  # CUDA: let SDPA use cuDNN's attention kernels (off: its backward gave NaN gradients on an H100; README, "Training a real checkpoint on GPUs")


@dataclass
class LoraConfig:
    enabled: bool = False  # train peft LoRA adapters on the family's modules instead of the weights themselves
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scale alpha / r on the adapter's output
    dropout: float = 0.0  # peft's lora_dropout; no effect in training here (the policy runs in eval mode so that recomputed log-probs equal the rollout's)
    target_modules: list[str] = field(default_factory=list)  # empty = the family's default


@dataclass
class ModelConfig:
    family: str = "janus"  # policy adapter name (registry), or package.module:Class
    path: str = ""  # local directory or hub id of a real checkpoint; unused with tiny=true
    tiny: bool = False  # build tiny random weights of the same architecture classes, offline
    tiny_size: str = "demo"  # which tiny preset: demo | test | bench
    tiny_overrides: dict[str, Any] = field(default_factory=dict)  # architecture knobs for tiny builds
    dtype: str = "fp32"  # weight dtype: fp32 | bf16 | fp16
    trained_dtype: str = ""  # "" = model.dtype | fp32: the trained parameters in fp32 inside a bf16 model (run.dtype=bf16)
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainable: list[str] = field(default_factory=list)  # full fine-tune: name substrings to train (empty = family default)
    gradient_checkpointing: bool = False  # recompute the trained transformer's activations in backward (memory for time)
    reference: str = "auto"  # auto | lora_disabled | frozen_copy | none   (auto: lora_disabled with LoRA)
    revision: str = ""  # hub branch, tag or commit of model.path ("" = the default branch)
    trust_remote_code: bool = False  # let transformers run code shipped with the checkpoint (only for ones you trust)
    image_size: int = 0  # output resolution (0 = the family's default)


@dataclass
class DatasetConfig:
    path: str = ""  # .txt | .jsonl | .csv | .parquet, or builtin:<name>
    name: str = ""  # defaults to the file stem
    weight: float = 1.0  # sampling weight in a mixture
    prompt_field: str = "prompt"
    image_field: str = "image"  # editing data: the source image column (a path, relative to the file) -> RewardInput.source_images ("" = none)
    reward_weights: dict[str, float] = field(default_factory=dict)  # per-dataset reward weights (overrides rewards[].weight)
    limit: int = 0  # use only the first N rows (0 = all)


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=lambda: [DatasetConfig(path="builtin:color_shapes")])
    prompts_per_step: int = 4  # B: prompts per step (over all ranks; drawn without replacement within an epoch, so a step that spans two epochs may repeat one)
    eval_datasets: list[DatasetConfig] = field(default_factory=list)  # prompts of train.eval_every and imagerl eval ([] = datasets)
    sft_datasets: list[DatasetConfig] = field(default_factory=list)  # prompt+image pairs for the auxiliary SFT loss


@dataclass
class RolloutConfig:
    group_size: int = 8  # G samples per prompt
    micro_batch_size: int = 0  # samples per rollout forward (0 = all at once)
    # autoregressive token sampling
    temperature: float = 1.0  # AR: softmax temperature of sampling (log-probs are of the same distribution); > 0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg_scale: float = 5.0  # classifier-free guidance (AR: logits mix; flow: velocity mix). 1 = off
    cuda_graph: Optional[bool] = None  # AR: replay the fixed-shape decode step as one CUDA graph; null = on where run.device is CUDA (true on a CPU: the same step, eager)
    # flow-matching sampling
    num_steps: int = 10  # flow: denoising steps of a training rollout
    sde: str = "flow_grpo"  # flow_grpo | cps | dance | ode
    noise_level: float = 0.7  # a (Flow-GRPO), eta (CPS/Dance)
    sde_window: int = 0  # number of consecutive SDE steps (0 = all steps are SDE)
    sde_window_range: list[int] = field(default_factory=list)  # [lo, hi): steps the whole window lies in, as in Flow-GRPO ([] = all)
    shared_noise: bool = False  # same initial noise for the G samples of a prompt
    timestep_shift: float = 0.0  # 0 = the checkpoint's schedule (SD3: its scheduler's static shift, 3.0 in every release; FLUX / Qwen-Image: resolution-dependent mu, then shift_terminal where set); > 0 = this static shift
    cfg_in_training: bool = True  # flow: CFG in training rollouts and their log-probs (False = neither, DeepGen-RL)
    # evaluation
    eval_num_steps: int = 0  # 0 = num_steps
    eval_cfg_scale: float = 0.0  # 0 = cfg_scale


@dataclass
class AlgorithmConfig:
    name: str = "grpo"  # the policy-gradient objective (GRPO: clipped surrogate on group advantages, optional KL)
    advantage: str = "group_zscore"  # group_zscore | global_std | mean_only (Dr.GRPO) | gdpo
    adv_eps: float = 1e-4  # added to the std in the advantage's denominator (a group of equal rewards gets 0)
    adv_clip: float = 0.0  # 0 = no clipping of advantages
    clip_eps_low: float = 0.2  # ratio clipped below at 1 - clip_eps_low
    clip_eps_high: float = 0.2  # and above at 1 + clip_eps_high (DAPO's clip-higher: e.g. 0.28)
    dual_clip: float = 0.0  # c > 1 enables dual-clip for negative advantages (0 = off)
    loss_agg: str = "token_mean"  # token_mean | seq_mean
    kl_coef: float = 0.0  # weight of the KL penalty to the reference policy (0 = off, no reference forward)
    kl_estimator: str = "auto"  # auto (the family's: k3 for image tokens, mean for flow) | k1 | k2 | k3 (tokens) | mean | mean_dt | velocity | velocity_var (flow)
    inner_epochs: int = 1  # passes over each step's rollout (each a full gradient step; ratio 1 only in the first)
    mini_batches: int = 1  # optimizer steps per inner epoch, each on 1/mini_batches of the step's groups (PPO mini-batches)
    micro_batch_size: int = 4  # samples per training forward (gradient accumulation over the batch)
    log_prob: str = "gaussian"  # flow: gaussian (log-density of the transition) | sq_dist (-||x - mu||^2, Flow-GRPO's CPS code)
    timestep_fraction: float = 1.0  # flow: fraction of denoising steps trained per iteration (floor, >= 1)
    timestep_selection: str = "random"  # flow: which steps: random (DanceGRPO) | first (Flow-GRPO's code: the first k SDE steps)
    sft_weight: float = 0.0  # lambda: total = (1-lambda)*GRPO + lambda*SFT
    sft_batch_size: int = 2  # prompt+image pairs per optimizer step for the SFT term, over all processes (split evenly)


@dataclass
class OptimConfig:
    lr: float = 1e-5  # AdamW learning rate after warm-up
    weight_decay: float = 0.0  # AdamW (decoupled) weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW moment decays
    eps: float = 1e-8  # AdamW denominator epsilon
    warmup_steps: int = 0  # training steps of linear warm-up from lr / warmup_steps to lr (every optimizer step of a training step shares its lr)
    schedule: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.0  # cosine / linear decay ends at lr * min_lr_ratio at train.steps
    grad_clip: float = 1.0  # max grad norm (0 = off)
    ema_decay: float = 0.0  # EMA of the trained weights, used by eval, sample and export (0 = off; Flow-GRPO: 0.9)
    ema_every: int = 1  # optimizer steps between EMA updates (Flow-GRPO: 8)


@dataclass
class TrainConfig:
    steps: int = 100  # training steps (one rollout, scoring and update each); a rerun continues up to it
    eval_every: int = 0  # steps between evaluations (0 = never; `imagerl eval` evaluates a checkpoint any time)
    eval_prompts: int = 0  # prompts per evaluation: 0 = all of data.eval_datasets, or prompts_per_step of the training data without one


@dataclass
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept, oldest removed first (0 = keep all)
    save_final: bool = True  # also write one at the last step when it is not a multiple of every


@dataclass
class LoggingConfig:
    console: bool = True  # per-step progress on stdout (metrics.jsonl is written either way)
    progress_bar: bool = True  # a live rich bar on a terminal; plain lines when not a terminal or false
    log_every: int = 1  # steps between the plain per-step lines (no bar)
    sample_every: int = 10  # steps between sample grids (0 = never)
    samples_per_grid: int = 16  # images (with prompt and reward captions) per grid
    tensorboard: bool = False  # also write TensorBoard events under output_dir/tb
    wandb: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "imagerl"
    wandb_mode: str = "offline"  # offline | online
    swanlab: bool = False  # also log to SwanLab (pip install swanlab)
    swanlab_project: str = "imagerl"
    swanlab_mode: str = "offline"  # offline | online | local | cloud


@dataclass
class RewardSpec:
    type: str = "color_position"  # registry name or package.module:Class
    name: str = ""  # metric name; defaults to type (a package.module:Class type: the class name)
    weight: float = 1.0  # in the weighted total reward (negative: a penalty)
    args: dict[str, Any] = field(default_factory=dict)  # the reward's own parameters (validated by it)


@dataclass
class ScoringConfig:
    overlap: bool = True  # score each decoded rollout micro-batch while the next is generated (AR) or decoded (flow): same numbers, less waiting
    fallback: Optional[float] = None  # value used for abstaining samples only when asked for
    max_abstain_fraction: float = 1.0  # fail the step if more samples than this abstain


@dataclass
class DistConfig:
    strategy: str = "auto"  # auto | none | ddp | fsdp2 (sharded; Janus: fp32 trained weights) | deepspeed (ZeRO-1/2)
    zero_stage: int = 2  # deepspeed: 1 partitions the AdamW state, 2 also the gradients (3: use fsdp2)
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)  # deepspeed: keys merged into its config
    backend: str = "auto"  # auto | gloo | nccl


@dataclass
class ServerConfig:
    """`imagerl serve-reward`: the reward server (rewards/server.py). Unused by training."""

    host: str = "127.0.0.1"  # loopback by default; bind other addresses only behind auth
    port: int = 8100
    api_key_env: str = ""  # name of an env var holding the Bearer key clients must send ("" = no auth)
    max_batch: int = 32  # samples coalesced into one scorer call (dynamic batching)
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for more
    max_request_bytes: int = 64 * 1024 * 1024  # larger request bodies get 413
    max_image_pixels: int = 4096 * 4096  # larger images (width*height) get 413
    chat: dict[str, Any] = field(default_factory=dict)  # LocalVLMBackend args for /v1/chat/completions ({} = none)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_NO_DEFAULT = object()


def _env(name: str, default: Any = _NO_DEFAULT) -> Any:
    """`${env:NAME}` / `${env:NAME,default}`: the short form of `${oc.env:...}`, with the same error when unset."""
    v = os.environ.get(name)
    if v is not None:
        return v
    if default is _NO_DEFAULT:
        raise KeyError(f"Environment variable '{name}' not found")
    return default


if not OmegaConf.has_resolver("env"):
    OmegaConf.register_resolver("env", _env)


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """A config path as given, or a bundled recipe name (``demo.yaml`` or ``demo``)."""
    if path is None:
        path = DEMO_CONFIG
    p = Path(path)
    if p.is_file():
        return p
    # a bundled recipe by name, also when a directory of that name is here (e.g. a run's output_dir: flux_grpo/),
    # and as configs/<name> (the README's spelling, which is the checkout's link to the bundled recipes) when run
    # outside a checkout; never for another directory part: a mistyped my_configs/flux_grpo.yaml must not load
    # the bundled one
    for d in CONFIG_DIRS if p.parent in (Path("."), Path("configs")) else ():
        for cand in (p.name, f"{p.name}.yaml"):
            if (d / cand).is_file():
                return d / cand
    names = sorted({q.stem for d in CONFIG_DIRS if d.exists() for q in d.glob("*.yaml")})
    what = "is a directory, not a config file" if p.is_dir() else "does not exist"
    if (p / "config.yaml").is_file():
        what += f" (a run's directory: give {p / 'config.yaml'}, or run.output_dir={path} to eval / sample / export it)"
    raise ConfigError(
        f"config file '{path}' {what}. Give a path to a .yaml/.jsonnet file, or a bundled recipe: "
        f"{', '.join(names)}"
    )


def _read_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix in (".jsonnet", ".libsonnet"):
        try:
            import _jsonnet  # type: ignore[import-not-found]
        except ImportError as e:
            raise ConfigError(f"{path}: jsonnet configs need the 'jsonnet' package: pip install jsonnet") from e
        try:
            text = _jsonnet.evaluate_file(str(path), ext_vars=dict(os.environ))
        except RuntimeError as e:
            # jsonnet's message is a stack trace; its first line says what failed, and the frame in the user's file
            # (not std.jsonnet's internals) says where
            raw = str(e).strip().splitlines()
            frames = [ln.strip().split("\t")[0] for ln in raw[1:] if ln.startswith("\t")]  # (a stack frame: tab first)
            where = next((f for f in frames if f and not f.startswith("std.jsonnet")), "")
            first = raw[0] if raw else str(e)
            fix = ""
            m = re.search(r"undefined external variable: (\w+)", first)
            if m:
                fix = f"; set the environment variable {m.group(1)} (jsonnet reads each as std.extVar)"
            raise ConfigError(f"{path}: jsonnet evaluation failed: {first}{f' at {where}' if where else ''}{fix}") from None
        return json.loads(text)
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix in (".yaml", ".yml"):
        try:
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception as e:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    raise ConfigError(f"{path}: unknown config format '{suffix}'. Use .yaml, .json or .jsonnet")


def _expand_dotted_root(data: dict[str, Any]) -> dict[str, Any]:
    """`train.steps: 5` at the top of a file means what the override train.steps=5 means. Only the file's own top
    level is expanded: deeper mappings (a reward's args, tiny_overrides) may have keys with dots of their own."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(k, str) and "." in k:
            nested: Any = v
            for part in reversed(k.split(".")):
                nested = {part: nested}
            out = deep_merge(out, nested)
        else:
            out = deep_merge(out, {k: v})
    return out


def _read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, merged over the files its top-level `base:` names (one, or a list merged in
    order; each a path relative to this file, or a bundled recipe name). So a user's YAML can say
    `base: janus_pro_t2i_grpo` and hold only what it changes. Mappings merge key by key; a list (rewards,
    data.datasets) is replaced as a whole, since merging list items by position would silently mix two lists."""
    data = _read_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, model:, ...)")
    data = _expand_dotted_root(data)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base must name a config file or bundled recipe, or be a list of them (got {bases!r})")
    here = path.resolve()
    merged: dict[str, Any] = {}
    for b in bases:
        rel = Path(b).expanduser()
        rel = rel if rel.is_absolute() else path.parent / rel
        try:
            base_path = resolve_config_path(rel if rel.exists() else b)
        except ConfigError as e:
            raise ConfigError(f"{path}: base '{b}': {e}") from None
        if base_path.resolve() in (*chain, here):
            loop = " -> ".join(str(p) for p in (*chain, here, base_path.resolve()))
            raise ConfigError(f"{path}: base '{b}' leads back to a file that includes it ({loop}); remove one of the base: lines")
        merged = deep_merge(merged, _read_with_bases(base_path, (*chain, here)))
    return deep_merge(merged, data)


def _valid_keys(node: Any) -> list[str]:
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _check_keys(data: Any, path: list[str], schema: Any) -> None:
    """Walk user data against the schema; fail on the first unknown key with the closest valid name."""
    if isinstance(schema, list):
        elem = _list_elem_default(path)  # None for plain lists (betas, target_modules): nothing to check inside
        if isinstance(data, list):
            for i, item in enumerate(data):
                _check_keys(item, path + [str(i)], elem)
        return
    if not dataclasses.is_dataclass(schema) or not isinstance(data, dict):
        return
    valid = _valid_keys(schema)
    for k, v in data.items():
        if k not in valid:
            full = ".".join(path + [str(k)])
            close = difflib.get_close_matches(str(k), valid, n=1, cutoff=0.5)
            where = ".".join(path) or "the top level"
            hint = f" Did you mean '{'.'.join(path + [close[0]])}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{full}'.{hint} Valid keys under {where}: {', '.join(valid)}. "
                f"Fix the key in your YAML or override (run `imagerl print-config` to see every key)."
            )
        sub = getattr(schema, k)
        if isinstance(sub, list) or dataclasses.is_dataclass(sub):
            _check_keys(v, path + [str(k)], sub)


# Sections that are lists of entries, and the schema of one entry.
_LIST_SECTIONS = {
    "rewards": RewardSpec,
    "data.datasets": DatasetConfig,
    "data.eval_datasets": DatasetConfig,
    "data.sft_datasets": DatasetConfig,
}


def _list_section(path: list[str]) -> Any:
    """The entry class of the list of sections at `path` (indices ignored: rewards.0 -> RewardSpec), else None."""
    return _LIST_SECTIONS.get(".".join(p for p in path if not p.isdigit()))


def _list_elem_default(path: list[str]) -> Any:
    cls = _list_section(path)
    return cls() if cls else None


def _schema_type(parts: list[str]) -> Any:
    """The declared type of the config field at a dotted path (list entries by index), or None where the schema
    has no typed field there (free-form dicts such as rewards[].args, unknown keys)."""
    cls: Any = Config
    path: list[str] = []
    for i, part in enumerate(parts):
        if part.isdigit():
            cls = _list_section(path)
            if cls is None:
                return None
            path.append(part)
            continue
        if not dataclasses.is_dataclass(cls):
            return None
        t = typing.get_type_hints(cls).get(part)
        if t is None:
            return None
        path.append(part)
        if i == len(parts) - 1:
            return t
        cls = t if dataclasses.is_dataclass(t) else None if typing.get_origin(t) is not list else cls
    return None


def _yaml_value(raw: str) -> Any:
    """The value of `key=raw` as OmegaConf's dotlist reads it (YAML: numbers, lists, null; interpolations kept)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"_={raw}"]), resolve=False)["_"]


def _override_value(key: str, raw: str) -> Any:
    """A text field keeps the text as typed: YAML would read model.revision=0123456 as an octal number (42798) and
    1234e56 as a float. Quotes around it are removed; an empty value is ""; null is None (an error where not allowed)."""
    t = _schema_type(key.split("."))
    if dataclasses.is_dataclass(t):
        first = dataclasses.fields(t)[0].name
        raise ConfigError(f"{key} is a section, not a value: set its keys (e.g. {key}.{first}=...); "
                          f"`imagerl print-config` lists them")
    if t in (int, float) and not raw.strip().startswith("${"):
        v = _yaml_value(raw)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (t is float or isinstance(v, int))
        if not ok:
            raise ConfigError(f"{key}={raw}: {key} takes {'an integer' if t is int else 'a number'}")
        return v
    optional = typing.get_origin(t) in (typing.Union, types.UnionType) and set(typing.get_args(t)) == {str, type(None)}
    if t is str or optional:
        if raw in ("null", "~"):
            return None  # a non-Optional text field then fails validation with its name, as `key: null` in YAML does
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return raw[1:-1]
        return raw
    return _yaml_value(raw)


def _parse_overrides(overrides: list[str]) -> Any:
    out: dict[str, Any] = {}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. train.steps=20)")
        key, raw = o.split("=", 1)
        try:
            value = _override_value(key, raw)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse override '{o}': {str(e).splitlines()[0]}") from e
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


# The key a new list entry must name when an override appends it: without it `rewards.1.weight=2` (an index typo
# for rewards.0) silently added a second reward of the default type.
_ENTRY_IDENTITY = {"rewards": "type", "data.datasets": "path", "data.eval_datasets": "path", "data.sft_datasets": "path"}


def deep_merge(base: dict[str, Any], extra: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Deep-merge plain dicts; lists merge element-wise when the override indexes into them (an existing entry, or
    the next one: rewards.1.type=... on a one-entry list appends; a gap would be filled with made-up entries)."""
    out = dict(base)
    for k, v in extra.items():
        key = f"{path}.{k}" if path else str(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v, key)
        elif isinstance(v, dict) and isinstance(out.get(k), list) and all(str(i).isdigit() for i in v):
            lst = list(out[k])
            for i, item in sorted(v.items(), key=lambda kv: int(kv[0])):
                i = int(i)
                if i > len(lst):
                    raise ConfigError(f"{key}.{i}: {key} has {len(lst)} entr{'y' if len(lst) == 1 else 'ies'} (indices 0.."
                                      f"{len(lst) - 1}); to add one, use {key}.{len(lst)}")
                if i == len(lst):
                    ident = _ENTRY_IDENTITY.get(key)
                    if ident and not (isinstance(item, dict) and ident in item):
                        n = len(lst)
                        raise ConfigError(f"{key}.{i}: {key} has {n} entr{'y' if n == 1 else 'ies'}, so this adds a new "
                                          f"one, which needs its {ident}: give {key}.{i}.{ident}=... as well, or change "
                                          f"an existing entry ({', '.join(f'{key}.{j}' for j in range(n))})")
                    lst.append({})
                lst[i] = deep_merge(lst[i], item, f"{key}.{i}") if isinstance(item, dict) and isinstance(lst[i], dict) else item
            out[k] = lst
        else:
            out[k] = v
    return out


def _listify_indexed(data: Any, path: list[str]) -> Any:
    """`rewards.0.weight=2` arrives as {'rewards': {'0': {...}}} when the file had no list; make it a list."""
    if isinstance(data, dict):
        indexed = bool(data) and all(str(k).isdigit() for k in data)
        key = ".".join(path)
        if indexed and not _schema_at_list(path) and path and typing.get_origin(_schema_type(path)) is list:
            raise ConfigError(f"{key}.{next(iter(data))}: {key} is a list of values; give it whole, e.g. {key}=[a,b]")
        if indexed and _schema_at_list(path):
            idx = sorted(int(k) for k in data)
            if idx != list(range(len(idx))):
                raise ConfigError(f"{key}.{idx[-1]}: {key} is not set in the config, so its entries must be given from "
                                  f"{key}.0 on without gaps (got indices {idx})")
            return [_listify_indexed(data[k], path + [str(k)]) for k in sorted(data, key=lambda x: int(x))]
        return {k: _listify_indexed(v, path + [str(k)]) for k, v in data.items()}
    if isinstance(data, list):
        return [_listify_indexed(v, path + [str(i)]) for i, v in enumerate(data)]
    return data


def _schema_at_list(path: list[str]) -> bool:
    return _list_section(path) is not None


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Read a recipe (or the demo), apply overrides, validate, and return a typed `Config`."""
    overrides = list(overrides or [])
    user: dict[str, Any] = {}
    data = _read_with_bases(resolve_config_path(path))
    user = deep_merge(user, data)
    user = deep_merge(user, _parse_overrides(overrides))
    user = _listify_indexed(user, [])
    _check_keys(user, [], Config())
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, user)
        container = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
        merged = OmegaConf.merge(schema, container)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ValidationError as e:
        key = getattr(e, "full_key", "") or "?"
        raise ConfigError(
            f"config key '{key}' has a value of the wrong type: {str(e).splitlines()[0]}. "
            f"Fix it in your YAML or with an override like {key}=<value>."
        ) from e
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key: {e}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        msg = str(e).splitlines()[0]  # (omegaconf appends full_key / reference_type / object_type lines)
        if "Environment variable" in msg:
            msg += "; export it before the command, or give a default: ${oc.env:NAME,default}"
        elif "Interpolation key" in msg:
            msg += "; ${a.b} refers to another config key (e.g. ${model.family}), ${oc.env:NAME} to an env var"
        raise ConfigError(f"config key '{key}': {msg}") from e
    validate(cfg)
    return cfg


_CHOICES: dict[str, tuple[str, ...]] = {
    "run.dtype": ("fp32", "bf16", "fp16"),
    "model.dtype": ("fp32", "bf16", "fp16"),
    "model.trained_dtype": ("", "fp32"),
    "model.reference": ("auto", "lora_disabled", "frozen_copy", "none"),
    "model.tiny_size": ("demo", "test", "bench"),
    "rollout.sde": ("flow_grpo", "cps", "dance", "ode"),
    "algorithm.name": ("grpo",),  # (the one loop's objective; a name is reserved for each variant that lands)
    "algorithm.loss_agg": ("token_mean", "seq_mean"),
    "algorithm.log_prob": ("gaussian", "sq_dist"),
    "algorithm.timestep_selection": ("random", "first"),
    "algorithm.kl_estimator": ("auto", "k1", "k2", "k3", "mean", "mean_dt", "velocity", "velocity_var"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "logging.wandb_mode": ("offline", "online"),
    "logging.swanlab_mode": ("offline", "online", "local", "cloud"),
    "dist.strategy": ("auto", "none", "ddp", "fsdp2", "deepspeed"),
    "dist.backend": ("auto", "gloo", "nccl"),
}


def get_field(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        node = getattr(node, p)
    return node


def validate(cfg: Config) -> None:
    """Cross-field checks; each error names the field and the fix."""
    for key, choices in _CHOICES.items():
        v = get_field(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}='{v}' is not valid.{did_you_mean(str(v), list(choices))} "
                              f"Choose one of: {', '.join(choices)}")

    def positive(key: str, allow_zero: bool = False) -> None:
        v = get_field(cfg, key)
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{key}={v} must be {'>= 0' if allow_zero else '> 0'}")

    for k in ("train.steps", "rollout.group_size", "data.prompts_per_step", "algorithm.inner_epochs", "algorithm.mini_batches",
              "algorithm.micro_batch_size", "rollout.num_steps", "logging.samples_per_grid", "algorithm.sft_batch_size",
              "logging.log_every"):
        positive(k)
    for k in ("checkpoint.every", "checkpoint.keep_last", "logging.sample_every", "optim.warmup_steps",
              "optim.lr", "algorithm.kl_coef", "rollout.temperature", "optim.grad_clip", "optim.weight_decay",
              "algorithm.adv_clip", "algorithm.adv_eps", "run.threads", "model.image_size", "rollout.micro_batch_size",
              "rollout.eval_num_steps", "rollout.sde_window", "rollout.noise_level", "rollout.eval_cfg_scale",
              "train.eval_every", "train.eval_prompts"):
        positive(k, allow_zero=True)
    if cfg.optim.eps <= 0:
        raise ConfigError(f"optim.eps={cfg.optim.eps} must be > 0 (AdamW divides by sqrt(v) + eps; e.g. 1e-8)")
    if len(cfg.optim.betas) == 2 and not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas}: both must be in [0, 1), e.g. [0.9, 0.999]")
    for section in ("datasets", "eval_datasets", "sft_datasets"):
        for i, d in enumerate(getattr(cfg.data, section)):
            if d.limit < 0:
                raise ConfigError(f"data.{section}[{i}].limit={d.limit} must be >= 0 (0 = every row)")
            if not d.path:
                raise ConfigError(f"data.{section}[{i}].path is empty: give a .txt/.jsonl/.csv/.parquet file or builtin:<name>")
            # (the SFT pairs are drawn by weight too: 0 everywhere or a negative one crashed the first SFT step)
            if section != "eval_datasets" and not (d.weight > 0 and math.isfinite(d.weight)):
                raise ConfigError(f"data.{section}[{i}].weight={d.weight} must be a finite number > 0")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if not 0 < cfg.algorithm.timestep_fraction <= 1:
        raise ConfigError(f"algorithm.timestep_fraction={cfg.algorithm.timestep_fraction} must be in (0, 1]")
    if not 0 <= cfg.algorithm.sft_weight < 1:
        raise ConfigError(f"algorithm.sft_weight={cfg.algorithm.sft_weight} must be in [0, 1)")
    if cfg.algorithm.sft_weight > 0 and not cfg.data.sft_datasets:
        raise ConfigError("algorithm.sft_weight > 0 needs data.sft_datasets (prompt+image pairs); add one or set sft_weight=0")
    if cfg.algorithm.clip_eps_low < 0 or cfg.algorithm.clip_eps_high < 0:
        raise ConfigError("algorithm.clip_eps_low / clip_eps_high must be >= 0")
    if cfg.algorithm.dual_clip and cfg.algorithm.dual_clip <= 1:
        raise ConfigError(f"algorithm.dual_clip={cfg.algorithm.dual_clip} must be > 1 (or 0 to turn it off)")
    if cfg.model.lora.enabled and cfg.model.trainable:
        raise ConfigError(f"model.trainable={list(cfg.model.trainable)} selects modules for full fine-tuning, but "
                          "model.lora.enabled=true trains only the LoRA adapters: remove model.trainable, or set "
                          "model.lora.enabled=false to fine-tune those modules")
    if cfg.rollout.group_size < 2:
        raise ConfigError("rollout.group_size must be >= 2: group advantages need at least two samples per prompt")
    if not cfg.model.tiny and not cfg.model.path:
        raise ConfigError(
            "model.path is empty: give a local checkpoint directory or hub id (model.path=...), "
            "or set model.tiny=true to build tiny random weights for a smoke test"
        )
    if not cfg.rewards:
        raise ConfigError("rewards is empty: configure at least one reward (rewards: [{type: ..., weight: ...}])")
    for i, r in enumerate(cfg.rewards):
        if not r.type:
            raise ConfigError(f"rewards[{i}].type is empty: name a reward (e.g. color_position) or package.module:Class")
        if not math.isfinite(r.weight):  # (a NaN weight made every total NaN: "every reward abstained", misleadingly)
            raise ConfigError(f"rewards[{i}].weight={r.weight} must be a finite number (0 logs the reward without training on it)")
        if "/" in r.name:  # (metric keys are reward/<name>/<stat>: a '/' would split the name)
            raise ConfigError(f"rewards[{i}].name={r.name!r} contains '/'; use another separator, e.g. {r.name.replace('/', '_')!r}")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty: add at least one prompt file (data.datasets: [{path: prompts.txt}])")
    for i, d in enumerate(cfg.data.datasets):
        for k, w in (d.reward_weights or {}).items():
            if not math.isfinite(w):
                raise ConfigError(f"data.datasets[{i}].reward_weights.{k}={w} must be a finite number")
    if cfg.dist.strategy == "deepspeed" and cfg.dist.zero_stage not in (1, 2):
        raise ConfigError(
            f"dist.zero_stage={cfg.dist.zero_stage}: dist.strategy=deepspeed runs ZeRO stage 1 (optimizer state "
            "partitioned) or 2 (also gradients); for sharded parameters (what ZeRO-3 does) use dist.strategy=fsdp2"
        )
    if cfg.model.trained_dtype == "fp32" and cfg.model.dtype != "fp32" and cfg.run.dtype != cfg.model.dtype:
        raise ConfigError(
            f"model.trained_dtype=fp32 inside a model.dtype={cfg.model.dtype} model needs run.dtype={cfg.model.dtype}: "
            "autocast is what lets the fp32 trained layers take the low-precision activations of the frozen ones"
        )
    if not 0 <= cfg.scoring.max_abstain_fraction <= 1:
        raise ConfigError(f"scoring.max_abstain_fraction={cfg.scoring.max_abstain_fraction} must be in [0, 1] "
                          "(the share of samples that may abstain before the step fails; 1 = never fail)")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay={cfg.optim.ema_decay} must be in [0, 1) (0 turns the EMA off; e.g. 0.9)")
    if cfg.optim.ema_every < 1:
        raise ConfigError(f"optim.ema_every={cfg.optim.ema_every} must be >= 1 (optimizer steps between EMA updates)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas} must have two values, e.g. [0.9, 0.999]")
    if cfg.rollout.sde_window_range and len(cfg.rollout.sde_window_range) != 2:
        raise ConfigError("rollout.sde_window_range must be [lo, hi] or empty")
    if cfg.rollout.sde_window_range and not cfg.rollout.sde_window:
        raise ConfigError(f"rollout.sde_window_range={list(cfg.rollout.sde_window_range)} has no effect with "
                          "rollout.sde_window=0 (every step is SDE): set rollout.sde_window to the window's length")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(d: dict[str, Any]) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))  # type: ignore[return-value]
