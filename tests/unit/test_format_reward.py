"""Tag-format rule reward on planner texts: tables of texts and expected scores."""

from __future__ import annotations

import pytest
import torch

from imagerl.rewards.base import build_reward
from imagerl.rewards.format import TagFormatReward, check_tags, length_factor
from imagerl.types import RewardInput

GOOD = "<CoT>The sky is blue, the prompt wants purple.</CoT>\n<Re_edit>Make the sky purple.</Re_edit>"


@pytest.mark.parametrize(
    "text, ok, reason",
    [
        (GOOD, True, ""),
        ("Sure! " + GOOD + " Done.", True, ""),  # text outside allowed by default
        ("<CoT>a</CoT>", False, "<Re_edit> appears 0x"),
        ("<CoT>a</CoT><CoT>b</CoT><Re_edit>c</Re_edit>", False, "<CoT> appears 2x"),
        ("<CoT>a<Re_edit>c</Re_edit>", False, "</CoT> 0x"),  # unclosed
        ("</CoT>a<CoT><Re_edit>c</Re_edit>", False, "</CoT> comes before <CoT>"),
        ("<CoT>   </CoT><Re_edit>c</Re_edit>", False, "<CoT> is empty"),
        ("<Re_edit>c</Re_edit><CoT>a</CoT>", False, "tags are in order"),
        ("<CoT>a <Re_edit>c</Re_edit> b</CoT>", False, "starts inside <CoT>"),  # nested
        ("<cot>a</cot><Re_edit>c</Re_edit>", False, "<CoT> appears 0x"),  # case matters
        ("", False, "<CoT> appears 0x"),
    ],
)
def test_check_tags_table(text, ok, reason):
    chk = check_tags(text, ["CoT", "Re_edit"])
    assert chk.ok is ok
    assert reason in chk.reason
    if ok:
        assert chk.contents == {"CoT": "The sky is blue, the prompt wants purple.", "Re_edit": "Make the sky purple."}


def test_unordered_and_no_outside_text():
    swapped = "<Re_edit>c</Re_edit><CoT>a</CoT>"
    assert check_tags(swapped, ["CoT", "Re_edit"], ordered=False).ok
    assert not check_tags("hi " + GOOD, ["CoT", "Re_edit"], allow_outside=False).ok
    assert check_tags("  " + GOOD + "\n", ["CoT", "Re_edit"], allow_outside=False).ok


@pytest.mark.parametrize(
    "length, lo, hi, tol, expected",
    [
        (10, 5, 20, None, 1.0),
        (5, 5, 20, None, 1.0),  # bounds inclusive
        (20, 5, 20, None, 1.0),
        (0, 5, 20, None, 0.0),  # default tolerance below = min_length
        (4, 5, 20, None, 0.8),
        (30, 5, 20, None, 0.5),  # default tolerance above = max_length
        (40, 5, 20, None, 0.0),
        (50, 5, 20, None, 0.0),  # clipped at 0
        (25, 5, 20, 10, 0.5),
        (2, 5, 20, 10, 0.7),
        (1000, None, None, None, 1.0),
        (3, 5, None, None, 0.6),
    ],
)
def test_length_factor_table(length, lo, hi, tol, expected):
    assert length_factor(length, lo, hi, tol) == pytest.approx(expected)


def test_reward_scores_with_length_term_on_a_tag():
    r = TagFormatReward(min_length=2, max_length=4, length_of="Re_edit")  # Re_edit content in words
    texts = [
        GOOD,  # Re_edit "Make the sky purple." = 4 words -> 1
        "<CoT>x</CoT><Re_edit>one two three four five six</Re_edit>",  # 6 words: 1 - 2/4 = 0.5
        "<CoT>x</CoT><Re_edit>one</Re_edit>",  # 1 word: 1 - 1/2 = 0.5
        "<CoT>x</CoT>",  # format fails -> 0
        None,  # no text -> 0, not abstain
    ]
    out = r(RewardInput(images=torch.zeros(5, 3, 4, 4), prompts=["p"] * 5, metadata=[{}] * 5, texts=texts))
    assert out.scores.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0])
    assert out.details["format_ok"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert out.details["length"][:3] == [4.0, 6.0, 1.0]
    assert out.num_abstain == 0


def test_chars_unit_and_custom_tags_via_build_reward():
    r = build_reward({"type": "format", "args": {"tags": ["think", "answer"], "max_length": 10, "length_unit": "chars",
                                                "length_of": "answer"}})
    texts = ["<think>hmm</think><answer>0123456789</answer>", "<think>hmm</think><answer>0123456789012345</answer>"]
    out = r(RewardInput(images=torch.zeros(2, 3, 4, 4), prompts=["p"] * 2, metadata=[{}] * 2, texts=texts))
    assert out.scores.tolist() == pytest.approx([1.0, 0.4])


def test_bad_args_and_missing_texts():
    with pytest.raises(ValueError, match="not a tag name"):
        TagFormatReward(tags=["<CoT>"])
    with pytest.raises(ValueError, match="length_of"):
        TagFormatReward(length_of="Answer")
    with pytest.raises(ValueError, match="min_length"):
        TagFormatReward(min_length=5, max_length=2)
    with pytest.raises(ValueError, match="RewardInput.texts"):
        TagFormatReward()(RewardInput(images=torch.zeros(1, 3, 4, 4), prompts=["p"], metadata=[{}]))
