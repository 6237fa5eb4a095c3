"""Command line: ``imagerl train | eval | sample | export | print-config | serve-reward``.

``imagerl train`` with no config runs the built-in demo recipe (configs/demo.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (torch is imported where a command needs it: `imagerl --help` stays fast)
    import torch

_command = ""  # the running subcommand, for messages


def _make_dir(path: Path, what: str) -> Path:
    """mkdir -p for an output directory the user chose, failing as one line that names the option."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        # (an existing read-only directory passes mkdir: write a file now, not after minutes of sampling)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".imagerl-write-test-"):
            pass
    except OSError as e:
        raise SystemExit(f"imagerl: {what}={path}: cannot write there ({e.strerror or e}); give a writable directory") from None
    return path


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """First positional that is not key=value is the config path; the rest are overrides."""
    config = None
    overrides = []
    for a in args:
        if a.startswith("-") and not os.path.exists(a):  # (the command took its own options out already)
            raise SystemExit(f"imagerl: unknown option '{a}': `imagerl {_command or '<command>'} --help` lists the options")
        if "=" in a and not os.path.exists(a):
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise SystemExit(f"imagerl: unexpected argument '{a}': give one CONFIG and key=value overrides")
    return config, overrides


def _another_rank_says_it() -> bool:
    """Under torchrun every process parses the same arguments and reads the same files, so a config, data or
    registry error at start is the same on each rank of a node: local rank 0 says it, the other local ranks exit
    with status 1 quietly (8 copies of one line on an 8-GPU node otherwise). Per node, not per job: a file missing
    on one node only is still reported by that node. Errors raised while training (a rank's own share of the data)
    are printed by every rank (see `_fail`)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ.get("LOCAL_RANK") or 0) != 0
    except ValueError:
        return False


def _quiet_exit() -> SystemExit:
    """Exit status 1 without a message, a few seconds late: torchrun stops the other processes as soon as one
    fails, and local rank 0, which fails the same way, must get to print the message first."""
    import time

    time.sleep(5.0)
    return SystemExit(1)


def _load(args: list[str]):
    from .config import ConfigError, load_config

    config, overrides = _split(args)
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise (_quiet_exit() if _another_rank_says_it() else SystemExit(f"imagerl: config error: {e}")) from None


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix (bad data, config, checkpoint or reward setup; each message names the
    field or file and the fix): the commands print them as one line instead of a traceback. DataError and
    CheckpointError are ValueErrors; RegistryError (an unknown model.family, algorithm.advantage, reward type or
    'module:Class' that does not import) is a KeyError."""
    from .recipes.grpo import TrainingError
    from .registry import RegistryError
    from .rewards.base import RewardError

    return (TrainingError, RewardError, RegistryError, ValueError, OSError)


