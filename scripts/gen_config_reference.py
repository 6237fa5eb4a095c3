"""Write docs/config.md from the typed schema in src/imagerl/config.py (defaults + the inline comments).

Run `python scripts/gen_config_reference.py` after changing the schema; tests/unit/test_docs.py fails when the
file is stale, so the reference can never drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from imagerl import config as C  # noqa: E402

SECTIONS = {f.name: f for f in dataclasses.fields(C.Config)}


def comments() -> dict[tuple[str, str], str]:
    """(ClassName, field) -> trailing comment text, read from the source."""
    src = (ROOT / "src/imagerl/config.py").read_text().splitlines()
    tree = ast.parse("\n".join(src))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    line = src[stmt.lineno - 1]
                    text = line.split("#", 1)[1].strip() if "#" in line else ""
                    out[(node.name, stmt.target.id)] = text.replace("|", "\\|")
    return out


def fmt(v) -> str:
    """A default as it is written in YAML or an override (true / null / [a, b], not Python's True / None)."""
    if dataclasses.is_dataclass(v):
        return "(section)"
    return json.dumps(v, ensure_ascii=False).replace("|", "\\|")


def render() -> str:
    com = comments()
    lines = [
        "# Config reference",
        "",
        "Generated from `src/imagerl/config.py` by `scripts/gen_config_reference.py`; do not edit by hand.",
        "Every key can be set in the YAML file or overridden as `key=value` (`imagerl train CONFIG train.steps=20`).",
        "Lists of sections (`rewards`, `data.datasets`) are indexed: `rewards.0.weight=2`; the index after the last adds",
        "an entry, which must name its `type` (rewards) or `path` (datasets): `rewards.1.type=brightness`.",
        "Values can read environment variables: `${oc.env:NAME}` or `${oc.env:NAME,default}`.",
        "A top-level `base:` names configs to start from (a bundled recipe or a path relative to the file; a list merges",
        "in order): mappings merge key by key, lists (`rewards`, `data.datasets`) are replaced whole.",
        "At the top level of a file, dotted keys work as in overrides (`train.steps: 5`).",
        "The `rollout` section serves every family: Janus reads temperature / top_k / top_p / cuda_graph, flow models",
        "read the SDE settings (num_steps, sde, noise_level, sde_window*, shared_noise, timestep_shift, cfg_in_training,",
        "eval_num_steps, algorithm.timestep_fraction, algorithm.log_prob). A training run that changes one its family does not read prints",
        "a `note:` line naming it; a KL estimator the family cannot compute (mean / velocity on Janus) is an error.",
        "",
    ]
    root = C.Config()
    for name in SECTIONS:
        val = getattr(root, name)
        elem = val[0] if isinstance(val, list) and val else val
        cls = type(elem)
        title = f"`{name}`" + (" (a list of entries)" if isinstance(val, list) else "")
        lines += [f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            d = getattr(elem, f.name)
            if dataclasses.is_dataclass(d):
                for g in dataclasses.fields(d):
                    lines.append(f"| `{name}.{f.name}.{g.name}` | `{fmt(getattr(d, g.name))}` | {com.get((type(d).__name__, g.name), '')} |")
                continue
            if isinstance(d, list) and d and dataclasses.is_dataclass(d[0]):
                lines.append(f"| `{name}.{f.name}` | list of {type(d[0]).__name__} | {com.get((cls.__name__, f.name), '')} |")
                for g in dataclasses.fields(d[0]):  # the entries' keys
                    lines.append(f"| `{name}.{f.name}.N.{g.name}` | `{fmt(getattr(d[0], g.name))}` | "
                                 f"{com.get((type(d[0]).__name__, g.name), '')} |")
                continue
            key = f"{name}.N.{f.name}" if isinstance(val, list) else f"{name}.{f.name}"
            lines.append(f"| `{key}` | `{fmt(d)}` | {com.get((cls.__name__, f.name), '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    out = ROOT / "docs" / "config.md"
    out.write_text(render())
    print(f"wrote {out}")
