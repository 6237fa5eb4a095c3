"""Judge output parsers on real-looking VLM answers, malformed ones included."""

from __future__ import annotations

import math

import pytest

from imagerl.rewards.judges.parsers import (
    find_json_objects,
    loads_lenient,
    normalize_text,
    parse_choice,
    parse_rubric,
    parse_score,
    parse_score_list,
    parse_yes_no,
    strip_code_fences,
    yes_no_probability,
)

# ---------------------------------------------------------------------------------------------- helpers


def test_normalize_fullwidth_and_chinese_punctuation():
    assert normalize_text("｛“score”：［８，９］｝") == '{"score":[8,9]}'
    assert normalize_text(None) == ""
    assert normalize_text("  ") == ""


def test_strip_code_fences():
    assert strip_code_fences('Here:\n```json\n{"a": 1}\n```\nThanks') == '{"a": 1}'
    assert strip_code_fences("```{\"a\": 1}```") == '{"a": 1}'
    assert strip_code_fences("no fence") == "no fence"


def test_find_json_objects_ignores_braces_in_strings():
    text = 'pre {"reasoning": "a } brace", "score": [1]} mid {"x": {"y": 2}} post'
    assert find_json_objects(text) == ['{"reasoning": "a } brace", "score": [1]}', '{"x": {"y": 2}}']
    assert find_json_objects("{unclosed") == []


@pytest.mark.parametrize(
    "blob, expected",
    [
        ('{"score": [1, 2]}', {"score": [1, 2]}),
        ('{"score": [1, 2],}', {"score": [1, 2]}),  # trailing comma
        ("{'score': [1, 2], 'reasoning': 'ok'}", {"score": [1, 2], "reasoning": "ok"}),  # python dict
        ('{"ok": true, "x": null}', {"ok": True, "x": None}),
        ("{'ok': true}", {"ok": True}),  # single quotes AND json literal
        ("{score: [1}", None),
    ],
)
def test_loads_lenient(blob, expected):
    assert loads_lenient(blob) == expected


# ---------------------------------------------------------------------------------------------- scores

VIESCORE_CLEAN = '{\n  "reasoning": "The sky was turned purple as asked, the house is unchanged.",\n  "score": [9, 8]\n}'
VIESCORE_FENCED = 'Sure! Here is my evaluation:\n```json\n{"score": [7, 10], "reasoning": "Good edit."}\n```\nLet me know if you need more.'
VIESCORE_CHINESE = "｛“score”：［６，７］，“reasoning”：“图像自然，但有轻微伪影。”｝"
VIESCORE_PROSE_AFTER = '{"score": [5, 6], "reasoning": "ok"} I think the image {is} decent.'
VIESCORE_SINGLE = "{'score': [3, 4], 'reasoning': 'Artifacts on the hands.'}"
VIESCORE_NOT_JSON = 'reasoning: the cat is missing\nscore: [2, 9]'
VIESCORE_STRINGS = '{"score": ["8", "9/10"], "reasoning": "fine"}'


@pytest.mark.parametrize(
    "text, n, expected",
    [
        (VIESCORE_CLEAN, 2, [9.0, 8.0]),
        (VIESCORE_FENCED, 2, [7.0, 10.0]),
        (VIESCORE_CHINESE, 2, [6.0, 7.0]),
        (VIESCORE_PROSE_AFTER, 2, [5.0, 6.0]),
        (VIESCORE_SINGLE, 2, [3.0, 4.0]),
        (VIESCORE_NOT_JSON, 2, [2.0, 9.0]),
        (VIESCORE_STRINGS, 2, [8.0, 9.0]),
        ('{"scores": [4.5]}', 1, [4.5]),  # plural key, float
        ('{"score": 7, "reasoning": "x"}', 1, [7.0]),  # scalar becomes a one-element list
        ('{"score": [7, 8]}', None, [7.0, 8.0]),  # no expected length
    ],
)
def test_parse_score_list_good(text, n, expected):
    assert parse_score_list(text, expected_len=n) == expected


