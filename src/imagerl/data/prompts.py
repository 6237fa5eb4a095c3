"""Prompt datasets and the seeded, resumable, group-aware prompt sampler.

Files: .txt (one prompt a line, blank lines and '#' comments skipped), .jsonl (a prompt field plus any
metadata kept for rewards), .csv and .parquet (a prompt column; the other columns become metadata).
Built-ins: ``builtin:color_shapes`` ("a red square on the left", metadata {color, shape, position}) and
``builtin:colors`` (a smaller set for the CPU demo).

Sampling: every step draws B prompts for the whole job (all ranks draw the same global batch from the same
seed, then each rank takes its slice), so the data a run sees does not depend on the number of processes.
A mixture picks the dataset of each prompt by weight; within a dataset prompts are drawn without
replacement in seeded epochs. The sampler state (per-dataset epoch and position, draw counter) is saved in
checkpoints so a resumed run sees the same prompts.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..registry import did_you_mean
from ..tiny import COLORS, POSITIONS, SHAPES
from ..types import PromptBatch

log = logging.getLogger(__name__)


class DataError(ValueError):
    pass


@dataclass
class PromptDataset:
    name: str
    rows: list[dict[str, Any]]  # each has "prompt" and metadata
    weight: float = 1.0
    reward_weights: dict[str, float] = field(default_factory=dict)
    # editing data: the column of a row's source image (a path, relative to the data file's folder) -> the row's
    # PromptBatch.source_images entry; rows without one (or image_field "") have none
    image_field: str = ""
    base_dir: Path | None = None
    field_name: str = "data.datasets[0]"

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, row: dict[str, Any]) -> Path | None:
        v = row.get(self.image_field) if self.image_field else None
        if v is None or (isinstance(v, float) and v != v) or not str(v).strip():
            return None
        return data_path(v, self.base_dir)

    def source_image(self, row: dict[str, Any]) -> Any:
        """The row's source image (PIL RGB, as displayed), or None."""
        from ..imageio import load_pil

        p = self.image_path(row)
        return None if p is None else load_pil(p, f"{self.field_name}.image_field")

    def check_images(self) -> None:
        """Every referenced source image exists: a missing file fails at start, not at the step that draws it."""
        for i, row in enumerate(self.rows):
            p = self.image_path(row)
            if p is not None and not p.is_file():
                raise DataError(f"{self.field_name}: row {i} names source image '{p}' (column '{self.image_field}'), "
                                f"which does not exist; fix the path, or set image_field: '' for text-to-image data")


def data_path(value: Any, base_dir: Path | None) -> Path:
    """A path written in a data file: ~ expanded, and relative ones relative to the data file's folder."""
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


def make_batch(picked: list[tuple[PromptDataset, dict[str, Any]]]) -> PromptBatch:
    """A PromptBatch of (dataset, row) pairs: prompts, metadata (the other fields), dataset names and, where any row
    has one, source images (None for the rows without)."""
    sources = [ds.source_image(row) for ds, row in picked]
    return PromptBatch(prompts=[row["prompt"] for _, row in picked],
                       metadata=[{k: v for k, v in row.items() if k != "prompt"} for _, row in picked],
                       source_images=sources if any(s is not None for s in sources) else None,
                       dataset_names=[ds.name for ds, _ in picked])


def builtin_dataset(name: str, field_name: str = "data.datasets[0].path") -> list[dict[str, Any]]:
    if name == "color_shapes":
        return [
            {"prompt": f"a {c} {s} on the {p}", "color": c, "shape": s, "position": p}
            for c in COLORS for s in SHAPES for p in POSITIONS
        ]
    if name == "colors":
        # small and clearly separable: what a tiny model can learn on 2 CPU cores in minutes
        return [
            {"prompt": f"a {c} square on the {p}", "color": c, "shape": "square", "position": p}
            for c in ("red", "green", "blue", "yellow") for p in ("left", "right")
        ]
    known = ["color_shapes", "colors"]
    raise DataError(f"{field_name}: unknown built-in dataset 'builtin:{name}'.{did_you_mean(name, known, 'builtin:')} "
                    f"Available: {', '.join('builtin:' + k for k in known)}")


