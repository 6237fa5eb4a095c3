"""Command line: ``imagerl train | print-config | serve-reward | eval``.

``imagerl train`` with no config runs the built-in demo recipe (configs/demo.yaml).
"""

from __future__ import annotations

import argparse
import os
import sys


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