def _fail(e: BaseException, what: str = "imagerl", at_start: bool = False) -> SystemExit:
    """The one line a user error ends with. Builtin ValueError / OSError / KeyError may also come from a bug (in a
    custom reward, say): those lines say how to get the traceback, which IMAGERL_DEBUG=1 prints above the line.
    `at_start`: raised while setting up, where config, data and registry errors are the same on every rank."""
    from .checkpoint import CheckpointError, RunDirInUse
    from .config import ConfigError
    from .data.prompts import DataError
    from .recipes.grpo import TrainingError
    from .registry import RegistryError
    from .rewards.base import RewardError

    debug = os.environ.get("IMAGERL_DEBUG", "") not in ("", "0")
    if debug:
        import traceback

        traceback.print_exception(e)
    ours = isinstance(e, (TrainingError, RewardError, RegistryError, ConfigError, DataError, CheckpointError, RunDirInUse))
    hint = "" if ours or debug else " (IMAGERL_DEBUG=1 prints the traceback)"
    if at_start and isinstance(e, (ConfigError, DataError, RegistryError)) and _another_rank_says_it() and not debug:
        return _quiet_exit()
    return SystemExit(f"{what}: {type(e).__name__}: {e}{hint}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, Slurm, Kubernetes, docker stop): handled as Ctrl-C is, so that the logging backends
    flush (W&B buffers whole steps), the reward curve is drawn and the terminal's cursor comes back."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def cmd_train(args: list[str]) -> int:
    cfg = _load(args)
    import signal

    from .recipes.grpo import GRPOTrainer

    _quiet_deepspeed_on_cpu()
    signal.signal(signal.SIGTERM, _on_sigterm)  # (every rank: torchrun passes SIGTERM on to its workers)
    trainer = None
    try:
        trainer = GRPOTrainer(cfg)
        result = trainer.train()  # (closes the trainer, and with it the process group, however it ends)
    except _user_errors() as e:
        raise _fail(e, at_start=trainer is None) from None
    except KeyboardInterrupt as e:
        # Ctrl-C, SIGTERM (or torchrun passing them on): say what is kept and how to go on, not a traceback
        from .checkpoint import latest_checkpoint

        ck = latest_checkpoint(Path(cfg.run.output_dir) / "checkpoints")
        term = isinstance(e, _Terminated)
        if int(os.environ.get("RANK", "0")) == 0:
            kept = (f"the last checkpoint is {ck}; run the same command to resume from it (the steps after it are "
                    "redone, with the same numbers)") if ck else "no checkpoint was written yet; the run starts over"
            print(f"\nimagerl: {'terminated (SIGTERM)' if term else 'interrupted'}; {kept}", file=sys.stderr)
        raise SystemExit(143 if term else 130) from None
    if int(os.environ.get("RANK", "0")) == 0:
        paths = result.get("paths") or {}
        out = cfg.run.output_dir
        print(f"\nDone. Output in {out}/")
        for k in ("metrics", "reward_curve", "samples"):
            if k in paths and os.path.exists(paths[k]):  # (no samples/ with logging.sample_every=0)
                print(f"  {k:13s} {paths[k]}")
        if os.path.isdir(f"{out}/checkpoints"):  # (none with checkpoint.every=0 and save_final=false)
            print(f"  {'checkpoints':13s} {out}/checkpoints")
        print(f"  {'config':13s} {out}/config.yaml")
    return 0


def _take_all(args: list[str], flag: str) -> tuple[list[str], list[str]]:
    """Every `--flag VALUE` / `--flag=VALUE` out of args -> (values, remaining args)."""
    out, values, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == flag:
            if i + 1 >= len(args):
                raise SystemExit(f"imagerl: {flag} needs a value")
            values.append(args[i + 1])
            i += 2
            continue
        if a.startswith(flag + "="):
            values.append(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    return values, out


def _take_flag(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """`--flag VALUE` or `--flag=VALUE` out of args -> (the last value or None, remaining args)."""
    values, out = _take_all(args, flag)
    return (values[-1] if values else None), out


def _take_switch(args: list[str], flag: str) -> tuple[bool, list[str]]:
    return flag in args, [a for a in args if a != flag]


def _trained_policy(args: list[str], base: bool = False):
    """The run's policy with its latest checkpoint loaded (no run files written); `base`: the initial weights,
    no checkpoint needed.

    Without a CONFIG, `run.output_dir=DIR` is enough: the run's own resolved DIR/config.yaml is used. With
    optim.ema_decay > 0 the commands use the EMA of the weights; `--no-ema` uses the trained weights instead."""
    no_ema, args = _take_switch(args, "--no-ema")
    config, overrides = _split(args)
    if config is None:
        out = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir=")), None)
        if out and (Path(out) / "config.yaml").exists():
            args = [str(Path(out) / "config.yaml"), *overrides]
        elif out and (Path(out) / "checkpoints").is_dir():
            # (the built-in demo's settings were used instead, silently: other prompts, or a model that does not fit)
            raise SystemExit(f"imagerl {_command}: {Path(out) / 'config.yaml'} is missing: it holds the run's settings "
                             f"(model, rewards, prompts); pass the run's CONFIG: imagerl {_command} CONFIG run.output_dir={out}")
    # a run trained with run.resume=false keeps that in its config.yaml: the commands still read its checkpoint
    cfg = _load([*args, "run.resume=false"] if base else [*args, "run.resume=true"])
    _quiet_deepspeed_on_cpu()
    from .checkpoint import latest_checkpoint
    from .recipes.grpo import GRPOTrainer

    ckpt_dir = Path(cfg.run.output_dir) / "checkpoints"
    ck = None if base else latest_checkpoint(ckpt_dir)
    if ck is None and not base:
        raise SystemExit(
            f"imagerl: no checkpoint in {ckpt_dir}: train first (imagerl train ...) or point run.output_dir= at a run"
            + (", or sample the initial weights with --base" if _command == "sample" else "")
        )
    try:
        trainer = GRPOTrainer(cfg, training=False)
    except _user_errors() as e:
        raise _fail(e) from None
    if trainer._resume_note and trainer.dist.is_main:  # (e.g. another lora.alpha than the checkpoint's, as train says it)
        print(trainer._resume_note, file=sys.stderr)
    if no_ema:
        trainer.ema = None  # (eval_weights then gives the trained weights)
    # the checkpoint the trainer loaded: a run still training may have written a newer one since the check above
    return cfg, trainer, None if base else trainer.resumed_from


def _weights_tag(cfg, trainer, ck) -> str:
    """checkpoint name, or "base"; "_no_ema" when a run that keeps an EMA is read without it (--no-ema, or an
    optim.ema_decay=0 override on a checkpoint that holds one: its files must not replace the EMA's)."""
    keeps = cfg.optim.ema_decay > 0 or (ck is not None and (ck / "ema").is_dir())
    return (ck.name if ck is not None else "base") + ("_no_ema" if keeps and trainer.ema is None else "")


def cmd_eval(args: list[str]) -> int:
    cfg, trainer, ck = _trained_policy(args)
    from .logging import make_sample_grid

    # under torchrun the prompts are split over the processes (eval_rollout); rank 0 writes and prints. Whether it can
    # write is checked first, by every rank (one that stopped alone would leave the others waiting in a collective)
    try:
        out = _make_dir(Path(cfg.run.output_dir) / "eval", "run.output_dir")
    except SystemExit:
        trainer.close()
        raise
    try:
        metrics, ro, total = trainer.eval_rollout()
        # the grid shows the first round of every process (each rolled out its share of the round's prompts), so it
        # is the one a single process draws
        from . import dist

        # (only the images the grid shows, the round's first 64, in rank order, as uint8: a rank's share of a
        # large round would otherwise be copied to every process)
        import torch

        keep = max(0, min(len(ro), 64 - trainer.dist.rank * len(ro)))
        mine = ((ro.images[:keep].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu(), list(ro.prompts[:keep]),
                ro.group_ids[:keep].cpu(), total[:keep].cpu())
        parts = dist.gather_objects(mine, trainer.dist)
        images = torch.cat([p[0] for p in parts]).float() / 255
        prompts = [x for p in parts for x in p[1]]
        group_ids, total = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
    except _user_errors() as e:  # (a reward server that is down, say: one line, as train prints it)
        raise _fail(e) from None
    finally:
        trainer.close()
    if not trainer.dist.is_main:
        return 0
    tag = _weights_tag(cfg, trainer, ck)
    grid = make_sample_grid(images, prompts, total, group_ids, max_images=min(len(images), 64),
                            title=f"eval of {tag} (deterministic sampling)")
    try:
        grid.save(out / f"{tag}.png")
        # strict JSON: a mean over no scored sample (every reward abstained) is null, not NaN
        (out / f"{tag}.json").write_text(json.dumps({"checkpoint": str(ck), "ema": trainer.ema is not None,
                                                    **{k: _num(v) for k, v in metrics.items()}}, indent=1, allow_nan=False))
    except OSError as e:  # (a full disk, say)
        raise SystemExit(f"imagerl eval: cannot write {out} ({e.strerror or e})") from None
    for k, v in metrics.items():
        print(f"{k}: {v:.0f}" if k == "eval/prompts" else f"{k}: {v:.4f}")
    print(f"samples: {out / f'{tag}.png'} (the first {min(len(images), 64)} images)\nmetrics: {out / f'{tag}.json'}")
    return 0


SAMPLE_USAGE = ("imagerl sample [CONFIG] [key=value ...] (--prompt TEXT [--prompt TEXT ...] | --prompts FILE [--prompt-field prompt]) [--n 4 | --images 4] "
                "[--seed 0] [--out DIR] [--base] [--deterministic] [--no-score] [--no-ema]")


def cmd_sample(args: list[str]) -> int:
    """Images for your own prompts from the latest checkpoint (or the initial weights with --base), each saved
    as a PNG with a line in samples.jsonl (prompt, file, rewards under the run's reward config), plus captioned
    grids. The training sampler is used (rollout.* settings), seeded by --seed; --deterministic uses the
    evaluation sampler. Prompts go through the policy in chunks of data.prompts_per_step."""
    texts, args = _take_all(args, "--prompt")
    prompt_file, args = _take_flag(args, "--prompts")
    prompt_field, args = _take_flag(args, "--prompt-field")
    n_s, args = _take_flag(args, "--n")
    # --images is the same option under a name torchrun lets through: torchrun's own argparse reads every argument,
    # also those after the script, and stops at `--n` as an ambiguous prefix of its --nnodes/--nproc-per-node
    images_s, args = _take_flag(args, "--images")
    if n_s is not None and images_s is not None:
        raise SystemExit("imagerl sample: --n and --images are the same option (images per prompt); give one")
    n_s = n_s if n_s is not None else images_s
    seed_s, args = _take_flag(args, "--seed")
    dest, args = _take_flag(args, "--out")
    base, args = _take_switch(args, "--base")
    deterministic, args = _take_switch(args, "--deterministic")
    no_score, args = _take_switch(args, "--no-score")
    if bool(texts) == bool(prompt_file):
        how = "not both" if texts else "one of them"
        raise SystemExit(f"imagerl sample: give prompts with --prompt TEXT (repeatable) or --prompts FILE, {how}; usage: {SAMPLE_USAGE}")
    try:
        n, seed = int(n_s or 4), int(seed_s or 0)
    except ValueError:
        raise SystemExit(f"imagerl sample: --n and --seed take integers (got --n {n_s!r}, --seed {seed_s!r})") from None
    if n < 1:
        raise SystemExit(f"imagerl sample: --n {n} must be >= 1 (images per prompt)")
    from .data.prompts import DataError, PromptDataset, load_rows, make_batch

    try:
        rows = [{"prompt": t} for t in texts] if texts else load_rows(prompt_file, prompt_field or "prompt", "--prompts",
                                                                          field_fix="Pass --prompt-field <name>")
        # (an editing prompt file's "image" column: source images, relative to the file, as in training)
        source = PromptDataset("prompts", rows, image_field="" if texts else "image", field_name="--prompts",
                               base_dir=None if texts else Path(prompt_file).expanduser().parent)
        source.check_images()
    except DataError as e:
        raise SystemExit(f"imagerl sample: {e}") from None
    cfg, trainer, ck = _trained_policy(args, base=base)
    import torch

    from .imageio import to_pil
    from .logging import make_sample_grid
    from .recipes.grpo import SAMPLE, seeded_generator
    from .rewards.base import RewardError
    from .types import RewardInput

    tag = _weights_tag(cfg, trainer, ck)
    # under torchrun every process samples the same prompts (FSDP2 ranks must run the same forwards); rank 0 writes
    write = trainer.dist.is_main
    out = Path(dest) if dest else Path(cfg.run.output_dir) / "sample" / tag
    if write:
        _make_dir(out, "--out" if dest else "run.output_dir")
        # a previous sample call's images and grids would otherwise stay next to this call's samples.jsonl
        for f in out.glob("*.png"):
            if re.fullmatch(r"\d{4}_\d+\.png|grid_\d{3}\.png", f.name):
                f.unlink()
    chunk = max(1, cfg.data.prompts_per_step)
    lines = []
    for c, start in enumerate(range(0, len(rows), chunk)):
        part = rows[start:start + chunk]
        batch = make_batch([(source, r) for r in part])
        try:
            ro = trainer.sample(batch, n, seeded_generator(seed, c, 0, SAMPLE), eval_mode=deterministic)
        except _user_errors() as e:
            trainer.close()
            raise _fail(e, "imagerl sample") from None
        scores, names, total = None, [], torch.full((len(ro),), float("nan"))
        if not no_score:
            try:
                table = trainer.scorer.score(RewardInput.from_rollout(ro))
            except RewardError as e:
                raise SystemExit(f"imagerl sample: scoring failed ({e}); fix the reward or pass --no-score") from None
            scores, names, total = table.scores, table.names, _per_prompt_totals(table, cfg.scoring.fallback)
        for i in range(len(ro)):
            p_idx, j = start + i // n, i % n
            name = f"{p_idx:04d}_{j}.png"
            if write:
                to_pil(ro.images[i]).save(out / name)
            line = {"file": name, "prompt": ro.prompts[i], "sample": j, "checkpoint": str(ck) if ck else "base",
                    "ema": trainer.ema is not None, "seed": seed, "deterministic": deterministic}
            if scores is not None:
                line["reward"] = _num(total[i])
                line["rewards"] = {nm: _num(scores[i, k]) for k, nm in enumerate(names)}
            lines.append(line)
        if write:
            grid = make_sample_grid(ro.images, ro.prompts, total, ro.group_ids, max_images=min(len(ro), 64),
                                    title=f"{tag}: {'deterministic' if deterministic else f'seed {seed}'}")
            grid.save(out / f"grid_{c:03d}.png")
    trainer.close()
    if not write:
        return 0
    (out / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"{len(lines)} images ({len(rows)} prompt{'s' if len(rows) != 1 else ''} x {n}) from {tag} in {out}/ "
          "(samples.jsonl, grid_*.png)")
    return 0


def _per_prompt_totals(table, fallback: float | None) -> torch.Tensor:
    """Each image's weighted total reward for `imagerl sample`, from its own prompt's images only (the training rule
    imputes a reward that said nothing about a whole prompt with the batch's mean, which here would make an image's
    number depend on the other prompts on the command line): a reward that abstained on an image counts as its mean
    over the prompt's images it scored; where it scored none of them, the total is null."""
    import torch

    from .algorithms.advantages import combined_reward

    s = table.scores if fallback is None else torch.nan_to_num(table.scores, nan=fallback)
    out = torch.full((s.shape[0],), float("nan"))
    gids = table.group_ids if table.group_ids is not None else torch.zeros(s.shape[0], dtype=torch.long)
    for g in torch.unique(gids):
        rows = (gids == g).nonzero().reshape(-1)
        sub, w = s[rows], table.weights[rows]
        if (torch.isnan(sub).all(0) & (w != 0).any(0)).any():
            continue  # (a weighted reward with no score for this prompt: the total is unknown; a weight-0 one is not in it)
        out[rows] = combined_reward(sub, w, None)
    return out


def _num(x) -> float | None:
    """A score for JSON: NaN (an abstaining reward) becomes null."""
    v = float(x)
    return None if v != v else v


def cmd_export(args: list[str]) -> int:
    dest, args = _take_flag(args, "--to")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(1)  # (rank 0 says why)
        raise SystemExit("imagerl export: run it as one process, without torchrun / accelerate launch: checkpoints hold "
                         "whole weights (gathered when written), so one process reads and exports them")
    cfg, trainer, ck = _trained_policy(args)
    # (by default one folder per checkpoint and weights kind, as eval and sample name theirs: --no-ema next to the EMA
    # export used to overwrite it)
    tag = _weights_tag(cfg, trainer, ck)
    target = _make_dir(Path(dest), "--to") if dest else _make_dir(Path(cfg.run.output_dir) / "export" / tag, "run.output_dir")
    try:
        with trainer.eval_weights():  # the EMA of the weights when the run kept one
            trainer.policy.save_pretrained(str(target))
    except _user_errors() as e:  # (a full disk, say)
        raise _fail(e, "imagerl export") from None
    except Exception as e:  # (safetensors' own write error on a full or read-only disk is no OSError)
        if type(e).__name__ != "SafetensorError":
            raise
        raise SystemExit(f"imagerl export: cannot write {target} ({e})") from None
    finally:
        trainer.close()
    ema = " (its EMA weights)" if trainer.ema is not None else ""
    print(f"exported {ck.name}{ema} of {cfg.model.family} to {target} (loadable by the family's own library)")
    return 0


def cmd_print_config(args: list[str]) -> int:
    from .config import to_yaml

    print(to_yaml(_load(args)), end="")
    return 0


def cmd_serve_reward(args: list[str]) -> int:
    from .serve import main as serve_main

    config, overrides = _split(args)
    if config is None:
        raise SystemExit("imagerl serve-reward: give a CONFIG (e.g. configs/reward_server_demo.yaml)")
    return int(serve_main(config, overrides) or 0)


COMMANDS = {
    "train": (cmd_train, "train a policy: imagerl train [CONFIG] [key=value ...] (no CONFIG = the built-in demo)"),
    "eval": (cmd_eval, "evaluate the latest checkpoint deterministically: imagerl eval [CONFIG] [key=value ...] [--no-ema]"),
    "sample": (cmd_sample, "images for your prompts from the latest checkpoint: " + SAMPLE_USAGE[len("imagerl sample "):]),
    "export": (cmd_export, "save the trained model for its own library: imagerl export [CONFIG] [key=value ...] [--to DIR] [--no-ema] "
                           "(default DIR: run.output_dir/export/<checkpoint>[_no_ema])"),
    "print-config": (cmd_print_config, "print the resolved config: imagerl print-config [CONFIG] [key=value ...]"),
    "serve-reward": (cmd_serve_reward, "serve rewards over HTTP: imagerl serve-reward CONFIG [key=value ...]"),
}


def _quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, where installed, is imported by accelerate inside transformers' save_pretrained (and by our ZeRO
    engine), and on a machine without an accelerator it logs a WARNING, 'Setting accelerator to CPU. If you have
    GPU or other accelerator, we were unable to detect it.', on every export. Called by the commands that build a
    trainer (print-config imports no torch). When torch sees no accelerator,
    naming the CPU for DeepSpeed (DS_ACCELERATOR, its own setting, unless the user set it) is the same choice
    without the warning."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    acc = getattr(torch, "accelerator", None)
    if torch.cuda.is_available() or (acc is not None and acc.is_available()):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="imagerl",
        description="RL post-training (GRPO family) of image generators.",
        epilog="\n".join(f"  {k:14s} {v[1]}" for k, v in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to do")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command '{argv[0]}'")
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(f"imagerl {argv[0]}: {COMMANDS[argv[0]][1]}\n\n"
              "CONFIG: a .yaml or .jsonnet file, or a bundled recipe by name (demo, demo_flow, janus_pro_t2i_grpo, ...).\n"
              "key=value: any config key (e.g. train.steps=10 model.tiny=true); `imagerl print-config [CONFIG]` shows\n"
              "them all with their values, docs/config.md describes them.")
        return 0
    global _command
    _command = argv[0]
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except KeyboardInterrupt:
        print(f"\nimagerl {argv[0]}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