def load_rows(path: str, prompt_field: str = "prompt", field_name: str = "data.datasets[0].path",
              field_fix: str = "Set prompt_field: <name> on the dataset") -> list[dict[str, Any]]:
    """The rows of a prompt file (see the module docstring). `field_fix`: how the caller's user names another prompt
    column, for the error when a row lacks `prompt_field`."""
    if path.startswith("builtin:"):
        return builtin_dataset(path.split(":", 1)[1], field_name)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{field_name}: prompt file '{path}' does not exist (cwd: {Path.cwd()}). Fix the path.")
    if p.is_dir():
        raise DataError(f"{field_name}: '{path}' is a directory; give a .txt/.jsonl/.csv/.parquet file")
    suffix = p.suffix.lower()
    rows: list[dict[str, Any]]
    try:
        if suffix == ".txt":
            rows = []
            # (-sig: drops a BOM, as Notepad writes; split at newlines only: str.splitlines() would also cut a prompt at
            # U+2028, U+0085 or a form feed inside it)
            for line in _lines(p.read_text(encoding="utf-8-sig")):
                line = line.strip()
                if line and not line.startswith("#"):
                    rows.append({"prompt": line})
        elif suffix == ".jsonl":
            rows = []
            for i, line in enumerate(_lines(p.read_text(encoding="utf-8-sig")), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{field_name}: {path} line {i} is not valid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{field_name}: {path} line {i} must be a JSON object with a '{prompt_field}' field")
                rows.append(_take_prompt(obj, prompt_field, f"line {i}", path, field_name, field_fix))
        elif suffix == ".csv":
            with p.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                dup = sorted({h for h in header if h and header.count(h) > 1})  # (Excel's trailing empty columns: fine)
                if dup:  # (DictReader keeps the last of two same-named columns, silently)
                    raise DataError(f"{field_name}: {path} has the column name(s) {dup} more than once in its header; "
                                    "give every column its own name")
                rows = []
                for r in reader:  # (the row's line in the file, where it ends: quoted newlines and blank lines count)
                    where = f"line {reader.line_num}"
                    rows.append(_take_prompt(_csv_row(r, where, path, field_name), prompt_field, where, path,
                                             field_name, field_fix))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(p).to_pylist()
            rows = [_take_prompt(r, prompt_field, f"row {i}", path, field_name, field_fix) for i, r in enumerate(table, 1)]
        else:
            raise DataError(f"{field_name}: '{path}' has unknown extension '{suffix}'; use .txt, .jsonl, .csv or .parquet")
    except UnicodeDecodeError as e:
        raise DataError(f"{field_name}: {path} is not UTF-8 text: {e}") from None
    except DataError:
        raise
    except Exception as e:  # pyarrow / csv errors on corrupt files
        raise DataError(f"{field_name}: cannot read {path}: {e}") from e
    kept = [r for r in rows if "prompt" in r]
    if len(kept) < len(rows):
        first = next(r["_where"] for r in rows if "prompt" not in r)
        log.warning("%s: %s: skipped %d of %d rows whose '%s' is empty or null (the first at %s)",
                    field_name, path, len(rows) - len(kept), len(rows), prompt_field, first)
    if rows and not kept:
        raise DataError(f"{field_name}: every one of the {len(rows)} rows of '{path}' has an empty or null "
                        f"'{prompt_field}'; fill them in, or point prompt_field: at the column that holds the prompts")
    if not kept:
        raise DataError(f"{field_name}: prompt file '{path}' is empty (no prompts found). Add prompts or fix the path.")
    return kept


def _lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n")]


def _csv_row(r: dict[Any, Any], where: str, path: str, field_name: str) -> dict[str, Any]:
    """A csv.DictReader row, checked: more cells than the header (an unquoted comma inside a prompt) shifts every
    later field, fewer leaves the rest None; both are errors naming the row. An empty cell is a missing value (None),
    as a parquet null is, so rewards fall back to the prompt instead of checking an empty string."""
    if None in r or any(v is None for v in r.values()):
        n_header = len([k for k in r if k is not None])
        n_cells = n_header - sum(v is None for k, v in r.items() if k is not None) + len(r.get(None) or [])
        raise DataError(f"{field_name}: {path} {where} has {n_cells} cells for {n_header} columns; quote fields that "
                        f"contain commas (\"a sign that says \"\"OPEN\"\", above a door\")")
    return {k: (None if v == "" else v) for k, v in r.items()}


def _take_prompt(obj: dict[str, Any], prompt_field: str, where: str, path: str, field_name: str,
                 field_fix: str) -> dict[str, Any]:
    """The row with its prompt under 'prompt' (other fields kept as metadata for rewards). A row whose prompt is
    empty or null (a missing caption) comes back as {"_where": where}, to be skipped by the caller rather than
    trained on as the text 'None'."""
    if prompt_field not in obj:
        raise DataError(
            f"{field_name}: {path} {where} has no '{prompt_field}' field (fields: {', '.join(map(str, obj))}). "
            f"{field_fix}."
        )
    text = obj[prompt_field]
    if text is None or (isinstance(text, float) and text != text) or (isinstance(text, str) and not text.strip()) \
            or text == []:
        return {"_where": where}
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):  # (str() made "['a', 'b']" a prompt)
        raise DataError(f"{field_name}: {path} {where} has a {type(text).__name__} as its '{prompt_field}' "
                        f"({str(text)[:60]}); each row's prompt must be one string")
    out = {k: v for k, v in obj.items() if k != prompt_field}
    out["prompt"] = str(text).strip()
    return out


