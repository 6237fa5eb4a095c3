"""OCR reward: the edit-distance scorer on tables, and the real RapidOCR engine on text rendered with PIL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imagerl.rewards.base import build_reward
from imagerl.rewards.ocr import (
    OCRReward,
    best_match,
    candidates,
    extract_quoted,
    levenshtein,
    reading_order,
    similarity,
)
from imagerl.types import RewardInput

# ---------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    "a, b, d",
    [
        ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
        ("HELLO", "HELLO", 0), ("HELLO", "HELO", 1), ("abc", "cba", 2), ("grpo 2026", "grpo2026", 1),
    ],
)
def test_levenshtein_table(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


@pytest.mark.parametrize(
    "target, cand, s",
    [("hello", "hello", 1.0), ("hello", "helo", 0.8), ("hello", "", 0.0), ("", "", 1.0),
     ("abc", "abcdef", 0.5), ("kitten", "sitting", 1 - 3 / 7)],
)
def test_similarity_table(target, cand, s):
    assert similarity(target, cand) == pytest.approx(s)


def test_candidates_are_contiguous_runs_with_and_without_spaces():
    assert candidates(["a", "b", "c"]) == ["a", "a b", "ab", "a b c", "abc", "b", "b c", "bc", "c"]
    assert candidates(["a", "b", "c"], max_ngram=1) == ["a", "b", "c"]


def test_pruned_best_match_equals_exhaustive_maximum():
    rng = np.random.default_rng(0)
    alphabet = list("abcde")
    for _ in range(300):
        words = ["".join(rng.choice(alphabet, rng.integers(1, 5))) for _ in range(rng.integers(1, 7))]
        target = " ".join("".join(rng.choice(alphabet, rng.integers(1, 5))) for _ in range(rng.integers(1, 4)))
        exhaustive = max(similarity(target, c) for c in candidates(words))
        assert best_match(target, [" ".join(words)]) == pytest.approx(exhaustive)
        assert best_match(target, words, max_ngram=2) == pytest.approx(max(similarity(target, c) for c in candidates(words, 2)))


@pytest.mark.parametrize(
    "target, tokens, case_sensitive, s",
    [
        ("HELLO WORLD", ["HELLO WORLD"], False, 1.0),
        ("HELLO WORLD", ["HELLO", "WORLD"], False, 1.0),  # split over two boxes
        ("HELLO WORLD", ["noise", "HELLO", "WORLD", "more"], False, 1.0),  # other text is not charged
        ("HELLO", ["HELLO WORLD"], False, 1.0),  # one word of a box
        ("WORLD HELLO", ["HELLO WORLD"], False, 1 - 6 / 11),  # order matters: best is one word
        ("helloworld", ["HELLO WORLD"], False, 1.0),  # no-space join
        ("hello world", ["HELLO", "WORLD"], True, 0.0 + 1 - 10 / 11),  # case counts: only the space matches
        ("Hello", ["HELLO"], False, 1.0),
        ("HELLO", ["HELL0"], False, 0.8),
        ("GRPO 2026", ["GRPO2026"], False, 1 - 1 / 9),
        ("BEACH", [], False, 0.0),  # nothing read
        ("BEACH", ["  "], False, 0.0),
        ("OPEN  NOW", ["open now"], False, 1.0),  # whitespace runs collapsed
        ("Joe’s Diner", ["JOE'S DINER"], False, 1.0),  # typographic apostrophe = ASCII one
        ("ＯＰＥＮ", ["OPEN"], False, 1.0),  # full-width letters (NFKC)
    ],
)
def test_best_match_table(target, tokens, case_sensitive, s):
    assert best_match(target, tokens, case_sensitive=case_sensitive) == pytest.approx(s)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ('a sign that says "HELLO WORLD"', ["HELLO WORLD"]),
        ("a mug with 'GRPO' printed on it", ["GRPO"]),
        ("a poster reading “OPEN” and “CLOSED”", ["OPEN", "CLOSED"]),
        ("a cat's toy and the dogs' bowl", []),  # apostrophes are not quotes
        ("a shop sign 「拉面」", ["拉面"]),
        ('the word "say \'hi\'" on a wall', ["say 'hi'"]),  # inner quote not a second target
        ("no quotes at all", []),
        ('empty "" quotes', []),
        ("a diner sign reading ‘Joe’s Diner’", ["Joe’s Diner"]),  # ’ inside a word is an apostrophe
        ("‘hi’ and ‘bye’", ["hi", "bye"]),
        ("a diner sign that says 'Joe's Diner'", ["Joe's Diner"]),  # straight quotes around an apostrophe too
        ("don't stop 'BELIEVIN' and 'World's Best Dad'", ["BELIEVIN", "World's Best Dad"]),
        ("the dogs' sign says 'WOOF'", ["WOOF"]),
    ],
)
def test_extract_quoted_table(prompt, expected):
    assert extract_quoted(prompt) == expected


def test_reading_order_lines_then_left_to_right():
    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    boxes = np.array([box(60, 2, 100, 20), box(0, 40, 50, 60), box(0, 0, 50, 22)])
    assert reading_order(boxes, ["WORLD", "second", "HELLO"]) == ["HELLO", "WORLD", "second"]


# ---------------------------------------------------------------------------------------------- real engine


def render(text: str, size: tuple[int, int] = (360, 80)) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    if text:
        ImageDraw.Draw(img).text((10, 15), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def ocr() -> OCRReward:
    return build_reward({"type": "ocr", "name": "ocr"})


def test_real_engine_reads_rendered_text(ocr):
    images = torch.stack([render("HELLO WORLD"), render(""), render("HELLO WORLD"), render("GRPO 2026")])
    prompts = [
        'a sign that says "HELLO WORLD"',
        'a sign that says "HELLO WORLD"',
        "a sign that says hello world",  # nothing quoted: abstain
        "a banner",  # target from metadata
    ]
    metadata = [{}, {}, {}, {"text": "GRPO 2026"}]
    out = ocr(RewardInput(images=images, prompts=prompts, metadata=metadata))
    s = out.scores.tolist()
    assert s[0] > 0.8
    assert s[1] < 0.2  # blank image
    assert math.isnan(s[2])
    assert s[3] > 0.8
    assert "hello" in out.details["ocr_text"][0].lower()
    assert out.num_abstain == 1


def test_real_engine_wrong_text_scores_lower_and_several_targets_average(ocr):
    images = torch.stack([render("HELLO WORLD"), render("HELLO WORLD")])
    out = ocr(RewardInput(images=images, prompts=['a sign that says "GOODBYE MOON"', 'says "HELLO" and "ZZZZZ"'],
                          metadata=[{}, {}]))
    wrong, mixed = out.scores.tolist()
    assert wrong < 0.5
    # "HELLO" matches exactly, "ZZZZZ" shares nothing with any run -> mean of 1 and (at most) a little
    assert 0.5 <= mixed < 0.65


def test_engine_is_created_once_and_lazily():
    r = OCRReward()
    assert r._engine is None
    r(RewardInput(images=render("HI").unsqueeze(0), prompts=['"HI"'], metadata=[{}]))
    eng = r._engine
    assert eng is not None
    r(RewardInput(images=render("HI").unsqueeze(0), prompts=['"HI"'], metadata=[{}]))
    assert r._engine is eng
    # a prompt without a target never touches the engine
    r2 = OCRReward()
    r2(RewardInput(images=render("HI").unsqueeze(0), prompts=["no target"], metadata=[{}]))
    assert r2._engine is None


def test_bad_metadata_text_names_the_field():
    with pytest.raises(ValueError, match=r"metadata\['text'\]"):
        OCRReward()(RewardInput(images=render("HI").unsqueeze(0), prompts=["x"], metadata=[{"text": {"a": 1}}]))
    r = OCRReward()
    # a numeric text ({"text": 2024} from JSONL/parquet) is that text, as from a CSV; a blank one is missing
    assert r.targets("x", {"text": 2024}) == ["2024"]
    assert r.targets('a sign that says "SALE"', {"text": ""}) == ["SALE"]
    assert r.targets('a sign that says "SALE"', {"text": float("nan")}) == ["SALE"]  # pandas' empty cell
