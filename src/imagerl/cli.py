"""Command line: ``imagerl train | eval | export | print-config | serve-reward``.

``imagerl train`` with no config runs the built-in demo recipe (configs/demo.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """First positional that is not key=value is the config path; the rest are overrides."""
    config = None
    overrides = []
    for a in args:
        if "=" in a and not os.path.exists(a):
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise SystemExit(f"imagerl: unexpected argument '{a}': give one CONFIG and key=value overrides")
    return config, overrides


def _load(args: list[str]):
    from .config import ConfigError, load_config

    config, overrides = _split(args)
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise SystemExit(f"imagerl: config error: {e}") from None


def cmd_train(args: list[str]) -> int:
    cfg = _load(args)
    from .data.prompts import DataError
    from .recipes.grpo import TrainingError, train
    from .rewards.base import RewardError

    try:
        result = train(cfg)
    except (DataError, TrainingError, RewardError, ValueError, OSError) as e:
        raise SystemExit(f"imagerl: {type(e).__name__}: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        paths = result.get("paths") or {}
        out = cfg.run.output_dir
        print(f"\nDone. Output in {out}/")
        for k in ("metrics", "reward_curve", "samples"):
            if k in paths:
                print(f"  {k:13s} {paths[k]}")
        print(f"  {'checkpoints':13s} {out}/checkpoints")
    return 0


def _take_flag(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """`--flag VALUE` or `--flag=VALUE` out of args -> (value or None, remaining args)."""
    out, value, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == flag:
            if i + 1 >= len(args):
                raise SystemExit(f"imagerl: {flag} needs a value")
            value, i = args[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return value, out


def _trained_policy(args: list[str]):
    """The run's policy with its latest checkpoint loaded (no run files written).

    Without a CONFIG, `run.output_dir=DIR` is enough: the run's own resolved DIR/config.yaml is used."""
    config, overrides = _split(args)
    if config is None:
        out = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir=")), None)
        if out and (Path(out) / "config.yaml").exists():
            args = [str(Path(out) / "config.yaml"), *overrides]
    cfg = _load(args)
    from .checkpoint import latest_checkpoint
    from .recipes.grpo import GRPOTrainer
    from .rewards.base import RewardError

    ckpt_dir = Path(cfg.run.output_dir) / "checkpoints"
    ck = latest_checkpoint(ckpt_dir)
    if ck is None:
        raise SystemExit(
            f"imagerl: no checkpoint in {ckpt_dir}: train first (imagerl train ...) or point run.output_dir= at a run"
        )
    try:
        trainer = GRPOTrainer(cfg, training=False)
    except (RewardError, ValueError, OSError) as e:
        raise SystemExit(f"imagerl: {type(e).__name__}: {e}") from None
    return cfg, trainer, ck


def cmd_eval(args: list[str]) -> int:
    cfg, trainer, ck = _trained_policy(args)
    from .logging import make_sample_grid

    metrics, ro, total = trainer.eval_rollout()
    out = Path(cfg.run.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tag = ck.name
    grid = make_sample_grid(ro.images, ro.prompts, total, ro.group_ids, max_images=len(ro),
                            title=f"eval of {tag} (deterministic sampling)")
    grid.save(out / f"{tag}.png")
    (out / f"{tag}.json").write_text(json.dumps({"checkpoint": str(ck), **metrics}, indent=1))
    trainer.close()
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    print(f"samples: {out / f'{tag}.png'}\nmetrics: {out / f'{tag}.json'}")
    return 0


def cmd_export(args: list[str]) -> int:
    dest, args = _take_flag(args, "--to")
    cfg, trainer, ck = _trained_policy(args)
    target = Path(dest) if dest else Path(cfg.run.output_dir) / "export"
    trainer.policy.save_pretrained(str(target))
    trainer.close()
    print(f"exported {ck.name} of {cfg.model.family} to {target} (loadable by the family's own library)")
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
    "eval": (cmd_eval, "evaluate the latest checkpoint deterministically: imagerl eval [CONFIG] [key=value ...]"),
    "export": (cmd_export, "save the trained model for its own library: imagerl export [CONFIG] [key=value ...] [--to DIR]"),
    "print-config": (cmd_print_config, "print the resolved config: imagerl print-config [CONFIG] [key=value ...]"),
    "serve-reward": (cmd_serve_reward, "serve rewards over HTTP: imagerl serve-reward CONFIG [key=value ...]"),
}


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
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
