"""``ocr``: how well the text rendered in an image matches the text the prompt asked for.

Targets are the quoted spans of the prompt (``"..."``, ``'...'``, ``“...”``, ``‘...’``, ``「...」``), or
``metadata["text"]`` (a string or a list of strings) when the dataset provides it. The image is read by
RapidOCR (PP-OCR detection + recognition, ONNX, bundled with the ``rapidocr`` wheel, so it runs offline).
For every target the score is

    max over candidates c of   1 - Levenshtein(target, c) / max(len(target), len(c))

where the candidates are the words read (boxes in reading order, split at spaces) and every contiguous
run of them joined with and without a space, so a target that is part of a box, or split over several
boxes, still matches. Several targets
-> their mean. Whitespace runs are collapsed; case is ignored unless ``case_sensitive``. A prompt without
quoted text abstains (NaN). An image where nothing is read scores 0 (the policy failed to write text).

Departure from Flow-GRPO's OCR reward (PaddleOCR; every box concatenated, spaces removed, lower-cased,
score 1 - min(d, len(target)) / len(target)): we take the best-matching run of boxes instead of all of
them, so unrelated text elsewhere in the image is not charged to the target, and we divide by the longer
string, so extra characters inside the matched run still cost. Spaces count: a target split over boxes
is matched by their space-joined run, and the no-space join covers OCR that splits inside a word.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from typing import Any

import numpy as np
import torch

from ..types import RewardInput, RewardOutput
from .base import Reward

# Quote pairs; the single-quote forms must not be apostrophes ("don't", "cats'"), hence the lookarounds.
_QUOTE_PATTERNS = [
    re.compile(r'"([^"]+)"'),
    re.compile(r"“([^”]+)”"),
    re.compile(r"「([^」]+)」"),
    re.compile(r"‘(.+?)’(?!\w)"),  # (’ is also the typographic apostrophe: ‘Joe’s Diner’ is one span)
    # (an apostrophe between two letters stays inside the span: 'Joe's Diner', 'World's Best Dad'; it made the whole
    # prompt abstain before)
    re.compile(r"(?<![\w'])'((?:[^']|(?<=\w)'(?=\w))+)'(?![\w'])"),
]


def extract_quoted(prompt: str) -> list[str]:
    """Quoted spans of a prompt, in order of appearance (empty or whitespace-only spans skipped)."""
    found: list[tuple[int, str]] = []
    for pat in _QUOTE_PATTERNS:
        for m in pat.finditer(prompt):
            if m.group(1).strip():
                found.append((m.start(), m.group(1)))
    found.sort()
    out: list[str] = []
    last_end = -1
    for start, text in found:  # a span inside an earlier one (e.g. 'x' inside "say 'x'") is not a new target
        if start > last_end:
            out.append(text)
            last_end = start + len(text) + 1
    return out


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each), O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


_QUOTE_FOLD = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "`": "'", "“": '"', "”": '"', "„": '"'})


def normalize(text: str, case_sensitive: bool = False) -> str:
    """NFKC (full-width ＯＰＥＮ -> OPEN), typographic quotes and apostrophes -> ASCII, whitespace runs -> one space,
    and casefold unless case_sensitive: a render of Joe’s Diner that reads JOE'S DINER is a perfect match."""
    t = " ".join(unicodedata.normalize("NFKC", text).translate(_QUOTE_FOLD).split())
    return t if case_sensitive else t.casefold()


def similarity(target: str, candidate: str) -> float:
    """1 - Levenshtein / max(len): 1 for equal strings, 0 for nothing in common; two empty strings -> 1."""
    n = max(len(target), len(candidate))
    return 1.0 if n == 0 else 1.0 - levenshtein(target, candidate) / n


def candidates(words: list[str], max_ngram: int | None = None) -> list[str]:
    """Every contiguous run of words joined with a space and without one (deduplicated, in order).

    The definition `best_match` maximises over; `best_match` itself walks the runs lazily with pruning."""
    out: dict[str, None] = {}
    n = len(words)
    k_max = n if max_ngram is None else min(n, max_ngram)
    for i in range(n):
        for k in range(1, min(k_max, n - i) + 1):
            run = words[i : i + k]
            out[" ".join(run)] = None
            out["".join(run)] = None
    return list(out)


def best_match(target: str, tokens: list[str], *, case_sensitive: bool = False, max_ngram: int | None = None) -> float:
    """max over `candidates(words of tokens)` of `similarity(target, candidate)`; 0 when nothing was read.

    Tokens (recognised boxes) are split into words first, so a target that is one word of a box, or
    spans several boxes, is matched. Runs are walked lazily: Levenshtein >= the length gap, so once even
    the no-space join of a run is too long to beat the best score, longer runs from that start are skipped
    (this keeps text-heavy images cheap)."""
    t = normalize(target, case_sensitive)
    words = [w for x in tokens if x for w in normalize(x, case_sensitive).split()]
    if not words:
        return similarity(t, "")  # 0 unless the target itself is empty
    n = len(words)
    k_max = n if max_ngram is None else min(n, max_ngram)
    best = 0.0
    for i in range(n):
        for k in range(1, min(k_max, n - i) + 1):
            run = words[i : i + k]
            tight = "".join(run)
            if len(tight) > len(t) and 1.0 - (len(tight) - len(t)) / len(tight) <= best:
                break  # the bound only falls as the run grows
            best = max(best, similarity(t, " ".join(run)), similarity(t, tight))
            if best == 1.0:
                return best
    return best