@pytest.mark.parametrize(
    "text, n",
    [
        ("", 2),
        (None, 2),
        ('{"score": [9, 12]}', 2),  # out of range
        ('{"score": [-1, 5]}', 2),  # negative
        ('{"score": [8]}', 2),  # wrong length
        ('{"score": [8, 9, 7]}', 2),
        ('{"reasoning": "no score given"}', 2),  # missing field
        ('{"score": ["good", 8]}', 2),  # non-numeric
        ('{"score": [true, 8]}', 2),  # bool is not a number
        ("I cannot evaluate this image.", 2),
        ("```json\n{\"score\": [\n```", 2),  # truncated generation
    ],
)
def test_parse_score_list_bad(text, n):
    assert parse_score_list(text, expected_len=n) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8", 8.0),
        (" 7.5 ", 7.5),
        ("7. The edit follows the instruction.", 7.0),  # a number leading the answer
        ("7 - good", 7.0),
        ('"8".', 8.0),
        ("(6)", 6.0),
        ("Score: 8/10", 8.0),
        ("**Rating:** 6 out of 10. The colours are off.", 6.0),
        ('```json\n{"score": 9}\n```', 9.0),
        ("I would rate it a 4 because the dog has 5 legs.", 4.0),  # 'rate' marker beats bare numbers
        ("评分：７", 7.0),  # full-width digit, the only number
        ("0", 0.0),
        ("10/10", 10.0),
        ('{"score": "4/5"}', 8.0),  # a fraction on another scale is rescaled to the judge's 0..10
        ("Score: 4/5", 8.0),
        ("Rating: 3 out of 5", 6.0),
        ("8\nThe second image follows the edit.", 8.0),  # the number on its own line, then the reasoning
        ("8 \n(the edit is complete)", 8.0),
        ("Answer: 8", 8.0),
        ("The final answer is 8.", 8.0),
        ("8 - the image does answer 3 of the 4 criteria", 8.0),  # the leading score, not a number after "answer"
        ("The ranking ... Score 3 for now\n</think>\n9", 9.0),  # only the close tag is output (R1-style templates)
    ],
)
def test_parse_score_good(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "There are 3 cats and 2 dogs in the image.",  # ambiguous: two numbers, no marker
        "Score: 11/10",  # out of range
        "Score: 15",
        "The image is great!",
        '{"score": [8, 9]}',  # a list where one score is expected
    ],
)
def test_parse_score_bad(text):
    assert parse_score(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "The edit added 2 dogs but the background changed",  # a count in prose, not a score
        "There are 3 cats in the image",
        "2 dogs were added",  # leads, but it is a count: no punctuation after it
        "2-3 dogs were added",
        "Only 1 hat was added.",
        "Answer: there are 2 dogs",  # a marker, but no number right after it
    ],
)
def test_parse_score_lone_number_in_prose_is_not_a_score(text):
    assert parse_score(text) is None


def test_parse_score_custom_range():
    assert parse_score("Rating: 4", lo=1, hi=5) == 4.0
    assert parse_score("Rating: 7", lo=1, hi=5) is None
    assert parse_score("3 out of 5", lo=1, hi=5) == 3.0


# ---------------------------------------------------------------------------------------------- rubric

DIMS = ["identity", "background", "lighting", "style", "instruction following"]


def test_rubric_json_fenced_with_prose():
    text = (
        "Here is my assessment.\n```json\n"
        '{"identity": 8, "background": 9, "lighting": 7, "style": 10, "instruction_following": 6}\n```\n'
        "Overall a solid edit."
    )
    assert parse_rubric(text, DIMS) == {
        "identity": 8.0, "background": 9.0, "lighting": 7.0, "style": 10.0, "instruction following": 6.0,
    }


def test_rubric_nested_and_dict_values():
    text = '{"scores": {"Identity": {"score": 5, "reason": "face changed"}, "Background": [6]}, "summary": "meh"}'
    assert parse_rubric(text, DIMS) == {"identity": 5.0, "background": 6.0}


def test_rubric_markdown_lines_partial_and_out_of_range():
    text = (
        "1. **Identity**: 7/10 - the face is kept\n"
        "2. **Background**: 12/10\n"  # out of range: dropped
        "3. Lighting - 4\n"
        "4. Instruction-Following: 9\n"
    )
    assert parse_rubric(text, DIMS) == {"identity": 7.0, "lighting": 4.0, "instruction following": 9.0}


def test_rubric_chinese_punctuation_and_empty():
    assert parse_rubric("identity：８，background：６", DIMS) == {"identity": 8.0, "background": 6.0}
    assert parse_rubric("", DIMS) == {}
    assert parse_rubric("I refuse to answer.", DIMS) == {}


