"""Robust parsers for VLM judge outputs: pure functions, text (and log-probs) in, numbers out.

Every parser returns ``None`` (or an empty result) when it cannot read a verdict; the judge reward then
abstains for that sample (NaN) and counts a parse failure. Nothing here guesses a neutral value.

Judges answer in many shapes, so the parsers accept:
- JSON inside Markdown fences (```` ```json ... ``` ````), with trailing prose, single quotes, trailing
  commas or Python literals (``True``/``None``);
- full-width / Chinese punctuation (``，：“”［］【】``) and full-width digits (normalised with NFKC);
- scores written as ``8``, ``8/10``, ``8 out of 10``, ``"8"``.
Scores outside ``[lo, hi]`` are treated as unparseable rather than clamped: a judge that answers 15 on a
0-10 scale misread the instructions, and clamping would turn that into a confident maximum.
"""

from __future__ import annotations

import ast
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

# Punctuation NFKC leaves alone but judges (notably Chinese-tuned VLMs) emit inside JSON.
_PUNCT = str.maketrans({
    "“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "、": ",", "。": ".", "【": "[", "】": "]",
    "「": '"', "」": '"', "『": '"', "』": '"', "《": '"', "》": '"', "～": "~", "\u200b": "",
})

_NUM = r"[-+]?\d+(?:\.\d+)?"
_OUT_OF = r"(?:/|out of)\s*(\d+(?:\.\d+)?)"  # the " / 10" or " out of 5" after a score (captures the scale)
_SCORE = rf"{_NUM}(?:\s*{_OUT_OF})?"  # a score with its optional scale, one text for `to_number`


def normalize_text(text: str | None) -> str:
    """NFKC (full-width ASCII -> ASCII, e.g. ``，`` -> ``,``, ``８`` -> ``8``) + quote/bracket mapping, without a
    reasoning model's ``<think>...</think>`` block (served without a reasoning parser, Qwen3 / DeepSeek-R1 style
    judges put it before the answer; every parser reads the answer after it). An unclosed ``<think>`` is all
    thinking: no answer."""
    if not text:
        return ""
    text = re.sub(r"<think>.*?(?:</think>|$)", "", text, flags=re.S)
    if "</think>" in text:  # (R1 / QwQ / Qwen3-Thinking templates open <think> in the prompt: only the close is output)
        text = text.rsplit("</think>", 1)[1]
    return unicodedata.normalize("NFKC", text).translate(_PUNCT).strip()


def strip_code_fences(text: str) -> str:
    """The body of the first Markdown code block if there is one, else the text with stray fences removed."""
    m = re.search(r"```[\w+-]*[ \t]*\n?(.*?)```", text, flags=re.S)
    if m:
        return m.group(1).strip()
    return text.replace("```", "").strip()


def find_json_objects(text: str) -> list[str]:
    """Balanced ``{...}`` substrings, outermost first, scanning quotes so braces in strings do not count."""
    out: list[str] = []
    depth, start, quote, escaped = 0, -1, "", False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
            continue
        if ch == '"' and depth > 0:
            quote = ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[start : i + 1])
    return out


