"""VLM judge rewards: prompts, parsing, aggregation, failure accounting and concurrency.

The judge on the other side is `ScriptedBackend`, a scripted fake that answers with canned `ChatResult`s
computed from the request (it decodes the images it is sent). It exists only to test the judge logic in
imagerl.rewards.judges.rewards; the real HTTP and in-process backends are tested in their own files.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any, Callable

import pytest
import torch

from imagerl.rewards.base import build_reward, run_sync
from imagerl.rewards.judges.backend import ChatResult, JudgeError, data_uri_to_image
from imagerl.rewards.judges.rewards import EditJudge, PairwiseJudge, RubricJudge, VIEScoreJudge, YesNoJudge
from imagerl.types import RewardInput


class ScriptedBackend:
    """A scripted fake judge backend: `respond(request)` -> ChatResult (or an exception to raise).

    Records every request and the largest number of requests in flight at once.
    """

    def __init__(self, respond: Callable[["Request"], ChatResult | Exception], delay: float = 0.0):
        self.respond = respond
        self.delay = delay
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False

    async def chat(self, messages, *, max_tokens=64, temperature=0.0, top_logprobs=None) -> ChatResult:
        req = Request(messages, max_tokens, temperature, top_logprobs)
        self.requests.append(req)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            out = self.respond(req)
        finally:
            self.in_flight -= 1
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        self.closed = True


class Request:
    def __init__(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float, top_logprobs: int | None):
        self.messages = messages
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_logprobs = top_logprobs
        content = messages[-1]["content"]
        self.text = "\n".join(p["text"] for p in content if p["type"] == "text")
        self.images = [data_uri_to_image(p["image_url"]["url"]) for p in content if p["type"] == "image_url"]

    def brightness(self, k: int) -> float:
        img = self.images[k]
        return float(torch.tensor(list(img.getdata()), dtype=torch.float32).mean() / 255.0)


def flat_images(levels: list[float], size: int = 8) -> torch.Tensor:
    """[N,3,size,size] images of constant grey level (the scripted judge reads brightness back)."""
    return torch.stack([torch.full((3, size, size), v) for v in levels])


def lp(p_yes: float) -> list[dict[str, float]]:
    return [{"Yes": math.log(p_yes * 0.9), " yes": math.log(p_yes * 0.1), "No": math.log(1 - p_yes)}]


# ---------------------------------------------------------------------------------------------- yes/no


def test_yes_no_logprobs_text_fallback_and_failures():
    def respond(req: Request):
        if "cat" in req.text:
            return ChatResult("Yes", top_logprobs=lp(0.8))
        if "dog" in req.text:
            return ChatResult("No.", top_logprobs=None)  # no log-probs: text decides
        if "bird" in req.text:
            return ChatResult("I am not sure what this is.")  # unparseable
        return JudgeError("server gave up after 3 retries")

    backend = ScriptedBackend(respond)
    r = YesNoJudge(backend=backend, name="yn")
    inp = RewardInput(images=flat_images([0.1, 0.2, 0.3, 0.4]), prompts=["a cat", "a dog", "a bird", "a fish"],
                      metadata=[{}] * 4)
    out = r(inp)
    assert out.scores[0].item() == pytest.approx(0.8, abs=1e-6)
    assert out.scores[1].item() == 0.0
    assert math.isnan(out.scores[2].item()) and math.isnan(out.scores[3].item())
    assert out.details["parse_failures"] == 1
    assert out.details["request_failures"] == 1
    assert out.details["from_logprobs"] == 1 and out.details["from_text"] == 1
    assert out.details["abstained"] == 2
    # The request: one image that decodes to the sample, the prompt inside the template, log-probs asked
    req = next(q for q in backend.requests if "cat" in q.text)
    assert '"a cat"' in req.text and req.top_logprobs == 20 and req.temperature == 0.0
    assert len(req.images) == 1 and req.images[0].size == (8, 8)
    assert req.brightness(0) == pytest.approx(0.1, abs=2 / 255)


def test_yes_no_fallback_only_when_configured():
    backend = ScriptedBackend(lambda req: ChatResult("???"))
    inp = RewardInput(images=flat_images([0.5, 0.5]), prompts=["x", "y"], metadata=[{}] * 2)
    assert torch.isnan(YesNoJudge(backend=backend)(inp).scores).all()
    out = YesNoJudge(backend=backend, fallback=0.25)(inp)
    assert out.scores.tolist() == [0.25, 0.25]
    assert out.details["parse_failures"] == 2  # still counted


def test_requests_run_concurrently_bounded_by_max_concurrency():
    backend = ScriptedBackend(lambda req: ChatResult("yes"), delay=0.01)
    r = YesNoJudge(backend=backend, max_concurrency=6)
    n = 40
    inp = RewardInput(images=flat_images([0.5] * n, size=4), prompts=[f"p{i}" for i in range(n)], metadata=[{}] * n)
    out = run_sync(r.score_async(inp))
    assert out.scores.tolist() == [1.0] * n
    assert len(backend.requests) == n
    assert backend.max_in_flight == 6  # concurrent, and never more than the bound


def test_score_works_inside_a_running_event_loop():
    backend = ScriptedBackend(lambda req: ChatResult("no"))
    r = YesNoJudge(backend=backend)
    inp = RewardInput(images=flat_images([0.5]), prompts=["x"], metadata=[{}])

    async def main():
        return r.score(inp)  # blocking call from inside a loop (run_sync moves it to a thread)

    assert asyncio.run(main()).scores.tolist() == [0.0]


def test_close_closes_backend_and_bad_template_fails_at_build():
    backend = ScriptedBackend(lambda req: ChatResult("yes"))
    YesNoJudge(backend=backend).close()
    assert backend.closed
    with pytest.raises(ValueError, match="template.*promt"):
        YesNoJudge(backend=backend, template="Does it match {promt}?")


def test_build_reward_checks_judge_args_by_name():
    with pytest.raises(ValueError, match="max_concurency.*Did you mean 'max_concurrency'"):
        build_reward({"type": "yes_no_judge", "args": {"backend": {"type": "http"}, "max_concurency": 4}})
    with pytest.raises(ValueError, match="backend"):
        build_reward({"type": "viescore", "args": {}})


# ---------------------------------------------------------------------------------------------- VIEScore

SC_EDIT = {0.2: '{"reasoning": "ok", "score": [8, 6]}', 0.4: '```json\n{"score": [10, 9], "reasoning": "great"}\n```',
           0.6: '{"score": [7]}'}  # 0.6: wrong length for editing SC (needs 2) -> parse failure
PQ = {0.2: '{"score": [9, 4], "reasoning": "artifacts"}', 0.4: "｛“score”：［１０，８］｝", 0.6: '{"score": [5, 5]}'}


def viescore_judge(req: Request) -> ChatResult:
    out_level = round(req.brightness(len(req.images) - 1), 1)  # the judged image is shown last
    if "over-editing" in req.text:
        assert len(req.images) == 2 and req.brightness(0) == pytest.approx(0.9, abs=2 / 255)  # source first
        return ChatResult(SC_EDIT[out_level])
    if "naturalness" in req.text:
        assert "{{" not in req.text and "}}" not in req.text  # the judge sees single braces, as in its JSON example
        return ChatResult(PQ[out_level])
    if "follows the prompt" in req.text:
        return ChatResult('{"score": [6], "reasoning": "mostly"}')
    raise AssertionError(req.text)


def test_viescore_edit_matches_hand_computation():
    src = [torch.full((3, 8, 8), 0.9)] * 3
    inp = RewardInput(images=flat_images([0.2, 0.4, 0.6]), prompts=["make it grey"] * 3, metadata=[{}] * 3,
                      source_images=src)
    out = VIEScoreJudge(backend=ScriptedBackend(viescore_judge))(inp)
    assert out.scores[0].item() == pytest.approx(math.sqrt(6 * 4) / 10, abs=1e-6)
    assert out.scores[1].item() == pytest.approx(math.sqrt(9 * 8) / 10, abs=1e-6)
    assert math.isnan(out.scores[2].item())
    assert out.details["sc"][:2] == [6.0, 9.0] and out.details["pq"] == [4.0, 8.0, 5.0]
    assert out.details["parse_failures"] == 1 and out.details["requests"] == 6


def test_viescore_t2i_and_instruction_from_metadata():
    seen: list[str] = []

    def respond(req: Request) -> ChatResult:
        seen.append(req.text)
        return viescore_judge(req)

    inp = RewardInput(images=flat_images([0.2]), prompts=["a grey square"], metadata=[{}])
    out = VIEScoreJudge(backend=ScriptedBackend(respond))(inp)  # auto: no source images -> t2i
    assert out.scores[0].item() == pytest.approx(math.sqrt(6 * 4) / 10, abs=1e-6)
    assert any('"a grey square"' in t for t in seen)
    with pytest.raises(ValueError, match="source_images"):
        VIEScoreJudge(backend=ScriptedBackend(respond), task="edit")(inp)
    # editing: metadata["instruction"] wins over the prompt text
    seen.clear()
    inp2 = RewardInput(images=flat_images([0.2]), prompts=["caption"], metadata=[{"instruction": "darken it"}],
                       source_images=[torch.full((3, 8, 8), 0.9)])
    VIEScoreJudge(backend=ScriptedBackend(respond))(inp2)
    assert any('"darken it"' in t for t in seen)


# ---------------------------------------------------------------------------------------------- pairwise


def brighter_wins(req: Request) -> ChatResult:
    a, b = req.brightness(0), req.brightness(1)
    assert "Image A:" in req.text and "Image B:" in req.text
    if abs(a - b) < 0.05:
        return ChatResult("Tie")
    return ChatResult("Image 1" if a > b else "**B** is better")


def test_pairwise_win_rates_in_groups():
    # group 7: brightness 0.3, 0.9, 0.6 ; group 3: two equal images ; group 5: alone
    inp = RewardInput(images=flat_images([0.3, 0.9, 0.6, 0.5, 0.5, 0.1]), prompts=["p"] * 6, metadata=[{}] * 6,
                      group_ids=torch.tensor([7, 7, 7, 3, 3, 5]))
    backend = ScriptedBackend(brighter_wins)
    out = PairwiseJudge(backend=backend)(inp)
    s = out.scores.tolist()
    assert s[:5] == [0.0, 1.0, 0.5, 0.5, 0.5]
    assert math.isnan(s[5])  # nothing to compare with
    assert len(backend.requests) == (3 + 1) * 2  # all pairs, both orders
    assert out.details["order_checked"] == out.details["order_agreed"] == 4
    assert out.details["comparisons"] == [4.0, 4.0, 4.0, 2.0, 2.0, 0.0]


def test_pairwise_swap_cancels_position_bias():
    always_a = ScriptedBackend(lambda req: ChatResult("A"))
    inp = RewardInput(images=flat_images([0.3, 0.9, 0.6]), prompts=["p"] * 3, metadata=[{}] * 3,
                      group_ids=torch.tensor([1, 1, 1]))
    swapped = PairwiseJudge(backend=always_a)(inp)
    assert swapped.scores.tolist() == [0.5, 0.5, 0.5]
    assert swapped.details["order_checked"] == 3 and swapped.details["order_agreed"] == 0
    biased = PairwiseJudge(backend=always_a, swap=False)(inp)
    assert biased.scores.tolist() == [1.0, 0.5, 0.0]  # pairs (0,1),(0,2),(1,2): the first shown always wins


def test_pairwise_failures_and_missing_groups():
    def flaky(req: Request) -> ChatResult | Exception:
        if req.brightness(0) > 0.8 or req.brightness(1) > 0.8:
            return JudgeError("timeout")
        return ChatResult("the image on the left is lovely, I guess")  # unparseable ('left' but no verdict word)

    inp = RewardInput(images=flat_images([0.3, 0.9]), prompts=["p"] * 2, metadata=[{}] * 2,
                      group_ids=torch.tensor([0, 0]))
    out = PairwiseJudge(backend=ScriptedBackend(flaky))(inp)
    assert torch.isnan(out.scores).all()
    assert out.details["request_failures"] == 2
    with pytest.raises(ValueError, match="group_ids"):
        PairwiseJudge(backend=ScriptedBackend(flaky))(RewardInput(images=flat_images([0.3]), prompts=["p"], metadata=[{}]))


# ---------------------------------------------------------------------------------------------- rubric


def test_rubric_weighted_mean_partial_and_failure():
    answers = {
        0.2: '```json\n{"identity": 8, "background": 6, "lighting": 4}\n```',
        0.4: "identity: 10/10\nbackground: 5",  # lighting missing
        0.6: "identity: 9",  # only one
        0.8: "no idea",
    }
    seen: list[str] = []

    def respond(req: Request) -> ChatResult:
        seen.append(req.text)
        return ChatResult(answers[round(req.brightness(len(req.images) - 1), 1)])

    r = RubricJudge(backend=ScriptedBackend(respond), dimensions={"identity": 2.0, "background": 1.0, "lighting": 1.0},
                    min_dimensions=2)
    inp = RewardInput(images=flat_images([0.2, 0.4, 0.6, 0.8]), prompts=["edit"] * 4, metadata=[{}] * 4)
    out = r(inp)
    s = out.scores.tolist()
    assert s[0] == pytest.approx((2 * 8 + 6 + 4) / 4 / 10)
    assert s[1] == pytest.approx((2 * 10 + 5) / 3 / 10)  # mean over the dimensions found
    assert math.isnan(s[2]) and math.isnan(s[3])  # below min_dimensions / nothing
    assert out.details["parse_failures"] == 2 and out.details["incomplete_parses"] == 1
    assert out.details["identity"][:3] == [8.0, 10.0, 9.0]
    assert "- identity" in seen[0] and '"lighting": <0-10>' in seen[0]
    # default min_dimensions = all: the partial answer abstains
    strict = RubricJudge(backend=ScriptedBackend(respond), dimensions=["identity", "background", "lighting"])
    assert math.isnan(strict(inp).scores[1].item())
    with pytest.raises(ValueError, match="min_dimensions"):
        RubricJudge(backend=ScriptedBackend(respond), dimensions=["a"], min_dimensions=2)


def test_rubric_default_dimensions_shows_source_first():
    def respond(req: Request) -> ChatResult:
        assert len(req.images) == 2 and req.brightness(0) == pytest.approx(0.9, abs=2 / 255)
        dims = re.findall(r"^- (\w+):", req.text, flags=re.M)
        return ChatResult("{" + ", ".join(f'"{d}": {k + 5}' for k, d in enumerate(dims)) + "}")

    inp = RewardInput(images=flat_images([0.2]), prompts=["edit"], metadata=[{}], source_images=[torch.full((3, 8, 8), 0.9)])
    out = RubricJudge(backend=ScriptedBackend(respond))(inp)
    assert out.scores[0].item() == pytest.approx((5 + 6 + 7 + 8 + 9) / 5 / 10)


# ---------------------------------------------------------------------------------------------- edit judge


def edit_answers(req: Request) -> ChatResult:
    assert len(req.images) == 2
    follow = "carry out the instruction" in req.text and "Apart from" not in req.text
    level = round(req.brightness(1), 1)
    if req.top_logprobs:  # yes/no mode
        return ChatResult("Yes", top_logprobs=lp(0.9 if follow else level))
    return ChatResult(f"Score: {8 if follow else 4}/10" if level < 0.5 else ("7" if follow else "bad"))


@pytest.mark.parametrize("combine, expected", [("mean", 0.6), ("min", 0.4), ("product", 0.32)])
def test_edit_judge_score_mode(combine, expected):
    inp = RewardInput(images=flat_images([0.2, 0.6]), prompts=["add a hat"] * 2, metadata=[{}] * 2,
                      source_images=[torch.full((3, 8, 8), 0.9)] * 2)
    out = EditJudge(backend=ScriptedBackend(edit_answers), combine=combine)(inp)
    assert out.scores[0].item() == pytest.approx(expected)
    assert math.isnan(out.scores[1].item())  # preserve answer unparseable
    assert out.details["follow"] == [0.8, 0.7] and out.details["preserve"][0] == 0.4
    assert out.details["parse_failures"] == 1


def test_edit_judge_yes_no_mode_and_needs_sources():
    inp = RewardInput(images=flat_images([0.2, 0.6]), prompts=["add a hat"] * 2, metadata=[{}] * 2,
                      source_images=[torch.full((3, 8, 8), 0.9)] * 2)
    out = EditJudge(backend=ScriptedBackend(edit_answers), mode="yes_no", combine="min")(inp)
    assert out.scores.tolist() == pytest.approx([0.2, 0.6], abs=1e-5)
    with pytest.raises(ValueError, match="source_images"):
        EditJudge(backend=ScriptedBackend(edit_answers))(RewardInput(images=flat_images([0.2]), prompts=["x"], metadata=[{}]))
    with pytest.raises(ValueError, match="combine"):
        EditJudge(backend=ScriptedBackend(edit_answers), combine="sum")


# ---------------------------------------------------------------------------------------------- real backend


@pytest.mark.slow  # about 6-14 s on a loaded 2-core machine, mostly importing and building the tiny VLM
def test_yes_no_judge_end_to_end_with_the_in_process_tiny_vlm():
    """Wiring through the real in-process backend (a tiny random Qwen2.5-VL): its answers are random,
    so only the accounting is checked: every sample is either scored in [0, 1] or counted as a failure."""
    r = build_reward({"type": "yes_no_judge", "name": "judge",
                      "args": {"backend": {"type": "inprocess", "tiny": True}, "max_tokens": 4, "max_concurrency": 4}})
    try:
        n = 4
        inp = RewardInput(images=torch.rand(n, 3, 56, 56, generator=torch.Generator().manual_seed(0)),
                          prompts=[f"a red square {i}" for i in range(n)], metadata=[{}] * n)
        out = r(inp)
        d = out.details
        assert d["requests"] == n and d["request_failures"] == 0
        finite = ~torch.isnan(out.scores)
        assert ((out.scores[finite] >= 0) & (out.scores[finite] <= 1)).all()
        assert d["from_logprobs"] + d["from_text"] == int(finite.sum())
        assert d["parse_failures"] == n - int(finite.sum()) == d["abstained"]
        again = r(inp)  # greedy decoding: the same answers
        assert torch.equal(torch.nan_to_num(again.scores, nan=-1), torch.nan_to_num(out.scores, nan=-1))
    finally:
        r.close()


def test_transparent_images_reach_the_judge_on_white():
    # as transformers' processors (and so a vLLM judge) see them: transparency composited onto white, not black
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    im = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.save(buf, format="PNG")
    out = data_uri_to_image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)