# ---------------------------------------------------------------------------------------------- yes/no


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", True),
        ("yes.", True),
        ("**No**, the sign says HELO.", False),
        ("YES, it matches", True),
        ('"No"', False),
        ("是的，图片与描述一致。", True),
        ("不是", False),
        ("The image shows a cat. Answer: no", False),
        ("After careful inspection, yes.", None),  # a yes/no word in prose is not a verdict; lead with it or say "Answer:"
        ("", None),
        ("Maybe.", None),
        ("Yes and no: the colour matches but the shape does not.", True),  # first word decides
        ("It is hard to say yes or no.", None),  # both, not first: contradictory
        ("Nothing is wrong", None),  # 'nothing' is not 'no'
        ("<think>\nThe sign says HELO, so no... wait, it says HELLO.\n</think>\n\nYes", True),  # after the reasoning
        ("<think>The sign says", None),  # cut off while thinking: no answer
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_yes_no_probability_sums_variants():
    lp = [{"Yes": math.log(0.5), " yes": math.log(0.1), "YES": math.log(0.1), "No": math.log(0.2), "▁no": math.log(0.1)}]
    r = yes_no_probability(lp, "Yes")
    assert r.source == "logprobs"
    assert r.p_yes == pytest.approx(0.7 / 1.0)


def test_yes_no_probability_skips_leading_tokens_and_ignores_others():
    lp = [
        {"**": -0.01, "The": -5.0},  # markdown first: no yes/no here
        {"Yes": math.log(0.3), "No": math.log(0.1), "Maybe": math.log(0.5)},
    ]
    r = yes_no_probability(lp, "**Yes**")
    assert r.p_yes == pytest.approx(0.75)  # renormalised over yes/no only; "Maybe" ignored


def test_yes_no_probability_reads_the_generated_answer_token():
    # "**" was generated first; its unlikely alternatives include Yes and No, which say nothing about the answer
    lp = [{"**": -0.01, "Yes": -5.0, "No": -4.6}, {"Yes": -0.001, "No": -7.0}, {"**": -0.01}]
    r = yes_no_probability(lp, "**Yes**")
    assert r.source == "logprobs" and r.p_yes == pytest.approx(1 / (1 + math.exp(-7.0 + 0.001)), abs=1e-6)
    # an answer that starts with another word ("Nice ... yes"): the text decides, a sampled "N" is not "no"
    r = yes_no_probability([{"N": -0.5, "Yes": -1.0}, {"ice": -0.1}], "Nice. Answer: yes")
    assert r.source == "text" and r.p_yes == 1.0


def test_yes_no_probability_text_fallback_and_failure():
    assert yes_no_probability(None, "No.").p_yes == 0.0
    assert yes_no_probability(None, "No.").source == "text"
    assert yes_no_probability([{"The": -0.1}], "yes").p_yes == 1.0  # no yes/no token -> text
    r = yes_no_probability([{"The": -0.1}], "The image shows a cat")
    assert r.p_yes is None and r.source == ""


def test_yes_no_probability_robust_to_bad_values():
    lp = [{"Yes": 1e-7, "No": float("-inf"), "yes": float("nan")}]  # rounding above 0, -inf, NaN
    r = yes_no_probability(lp, "Yes")
    assert r.p_yes == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [float("nan"), None, float("inf")])
def test_yes_no_probability_unreadable_answer_logprob_falls_back_to_text(bad):
    # skipping the generated "Yes" would leave only "No" with mass: P(yes) = 0, the opposite verdict
    lp = [{"Yes": bad, "No": math.log(0.1)}]
    r = yes_no_probability(lp, "Yes")
    assert r.source == "text" and r.p_yes == 1.0
    assert yes_no_probability([{"No": math.log(0.9), " yes": bad}], "No.").p_yes == 0.0  # any yes/no variant
    r = yes_no_probability(lp, "I cannot tell.")  # and the text gives no verdict either: abstain
    assert r.p_yes is None and r.source == ""
    # a bad value on a candidate that is neither yes nor no does not matter; -inf and +1e-7 are readable
    r = yes_no_probability([{"Yes": 1e-7, "No": float("-inf"), "Maybe": bad}], "Yes")
    assert r.source == "logprobs" and r.p_yes == pytest.approx(1.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Unclear; cannot determine with no context", None),  # a "no" inside a non-answer
        ("I see no hat, but yes, there is a dog.", None),
        ("The sign says NO ENTRY.", None),
        ("_Yes_", True),  # leading Markdown / punctuation is skipped
        ("- No, the cat is missing.", False),
        ("... yes", True),
        ("The hat is missing. Final answer: no", False),
        ("Verdict - yes", True),
    ],
)
def test_parse_yes_no_reads_only_a_leading_word_or_an_answer_marker(text, expected):
    assert parse_yes_no(text) == expected
    assert yes_no_probability(None, text).p_yes == (None if expected is None else float(expected))