def loads_lenient(text: str) -> Any | None:
    """json.loads, then with common judge mistakes repaired (trailing commas, single quotes, Python literals)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        pass
    fixed = re.sub(r",\s*([}\]])", r"\1", text)
    try:
        return json.loads(fixed)
    except (json.JSONDecodeError, ValueError):
        pass
    try:  # Python-dict style: {'score': [8, 9], 'reasoning': 'ok'} or True/None
        return ast.literal_eval(fixed)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        pass
    py = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", fixed)))
    try:
        return ast.literal_eval(py)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def _json_candidates(text: str) -> list[Any]:
    """Parsed dict objects found in `text` (fenced block first, then any balanced braces)."""
    s = normalize_text(text)
    objs = []
    for src in (strip_code_fences(s), s):
        for blob in find_json_objects(src):
            obj = loads_lenient(blob)
            if isinstance(obj, dict):
                objs.append(obj)
        if objs:
            break
    return objs


def to_number(v: Any, scale: float | None = None) -> float | None:
    """8, 8.5, "8", "8/10", "8 out of 10" -> float; anything else (bools, text, NaN) -> None. A fraction on another
    scale than `scale` (the judge's top score) is rescaled to it: "4/5" on a 10-point scale is 8."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, str):
        m = re.fullmatch(rf"\s*({_NUM})\s*(?:{_OUT_OF})?\s*\.?\s*", v)
        if m:
            x, den = float(m.group(1)), m.group(2)
            if den is not None and scale is not None and math.isfinite(scale) and float(den) > 0 and float(den) != scale:
                return x / float(den) * scale
            return x
    return None


def _in_range(xs: list[float], lo: float, hi: float) -> bool:
    return all(lo <= x <= hi for x in xs)


def _norm_key(k: str) -> str:
    return re.sub(r"[^0-9a-z\u4e00-\u9fff]+", "_", str(k).lower()).strip("_")


# --------------------------------------------------------------------------------------------------
# Numeric scores
# --------------------------------------------------------------------------------------------------


def parse_score_list(
    text: str | None,
    *,
    key: str = "score",
    expected_len: int | None = None,
    lo: float = 0.0,
    hi: float = 10.0,
    scale: float | None = None,
) -> list[float] | None:
    """The list under `key` (``{"score": [7, 9], "reasoning": ...}``, VIEScore style) -> [floats], or None.

    A scalar value is a one-element list. Also accepts ``scores`` as the key. Fails (None) on a wrong
    length when `expected_len` is given, on non-numeric entries and on values outside [lo, hi]. Fractions
    ("4/5") are rescaled to `scale` (default: hi).
    """
    scale = hi if scale is None else scale
    s = normalize_text(text)
    if not s:
        return None
    keys = {_norm_key(key), _norm_key(key) + "s"}
    values: list[Any] | None = None
    for obj in _json_candidates(s):
        for k, v in obj.items():
            if _norm_key(k) in keys:
                values = v if isinstance(v, (list, tuple)) else [v]
                break
        if values is not None:
            break
    if values is None:  # not valid JSON: look for  score: [7, 9]  or  "score": 7
        kpat = re.escape(key) + "s?"
        m = re.search(rf"[\"']?{kpat}[\"']?\s*[:=]\s*\[([^\]]*)\]", s, flags=re.I)
        if m:
            values = [x for x in re.split(r"[,;]", m.group(1)) if x.strip()]
        else:
            m = re.search(rf"[\"']?{kpat}[\"']?\s*[:=]\s*[\"']?({_SCORE})", s, flags=re.I)
            if m:
                values = [m.group(1)]
    if not values:
        return None
    nums = [to_number(v.strip().strip("\"'") if isinstance(v, str) else v, scale) for v in values]
    if any(x is None for x in nums):
        return None
    out = [float(x) for x in nums if x is not None]
    if expected_len is not None and len(out) != expected_len:
        return None
    return out if _in_range(out, lo, hi) else None


def parse_score(text: str | None, *, lo: float = 0.0, hi: float = 10.0) -> float | None:
    """One score in [lo, hi] from free text: JSON ``{"score": 8}``, ``Score: 8/10``, ``8 out of 10``, ``8``.

    Without a ``score``/``x/10`` marker a bare number counts only when it is the whole answer (``8``, ``"8".``)
    or leads it, set off by punctuation (``7. The edit follows ...``, ``7 - good``). A number inside prose
    ("The edit added 2 dogs ...") is a count, not a score, and returns None.
    """
    s = normalize_text(text)
    if not s:
        return None
    lst = parse_score_list(s, lo=-math.inf, hi=math.inf, scale=hi)
    if lst is not None:  # a score field was found: it alone decides (a list of two is not one score)
        return lst[0] if len(lst) == 1 and lo <= lst[0] <= hi else None
    body = strip_code_fences(s).replace("*", "")
    hi_txt = f"{hi:g}"
    patterns = [
        rf"({_NUM})\s*(?:/|out of)\s*{re.escape(hi_txt)}(?:\.0+)?\b",  # 8/10, 8 out of 10
        # Score: 8 / I rate it 8 / Rating: 3 out of 5 / 评分: 7 (a fraction on another scale is rescaled)
        rf"(?:\b(?:score|rating|rate|grade)\b|评分|分数|得分|打分)[^0-9\n]{{0,20}}?({_SCORE})",
    ]
    for pat in patterns:
        m = re.search(pat, body, flags=re.I)
        if m:
            v = to_number(m.group(1), hi)
            return v if v is not None and lo <= v <= hi else None
    # The answer starts with the number, then ends, breaks the line or goes on after punctuation and a space: "8",
    # "(8).", "7 - good", "8\nThe edit ...". Not "2 dogs were added" (a count) nor "2-3 dogs"; no "-" in the prefix.
    tail = r"\s*(?:$|\n|[.,:;!)\]\"'\-–—]+(?:\s|$))"
    m = re.match(rf"[\s\"'(\[>#]*({_NUM}){tail}", body)
    # or after an answer marker, the number standing alone in the same way: "Answer: 8", "The final answer is 8."
    # (not "Answer: 2 dogs", a count, nor "does answer 3 of the 4 criteria")
    m = m or re.search(rf"\banswer\s*(?:is\s*[:=]?|[:=])\s*({_NUM}){tail}", body, flags=re.I)
    if m:
        v = float(m.group(1))
        return v if lo <= v <= hi else None
    return None


def parse_rubric(
    text: str | None,
    dimensions: list[str],
    *,
    lo: float = 0.0,
    hi: float = 10.0,
) -> dict[str, float]:
    """Scores of the named rubric dimensions found in `text` -> {dimension: score}; missing ones are absent.

    Reads JSON (``{"identity": 8, ...}``, also nested ``{"scores": {...}}`` or ``{"identity": {"score": 8}}``)
    and, failing that, lines such as ``Identity preservation: 8/10`` or ``- **identity**: 8``. Dimension
    names match case-insensitively with spaces, hyphens and underscores treated alike. Values outside
    [lo, hi] are dropped (they count as not found).
    """
    s = normalize_text(text)
    if not s:
        return {}
    want = {_norm_key(d): d for d in dimensions}
    found: dict[str, float] = {}

    def visit(obj: dict[str, Any]) -> None:
        for k, v in obj.items():
            nk = _norm_key(k)
            if nk in want and want[nk] not in found:
                if isinstance(v, dict):
                    v = next((x for kk, x in v.items() if _norm_key(kk) in ("score", "scores", "value")), None)
                if isinstance(v, (list, tuple)) and len(v) == 1:
                    v = v[0]
                x = to_number(v, hi)
                if x is not None and lo <= x <= hi:
                    found[want[nk]] = x
            elif isinstance(v, dict):
                visit(v)

    for obj in _json_candidates(s):
        visit(obj)
    if found:
        return found
    body = strip_code_fences(s).replace("*", "").replace("`", "")
    for nk, dim in want.items():
        words = [re.escape(w) for w in nk.split("_") if w]
        name_pat = r"[\s_\-]*".join(words)
        m = re.search(rf"[\"']?\b{name_pat}\b[\"']?[^0-9\n]{{0,12}}?({_NUM})", body, flags=re.I)
        if m:
            x = float(m.group(1))
            if lo <= x <= hi:
                found[dim] = x
    return found


# --------------------------------------------------------------------------------------------------
# Yes / no
# --------------------------------------------------------------------------------------------------

_YES = {"yes", "是", "是的", "对", "true"}  # (no bare "y"/"n": a sampled "N" may start "Nice")
_NO = {"no", "否", "不", "不是", "不对", "false"}


def _token_word(tok: str) -> str:
    """Token text -> bare lowercase word: strips spaces, BPE/SentencePiece markers and punctuation."""
    t = normalize_text(tok.replace("Ġ", " ").replace("▁", " ").replace("Ċ", " ")).lower()
    return t.strip(" \t\n.,!:;\"'*`()[]")


def parse_yes_no(text: str | None) -> bool | None:
    """Yes -> True, No -> False, unreadable -> None.

    Only the answer's first word (after punctuation or Markdown: ``**No**``, ``"Yes"``) or an explicit
    ``answer: yes`` count. A yes/no word elsewhere in prose is not a verdict ("cannot determine with no
    context" is not a No), so it gives None.
    """
    s = normalize_text(text).replace("*", "").replace("`", "")
    if not s:
        return None
    low = s.lower()
    first = re.match(r"[\W_]*([a-z]+|[\u4e00-\u9fff]{1,2})", low)
    if first:
        w = first.group(1)
        if w in ("yes", "no"):
            return w == "yes"
        if w.startswith(("是", "对")):
            return True
        if w.startswith(("否", "不")):
            return False
    m = re.search(r"\b(?:answer|verdict|response)\b\s*(?:is)?\s*[:\-]?\s*\"?(yes|no)\b", low)
    if m:
        return m.group(1) == "yes"
    return None


@dataclass
class YesNoResult:
    """P(yes) among {yes, no} and where it came from: "logprobs", "text", or "" when unparseable (p_yes None)."""

    p_yes: float | None
    source: str


def yes_no_probability(
    top_logprobs: list[dict[str, float]] | None,
    text: str | None,
    *,
    max_positions: int = 4,
) -> YesNoResult:
    """P(yes) / (P(yes) + P(no)) at the answer token; the text decides when there are no log-probs.

    Each position's dict starts with the token that was generated (then its top-k alternatives; both
    backends build them so). The answer token is the first generated token within `max_positions` that is not
    only spaces or punctuation (a leading space, ``**`` or quote token is skipped); if it is a yes/no word, the
    mass of every variant among that position's candidates is summed (``Yes``, `` yes``, ``YES``, ``yes.``,
    ``▁Yes``: the judge's tokenizer splits them into different tokens and each carries part of the probability).
    Otherwise (the answer starts with another word) the text decides. A position whose generated token is
    ``**`` may list ``Yes`` and ``No`` among its unlikely alternatives; reading them there would be wrong.
    The text also decides when a yes/no candidate at the answer position has a None, NaN or +inf log-prob.
    """
    if top_logprobs:
        for pos in top_logprobs[:max_positions]:
            if not pos:
                continue
            chosen = _token_word(next(iter(pos)))
            if not chosen:
                continue  # whitespace / markdown / quote token before the answer
            if chosen not in _YES and chosen not in _NO:
                break
            p_yes = p_no = 0.0
            corrupt = False
            for tok, lp in pos.items():
                w = _token_word(tok)
                if w not in _YES and w not in _NO:
                    continue
                if lp is None or math.isnan(lp) or lp == math.inf:
                    # Skipping it would hand its mass to the other side: a NaN generated "Yes" would make
                    # P(yes) = 0, the opposite verdict. The position is unreadable; the text decides.
                    corrupt = True
                    break
                lp = min(float(lp), 0.0)  # servers round: a certain token may come back as +1e-7
                if w in _YES:
                    p_yes += math.exp(lp)
                else:
                    p_no += math.exp(lp)
            if corrupt:
                break
            if p_yes + p_no > 0:
                return YesNoResult(p_yes / (p_yes + p_no), "logprobs")
    verdict = parse_yes_no(text)
    if verdict is None:
        return YesNoResult(None, "")
    return YesNoResult(1.0 if verdict else 0.0, "text")


# --------------------------------------------------------------------------------------------------
# Pairwise choice
# --------------------------------------------------------------------------------------------------

_SIDE = {"a": "A", "1": "A", "first": "A", "left": "A", "b": "B", "2": "B", "second": "B", "right": "B"}
_TIE_WORDS = r"\b(?:tie|tied|draw|equal(?:ly)?|same|neither|both|indistinguishable|no preference)\b"
_SIDE_PAT = r"(?:image|picture|option|candidate)\s*\(?([ab12])\)?|\b(first|second|left|right)\s+(?:image|picture|one|option)"
_BETTER = r"(?:better|superior|preferable|preferred|wins|more\s+accurate|closer)"
_WORSE = r"(?:worse|inferior|less\s+accurate)"
# "A is not better than B", "B isn't worse", "A is no longer better": the side named is not the verdict
_NEGATED_CMP = rf"(?:\b(?:not|no|never)|n't)\s+(?:\w+\s+)?(?:{_BETTER}|{_WORSE})\b"
# A tie stated as the verdict. Tie words alone are not one: "Both images show a red square" has no verdict.
_TIE_STATED = (
    r"\bit(?:'s|\s+is)\s+a\s+(?:tie|draw)\b"
    r"|\b(?:are|is|look|looks|seem|seems|perform|performs)\s+equally\b"  # they / both (images) are equally good
    r"|\bneither(?:\s+(?:one|image|picture|option|of\s+them))?\s+(?:is|looks|seems)\s+(?:better|worse|preferable)\b"
    r"|\b(?:same|equal)\s+quality\b|\bno\s+preference\b"
    # "They are the same." / "Both are identical": the sentence ends there ("the same size" is not a verdict)
    r"|\b(?:they|both(?:\s+(?:images|pictures|options|ones|of\s+them))?)\s+(?:are|look|seem)\s+"
    r"(?:the\s+same|equal|identical|indistinguishable|tied)\s*(?:$|[.!;,])"
)


def _side_of(m: re.Match[str]) -> str:
    g = next(x for x in m.groups() if x)
    return _SIDE[g.lower()]


def parse_choice(text: str | None) -> str | None:
    """A pairwise verdict -> "A" (first shown), "B" (second shown), "tie", or None when unreadable.

    Accepts ``A``, ``(B)``, ``Image 1``, ``Answer: B``, ``The second image is better``, ``first``,
    ``Tie`` and prose in which only one of the two images is named. The article "A" (``A cat ...``)
    is not read as a choice. A tie needs the answer to be just the tie, an answer marker (``Answer: tie``)
    or a stated one (``it's a tie``, ``both are equally good``, ``neither is better``); a negated comparative
    (``A is not better than B``) makes prose unreadable (None) unless a marker gave the verdict.
    """
    s = normalize_text(text)
    if not s:
        return None
    s = strip_code_fences(s).replace("*", "").replace("`", "").replace("#", "").strip()
    if not s:
        return None
    low = s.lower()
    # 1. The whole answer is one choice: "A", "(B).", "Image 1", "second", "Tie"
    m = re.fullmatch(r"\W*(?:(?:image|picture|option|answer|choice)\s*[:\-]?\s*)?\(?([ab12])\)?\W*", low)
    if m:
        return _SIDE[m.group(1)]
    m = re.fullmatch(r"\W*(?:the\s+)?(first|second|left|right)(?:\s+(?:one|image|picture))?\W*", low)
    if m:
        return _SIDE[m.group(1)]
    if re.fullmatch(rf"\W*(?:it'?s\s+a\s+)?{_TIE_WORDS}\W*", low):
        return "tie"
    # 2. An explicit verdict marker: "Answer: B", "Final choice - Image 2", "I prefer the first image"
    m = re.search(
        r"(?:\b(?:answer|choice|verdict|winner|decision|preference|prefer(?:red)?|choose|chose|select|pick)\b|答案|选择|结论)"
        r"\s*(?:is|would be)?\s*[:\-=]?\s*(?:the\s+)?"
        r"(?:(?:image|picture|option|candidate)\s*\(?([ab12])\)?(?![a-z])|\(?([ab12])\)?(?![\w'])(?!\s+(?:tie|draw)\b)"
        r"|(first|second|left|right)\b|(?:a\s+)?(tie|draw|neither|both|equal)\b)",
        low,
    )
    if m:
        if m.group(4):
            return "tie"
        return _SIDE[(m.group(1) or m.group(2) or m.group(3)).lower()]
    # 3. "<side> is better/superior/preferred/wins", or "<side> is worse" (the other side wins); a side is "image A",
    # "the first one", or a bare capital A / B ("Both are good, but A is better"; "B is worse than A"). Not negated:
    # "A is not better" / "B does not look better" are no such statement (the word between may not be a negator).
    side = rf"(?:(?i:{_SIDE_PAT})|\b([AB])\b(?=\s+(?i:is|looks|seems|matches|wins)\b))"  # (not "A more ...")
    neg = r"(?!(?:not|never|no|hardly)\b)"
    better = re.search(rf"{side}\s+(?i:(?:is|looks|seems|matches)?\s*{neg}(?:\w+\s+)?{neg}{_BETTER})", s)
    worse = re.search(rf"{side}\s+(?i:(?:is|looks|seems)?\s*{neg}(?:\w+\s+)?{neg}{_WORSE})", s)
    if better and not worse:
        return _side_of(better)
    if worse and not better:
        return "B" if _side_of(worse) == "A" else "A"
    if better and worse and _side_of(better) != _side_of(worse):  # "A is better; B is worse"
        return _side_of(better)
    # 4. A leading letter set off as the verdict: "A.", "B) because ...", "B: A does not look better"
    m = re.match(r"\(?([AB])\)?(?=$|[.):,;!\-])", s)
    if m and not (better or worse):
        return m.group(1)
    # 5. A negated comparative ("A is not better than B") would be read below as a verdict for the side it names (by
    # the leading letter or the only image named): no verdict from the prose then.
    if re.search(_NEGATED_CMP, low):
        return None
    # 6. A leading letter as the subject of a verdict: "A has ...", "B wins" (but not "A cat ...")
    m = re.match(r"\(?([AB])\)?(?=\s+(?:is|wins|looks|seems|has|better|because|-))", s)
    if m and not (better or worse):
        return m.group(1)
    # 7. Only one image named at all (and no tie word, which may speak of both), or a stated tie with none named
    sides = {_side_of(x) for x in re.finditer(_SIDE_PAT, low)}
    if len(sides) == 1 and not re.search(_TIE_WORDS, low):
        return sides.pop()
    if not sides and re.search(_TIE_STATED, low):
        return "tie"
    return None