def reading_order(boxes: Any, texts: list[str]) -> list[str]:
    """Sort recognised boxes top-to-bottom, then left-to-right (a line = boxes whose centres are within
    half a box height), so n-grams of neighbouring boxes follow the way the text is read."""
    if boxes is None or len(texts) <= 1:
        return list(texts)
    pts = np.asarray(boxes, dtype=np.float32).reshape(len(texts), -1, 2)
    cy = pts[:, :, 1].mean(1)
    h = np.maximum(pts[:, :, 1].max(1) - pts[:, :, 1].min(1), 1.0)
    x0 = pts[:, :, 0].min(1)
    order = sorted(range(len(texts)), key=lambda k: (cy[k], x0[k]))
    lines: list[list[int]] = []
    for k in order:
        if lines and abs(cy[k] - np.mean([cy[j] for j in lines[-1]])) < 0.5 * h[k]:
            lines[-1].append(k)
        else:
            lines.append([k])
    return [texts[k] for line in lines for k in sorted(line, key=lambda j: x0[j])]


class OCRReward(Reward):
    """``ocr``: normalised edit-distance match between the prompt's quoted text and the text read by OCR.

    Args:
        case_sensitive: compare case (default false).
        metadata_key: metadata field whose value (str or list of str) overrides the quoted text (default ``text``).
        max_ngram: longest run of words joined into one candidate (default none = all).
        min_confidence: drop recognised boxes below this recognition score (default 0).
        det_limit_side_len: detector input size; images are scaled so their longer side is this (default 480;
            rapidocr's default 736 with ``limit_type=min`` is about 18x slower on small images).
        use_cls: run the text-direction classifier (default false: generated text is upright).
        params: extra RapidOCR params (``{"Rec.lang_type": ...}``), merged over the ones above.
    """

    def __init__(self, *, name: str = "", case_sensitive: bool = False, metadata_key: str = "text",
                 max_ngram: int | None = None, min_confidence: float = 0.0, det_limit_side_len: int = 480,
                 use_cls: bool = False, params: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        if max_ngram is not None and max_ngram < 1:
            raise ValueError(f"reward '{self.name}': args.max_ngram must be >= 1 or null, got {max_ngram}")
        self.case_sensitive = bool(case_sensitive)
        self.metadata_key = metadata_key
        self.max_ngram = max_ngram
        self.min_confidence = float(min_confidence)
        self.params = {
            "Global.use_cls": bool(use_cls),
            "Det.limit_type": "max",
            "Det.limit_side_len": int(det_limit_side_len),
            **(params or {}),
        }
        self._engine: Any = None
        self._lock = threading.Lock()  # score_async runs us in worker threads; build the engine once

    @property
    def engine(self) -> Any:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    try:
                        from rapidocr import RapidOCR
                    except ImportError as e:
                        raise ImportError(f"reward '{self.name}' (ocr) needs rapidocr and onnxruntime: pip install 'imagerl[ocr]' "
                                          f"(or pip install rapidocr onnxruntime): {e}") from e
                    self._engine = RapidOCR(params=self.params)
                    # rapidocr logs a warning for every image without text; that is a normal outcome here
                    logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        return self._engine

    def targets(self, prompt: str, metadata: dict[str, Any] | None) -> list[str]:
        v = (metadata or {}).get(self.metadata_key)
        if isinstance(v, float) and v != v:
            v = None  # a NaN cell (pandas' empty value) is a missing one
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # a numeric text column ({"text": 2024}) is the text 2024, as it is when read from a CSV
        if v is not None and not (isinstance(v, str) and not v.strip()):  # (a blank value is a missing one)
            vals = [v] if isinstance(v, str) else (list(v) if isinstance(v, (list, tuple)) else [v])
            if not all(isinstance(x, str) for x in vals):
                raise ValueError(f"reward '{self.name}': metadata['{self.metadata_key}'] must be a string or a list of strings, got {v!r}")
            return [x for x in vals if x.strip()]
        return extract_quoted(prompt)

    def read(self, image_3HW: torch.Tensor) -> list[str]:
        """OCR one [3,H,W] image in [0,1] -> recognised texts in reading order."""
        rgb = image_3HW.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # rapidocr treats ndarray input as OpenCV BGR
        engine = self.engine
        with self._lock:  # overlapped micro-batches score in worker threads; one OCR call at a time
            res = engine(bgr)
        if res.txts is None:
            return []
        keep = [k for k, s in enumerate(res.scores) if s >= self.min_confidence]
        texts = [res.txts[k] for k in keep]
        boxes = None if res.boxes is None else np.asarray(res.boxes)[keep]
        return reading_order(boxes, texts)

    def score(self, inp: RewardInput) -> RewardOutput:
        scores: list[float] = []
        read_texts: list[str] = []
        for i in range(len(inp)):
            tg = self.targets(inp.prompts[i], inp.metadata[i] if inp.metadata else None)
            if not tg:
                scores.append(float("nan"))
                read_texts.append("")
                continue
            toks = self.read(inp.images[i])
            read_texts.append(" ".join(toks))
            sims = [best_match(t, toks, case_sensitive=self.case_sensitive, max_ngram=self.max_ngram) for t in tg]
            scores.append(float(np.mean(sims)))
        return RewardOutput(scores=scores, details={"ocr_text": read_texts})