# ---------------------------------------------------------------------------------------------- choice


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"),
        ("B", "B"),
        ("(B).", "B"),
        ("Image 1", "A"),
        ("image 2", "B"),
        ("**Image B**", "B"),
        ("Second", "B"),
        ("the first one", "A"),
        ("Tie", "tie"),
        ("Answer: B", "B"),
        ("Final answer - Image 1", "A"),
        ("I prefer the second image because the text is legible.", "B"),
        ("My choice is A.", "A"),
        ("A. The colours match the prompt better.", "A"),
        ("B is better: the dog is on the left as requested.", "B"),
        ("Image 2 is clearly better than Image 1.", "B"),
        ("The first image is better; the second has artifacts.", "A"),
        ("Image 1 is worse than Image 2 in text rendering.", "B"),
        ("Both images are equally good.", "tie"),
        ("They are the same.", "tie"),
        ("tie.", "tie"),
        ("Both", "tie"),
        ("Equal", "tie"),
        ("Answer: tie", "tie"),
        ("It's a tie: both show the dog on the left.", "tie"),
        ("They are equally good.", "tie"),
        ("Both are equally good.", "tie"),
        ("Neither is better.", "tie"),
        ("Same quality.", "tie"),
        ("```\nB\n```", "B"),
        ("Ａ", "A"),  # full-width letter
        ("答案：B", "B"),
        ("Only the second image shows a red square on the left.", "B"),
        ("B is worse than A.", "A"),  # the leading letter is the loser here
        ("A is worse: its text is garbled.", "B"),
        ("Both are good, but A is better.", "A"),  # a bare letter with a verdict beats the tie word
        ("A is better; B is worse.", "A"),
        ("A more accurate rendering is in image 2.", "B"),  # article "A", then one image named
    ],
)
def test_parse_choice_good(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        None,
        "A cat sits on a mat.",  # article, not a choice
        "Image 1 shows a dog and image 2 shows a cat.",  # both named, no verdict
        "I cannot decide.",
        "Candidate C",
    ],
)
def test_parse_choice_bad(text):
    assert parse_choice(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "Both images show a red square.",  # tie words describing the images, no verdict
        "A cat is on the left in both",
        "Both images are the same size.",
        "The same dog appears in each.",
    ],
)
def test_parse_choice_tie_word_in_prose_is_not_a_tie(text):
    assert parse_choice(text) is None


def test_parse_choice_answer_is_a_tie_is_not_option_a():
    assert parse_choice("My answer is a tie.") == "tie"  # the article "a" before "tie"
    assert parse_choice("The verdict is a draw") == "tie"
    assert parse_choice("My answer is A.") == "A"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A is not better than B", None),
        ("A isn't better than B.", None),
        ("Image 1 is not better than image 2.", None),
        ("The first image is not much better.", None),
        ("B is not worse than A", None),  # "worse" negated: not a win for A either
        ("A is no longer better after the edit.", None),
        ("Answer: B. A is not better than B.", "B"),  # an explicit marker still decides
        ("<think>A is not better than B? Hmm, image A has ...</think>B", "B"),  # the answer after a reasoning block
        ("Let me compare. A is better.\n</think>\n\nB", "B"),  # a reasoning block whose <think> was in the prompt
        ("B) A does not look better", "B"),  # so does a leading letter set off as the verdict
        ("A is better. B isn't better at all.", "A"),  # and a plain comparative beside a negated one
        ("Image A is better; image B is not better.", "A"),
    ],
)
def test_parse_choice_negated_comparative_is_not_a_verdict(text, expected):
    assert parse_choice(text) == expected


def test_tokens_with_the_same_text_count_once_each():
    """Two tokens that decode to the same text (byte-fallback pieces, duplicate vocabulary entries) are one
    candidate whose probability is the sum of theirs, in both backends' parsers; the generated token stays
    first, and its own log-prob is used when its text is not among the alternatives."""
    from imagerl.rewards.http_client import parse_chat_response
    from imagerl.rewards.judges.backend import position_logprobs

    alts = [("No", math.log(0.4)), ("Yes", math.log(0.35)), ("Yes", math.log(0.25))]
    d = position_logprobs("Yes", math.log(0.35), alts)
    assert list(d) == ["Yes", "No"]
    assert math.exp(d["Yes"]) == pytest.approx(0.6) and math.exp(d["No"]) == pytest.approx(0.4)
    assert yes_no_probability([d], "Yes").p_yes == pytest.approx(0.6)
    assert position_logprobs("Maybe", -3.0, alts)["Maybe"] == -3.0 and next(iter(position_logprobs("Maybe", -3.0, alts))) == "Maybe"
    assert position_logprobs("No", -0.5, [("No", -math.inf), ("No", -math.inf)])["No"] == -math.inf

    body = {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [
        {"token": "Yes", "logprob": math.log(0.35),
         "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alts]}]}}]}
    res = parse_chat_response(body)
    assert res.top_logprobs == [d]
    assert yes_no_probability(res.top_logprobs, res.text).p_yes == pytest.approx(0.6)  # 0.35 / 0.75 before
