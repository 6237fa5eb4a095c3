"""``format``: a rule reward on the tagged text that planner policies write (``RewardInput.texts``).

A planner answers e.g. ``<CoT>the sky should be purple ...</CoT><Re_edit>make the sky purple</Re_edit>``.
The score is 1 when every required tag appears exactly once as an opening and a closing tag, the tags come
in the configured order without overlapping, and each tag's content is non-empty; otherwise 0, as in
the format rewards of R1-style RL (DeepSeek-R1 uses a binary format reward). Optionally a length term
multiplies it: 1 inside [min_length, max_length] (words or characters), falling linearly outside to 0 at
`length_tolerance` units beyond the range (default tolerance: the bound itself, so an empty text or one
twice as long as max_length scores 0). Texts are never abstained on: a missing or empty text scores 0,
because producing the format is the policy's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..types import RewardInput, RewardOutput
from .base import Reward


@dataclass
class TagCheck:
    ok: bool
    reason: str  # "" when ok, else what is wrong (for logs and tests)
    contents: dict[str, str] = field(default_factory=dict)  # tag -> text inside it


def check_tags(text: str, tags: list[str], *, ordered: bool = True, allow_outside: bool = True) -> TagCheck:
    """Is every tag present exactly once, closed, non-empty, (in order), and (nothing outside the tags)?"""
    spans: list[tuple[int, int, str]] = []  # (start of <t>, end of </t>, tag)
    contents: dict[str, str] = {}
    for t in tags:
        open_t, close_t = f"<{t}>", f"</{t}>"
        n_open, n_close = text.count(open_t), text.count(close_t)
        if n_open != 1 or n_close != 1:
            return TagCheck(False, f"<{t}> appears {n_open}x and </{t}> {n_close}x; need exactly once each")
        a, b = text.index(open_t), text.index(close_t)
        if b < a:
            return TagCheck(False, f"</{t}> comes before <{t}>")
        body = text[a + len(open_t) : b]
        if not body.strip():
            return TagCheck(False, f"<{t}> is empty")
        contents[t] = body.strip()
        spans.append((a, b + len(close_t), t))
    by_start = sorted(spans)
    for (_, end1, t1), (start2, _, t2) in zip(by_start, by_start[1:]):
        if start2 < end1:
            return TagCheck(False, f"<{t2}> starts inside <{t1}>")
    if ordered and [t for _, _, t in by_start] != list(tags):
        return TagCheck(False, f"tags are in order {[t for _, _, t in by_start]}, expected {list(tags)}")
    if not allow_outside:
        rest, prev = [], 0
        for a, b, _ in by_start:
            rest.append(text[prev:a])
            prev = b
        rest.append(text[prev:])
        if "".join(rest).strip():
            return TagCheck(False, "text outside the tags")
    return TagCheck(True, "", contents)


def length_factor(length: float, min_length: float | None, max_length: float | None,
                  tolerance: float | None = None) -> float:
    """1 inside [min_length, max_length]; linear to 0 at `tolerance` units outside (default: the bound)."""
    if min_length is not None and length < min_length:
        tol = tolerance if tolerance is not None else min_length
        return max(0.0, 1.0 - (min_length - length) / tol) if tol > 0 else 0.0
    if max_length is not None and length > max_length:
        tol = tolerance if tolerance is not None else max_length
        return max(0.0, 1.0 - (length - max_length) / tol) if tol > 0 else 0.0
    return 1.0


def text_length(text: str, unit: str) -> int:
    return len(text.split()) if unit == "words" else len(text)


class TagFormatReward(Reward):
    """``format``: tag-format rule for planner outputs, score in [0, 1].

    Args:
        tags: required tag names, in order (default ``[CoT, Re_edit]``).
        ordered: tags must appear in the listed order (default true).
        allow_outside: text outside the tags is allowed (default true; false = only whitespace).
        min_length / max_length: target length range (default none = no length term).
        length_unit: ``words`` (default) or ``chars``.
        length_of: ``all`` (the whole text, default) or a tag name (that tag's content).
        length_tolerance: units outside the range at which the length term reaches 0 (default: the bound).
    """

    def __init__(self, *, name: str = "", tags: list[str] | None = None, ordered: bool = True,
                 allow_outside: bool = True, min_length: float | None = None, max_length: float | None = None,
                 length_unit: str = "words", length_of: str = "all", length_tolerance: float | None = None) -> None:
        super().__init__(name)
        self.tags = list(tags) if tags is not None else ["CoT", "Re_edit"]
        if not self.tags:
            raise ValueError(f"reward '{self.name}': args.tags is empty; list the required tag names, e.g. [CoT, Re_edit]")
        bad = [t for t in self.tags if not re.fullmatch(r"[A-Za-z_][\w\-.]*", str(t))]
        if bad:
            raise ValueError(f"reward '{self.name}': args.tags entry '{bad[0]}' is not a tag name; write CoT, not <CoT>")
        if len(set(self.tags)) != len(self.tags):
            raise ValueError(f"reward '{self.name}': args.tags lists a tag twice: {self.tags}")
        if length_unit not in ("words", "chars"):
            raise ValueError(f"reward '{self.name}': args.length_unit must be words or chars, got '{length_unit}'")
        if length_of != "all" and length_of not in self.tags:
            raise ValueError(f"reward '{self.name}': args.length_of must be 'all' or one of args.tags {self.tags}, got '{length_of}'")
        if min_length is not None and max_length is not None and min_length > max_length:
            raise ValueError(f"reward '{self.name}': args.min_length ({min_length}) > args.max_length ({max_length})")
        if length_tolerance is not None and length_tolerance <= 0:
            raise ValueError(f"reward '{self.name}': args.length_tolerance must be > 0, got {length_tolerance}")
        self.ordered, self.allow_outside = bool(ordered), bool(allow_outside)
        self.min_length, self.max_length = min_length, max_length
        self.length_unit, self.length_of, self.length_tolerance = length_unit, length_of, length_tolerance

    def score_text(self, text: str | None) -> tuple[float, TagCheck, int]:
        """(score, tag check, measured length) of one text."""
        chk = check_tags(text or "", self.tags, ordered=self.ordered, allow_outside=self.allow_outside)
        if not chk.ok:
            return 0.0, chk, 0
        part = (text or "") if self.length_of == "all" else chk.contents[self.length_of]
        n = text_length(part, self.length_unit)
        return length_factor(n, self.min_length, self.max_length, self.length_tolerance), chk, n

    def score(self, inp: RewardInput) -> RewardOutput:
        if inp.texts is None:
            raise ValueError(
                f"reward '{self.name}' (format) scores generated text but RewardInput.texts is None; "
                "use it with a planner policy that returns texts"
            )
        scores, ok, lengths = [], [], []
        for t in inp.texts:
            s, chk, n = self.score_text(t)
            scores.append(s)
            ok.append(float(chk.ok))
            lengths.append(float(n))
        details: dict[str, Any] = {"format_ok": ok}
        if self.min_length is not None or self.max_length is not None:
            details["length"] = lengths
        return RewardOutput(scores=scores, details=details)