def load_datasets(specs: list[Any], section: str = "data.datasets") -> list[PromptDataset]:
    out = []
    for i, s in enumerate(specs):
        rows = load_rows(s.path, s.prompt_field, f"{section}[{i}].path")
        if s.limit:
            rows = rows[: s.limit]
        name = s.name or (s.path.split(":", 1)[1] if s.path.startswith("builtin:") else Path(s.path).stem)
        builtin = s.path.startswith("builtin:")
        ds = PromptDataset(name=name, rows=rows, weight=s.weight, reward_weights=dict(s.reward_weights),
                           image_field="" if builtin else s.image_field,
                           base_dir=None if builtin else Path(s.path).expanduser().parent, field_name=f"{section}[{i}]")
        ds.check_images()
        out.append(ds)
    return out


def _mixed_seed(*keys: int) -> int:
    """A 64-bit seed hashed from the keys (numpy's SeedSequence): neighbouring run seeds give unrelated streams.
    (A linear mix such as seed * 31 + draws made seed 1's mixture choices seed 0's shifted by 31 draws.)"""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


class PromptSampler:
    """Seeded mixture sampler with resumable state. `next_batch(B)` is identical on every rank."""

    def __init__(self, datasets: list[PromptDataset], seed: int):
        self.datasets = datasets
        self.seed = seed
        self.state: dict[str, Any] = {"draws": 0, "epoch": [0] * len(datasets), "pos": [0] * len(datasets)}
        self._perm_cache: dict[int, tuple[int, torch.Tensor]] = {}  # dataset -> (epoch, its permutation)

    def _perm(self, d: int, epoch: int) -> torch.Tensor:
        cached = self._perm_cache.get(d)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(_mixed_seed(self.seed, 1, d, epoch))
            cached = (epoch, torch.randperm(len(self.datasets[d]), generator=g))
            self._perm_cache[d] = cached
        return cached[1]

    def _pick_dataset(self) -> int:
        if len(self.datasets) == 1:
            return 0
        g = torch.Generator().manual_seed(_mixed_seed(self.seed, 2, self.state["draws"]))
        w = torch.tensor([d.weight for d in self.datasets], dtype=torch.float64)
        return int(torch.multinomial(w / w.sum(), 1, generator=g))

    def next_batch(self, batch_size: int) -> tuple[PromptBatch, list[dict[str, float]]]:
        picked, rweights = [], []
        for _ in range(batch_size):
            d = self._pick_dataset()
            self.state["draws"] += 1
            ds = self.datasets[d]
            if self.state["pos"][d] >= len(ds):
                self.state["epoch"][d] += 1
                self.state["pos"][d] = 0
            row = ds.rows[int(self._perm(d, self.state["epoch"][d])[self.state["pos"][d]])]
            self.state["pos"][d] += 1
            picked.append((ds, row))
            rweights.append(ds.reward_weights)
        return make_batch(picked), rweights

    def state_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.state))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("pos", [])) != len(self.datasets):
            raise ValueError("sampler state in the checkpoint was written for a different number of datasets")
        self.state = json.loads(json.dumps(state))


def slice_for_rank(batch: PromptBatch, weights: list[dict[str, float]], rank: int, world: int) -> tuple[PromptBatch, list[dict[str, float]], int]:
    """Contiguous slice of the global prompt batch for this rank; returns the slice and its first global index."""
    B = len(batch)
    if B % world:
        raise ValueError(f"data.prompts_per_step={B} must be divisible by the number of processes ({world})")
    per = B // world
    lo, hi = rank * per, (rank + 1) * per
    return (
        PromptBatch(
            prompts=batch.prompts[lo:hi],
            metadata=batch.metadata[lo:hi],
            source_images=batch.source_images[lo:hi] if batch.source_images else None,
            dataset_names=batch.dataset_names[lo:hi] if batch.dataset_names else None,
        ),
        weights[lo:hi],
        lo,
    )
