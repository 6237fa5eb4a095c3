"""The config reference in docs/ is generated from the schema and must not drift from it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gen_config_reference

    assert (ROOT / "docs/config.md").read_text() == gen_config_reference.render(), (
        "docs/config.md is stale: run `python scripts/gen_config_reference.py`"
    )


def test_every_bundled_recipe_validates_with_tiny():
    from imagerl.config import load_config

    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert recipes
    for p in recipes:
        if p.name.startswith("reward_server"):
            continue
        cfg = load_config(p, ["model.tiny=true"])
        assert cfg.train.steps > 0, p


def test_print_config_cli():
    r = subprocess.run([sys.executable, "-m", "imagerl.cli", "print-config", "train.steps=7"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "steps: 7" in r.stdout and "family: janus" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "imagerl.cli", "print-config", "train.stpes=7"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Did you mean 'train.steps'" in bad.stderr
