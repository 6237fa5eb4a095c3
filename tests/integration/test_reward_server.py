"""The reward server on loopback, end to end: real uvicorn, real rewards, a tiny real Qwen2.5-VL.

Checks that scores through HTTP equal the in-process scorer (on 8-bit images, which is what PNG carries),
that concurrent clients are coalesced into fewer scorer calls without mixing their groups, that the
OpenAI-compatible chat endpoint works with the official `openai` client (log-probs included), and that
bad input is rejected with a status and message naming the field and the fix.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagerl.rewards.base import Reward, RewardError, build_reward, run_sync  # noqa: E402
from imagerl.rewards.judges.backend import image_to_data_uri  # noqa: E402
from imagerl.rewards.remote import RemoteReward  # noqa: E402
from imagerl.rewards.server import RewardServer, ServerThread, encode_png  # noqa: E402
from imagerl.rewards.vlm_local import LocalVLMBackend  # noqa: E402
from imagerl.types import RewardInput, RewardOutput  # noqa: E402

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


class GroupCentredBrightness(Reward):
    """Mean brightness minus its group's mean: a real scorer whose answer depends on `group_ids`."""

    def score(self, inp: RewardInput) -> RewardOutput:
        b = inp.images.mean(dim=(1, 2, 3))
        out = torch.empty_like(b)
        for g in inp.group_ids.unique():
            m = inp.group_ids == g
            out[m] = b[m] - b[m].mean()
        return RewardOutput(out, {"group_count": len(inp.group_ids.unique())})


def q8(x: torch.Tensor) -> torch.Tensor:
    """What a PNG round trip keeps: 8 bits per channel."""
    return x.clamp(0, 1).mul(255).round().div(255)


def color_batch(n: int, seed: int = 0) -> RewardInput:
    g = torch.Generator().manual_seed(seed)
    imgs = q8(torch.rand(n, 3, 32, 32, generator=g))
    imgs[0] = 0
    imgs[0, 0, :, :16] = 1.0  # a red left half: color_position scores it high
    colors = ["red", "blue", "green", "yellow"]
    prompts = [f"a {colors[i % 4]} square on the left" if i % 3 else "an abstract thing" for i in range(n)]
    prompts[0] = "a red square on the left"
    return RewardInput(images=imgs, prompts=prompts, metadata=[{} for _ in range(n)],
                       group_ids=torch.arange(n) // 2)


def msg(img: torch.Tensor, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_to_data_uri(img)}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def rewards() -> dict[str, Reward]:
    return {
        "color_position": build_reward({"type": "color_position"}),
        "brightness": build_reward({"type": "brightness"}),
        "group_brightness": GroupCentredBrightness("group_brightness"),
    }


@pytest.fixture(scope="module")
def server(rewards):
    srv = RewardServer(rewards, max_batch=64, max_wait_ms=40, chat_backend=LocalVLMBackend(tiny=True, max_wait_ms=30))
    th = ServerThread(srv.app).start()
    yield srv, th.url
    th.stop()
    srv.close()


@pytest.fixture(scope="module")
def guarded(rewards):
    """A server with auth and tight limits."""
    os.environ["IMAGERL_TEST_SERVER_KEY"] = "s3cret-test-key"
    srv = RewardServer({"brightness": rewards["brightness"]}, api_key="s3cret-test-key", api_key_env="IMAGERL_TEST_SERVER_KEY",
                       max_request_bytes=20_000, max_image_pixels=48 * 48, chat_backend=None)
    th = ServerThread(srv.app).start()
    yield srv, th.url
    th.stop()
    srv.close()


# ---------------------------------------------------------------------------------------------------


def test_remote_scores_equal_in_process_and_abstain_is_nan(server, rewards):
    srv, url = server
    inp = color_batch(10)
    remote = RemoteReward(name="remote", url=url, rewards=["color_position"], batch_size=4)
    try:
        out = remote(inp)
        local = rewards["color_position"](inp).scores
        assert torch.equal(torch.isnan(out.scores), torch.isnan(local))
        assert torch.isnan(out.scores).any(), "prompts naming no colour must abstain, as NaN, through HTTP"
        ok = ~torch.isnan(local)
        torch.testing.assert_close(out.scores[ok], local[ok], atol=1e-6, rtol=0)
        assert out.scores[0] > 0.9
        assert out.details["failed_samples"] == 0 and out.details["failed_requests"] == 0
        assert remote.stats()["requests"] == 3  # 10 samples in chunks of 4
    finally:
        remote.close()


def test_remote_chunks_never_split_a_group(server, rewards):
    # groups of 3 in requests of at most 4: [0, 3), [3, 6), [6, 9), so the group-relative reward sees whole groups
    # and equals the in-process one (chunks cut every 4 samples would centre groups 1 and 2 on partial groups)
    from imagerl.rewards.remote import group_chunks

    assert group_chunks(torch.arange(9) // 3, 9, 4) == [(0, 3), (3, 6), (6, 9)]
    assert group_chunks(torch.tensor([0, 0, 1, 1, 1, 1, 1, 2]), 8, 4) == [(0, 2), (2, 7), (7, 8)]  # 5 > 4: alone
    assert group_chunks(None, 9, 4) == [(0, 4), (4, 8), (8, 9)]
    _, url = server
    inp = color_batch(9, seed=2)
    inp.group_ids = torch.arange(9) // 3
    remote = RemoteReward(name="remote", url=url, rewards=["group_brightness"], batch_size=4)
    try:
        out = remote(inp)
        assert remote.stats()["requests"] == 3
    finally:
        remote.close()
    torch.testing.assert_close(out.scores, rewards["group_brightness"](inp).scores, atol=1e-5, rtol=0)


class FailsOnBoom(Reward):
    """Brightness that raises on a sample whose metadata says boom: one client's bad input."""

    def score(self, inp: RewardInput) -> RewardOutput:
        if any(m.get("boom") for m in inp.metadata):
            raise ValueError("boom")
        return RewardOutput(inp.images.mean(dim=(1, 2, 3)), {})


def test_server_keeps_clients_and_groups_apart():
    """A request larger than max_batch is cut between groups, never inside one; requests without group ids are
    one group each even when coalesced with others; and a scorer failing on one client's input leaves the other
    clients' scores in the same batch alone."""
    srv = RewardServer({"group": GroupCentredBrightness("group"), "fragile": FailsOnBoom("fragile")},
                       max_batch=4, max_wait_ms=300, chat_backend=None)
    th = ServerThread(srv.app).start()
    try:
        inp = color_batch(6, seed=3)

        async def post(c, body):
            r = await c.post(f"{th.url}/v1/score", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        def body(rewards, inp, **extra):
            return {"rewards": rewards, "images": [encode_png(x) for x in inp.images], "prompts": inp.prompts, **extra}

        async def go():
            async with httpx.AsyncClient(timeout=20) as c:
                # 6 samples in groups of 3 with max_batch 4: chunks [0, 3) and [3, 6), each centred on its own group
                whole = await post(c, body(["group"], inp, group_ids=[0, 0, 0, 1, 1, 1]))
                # two concurrent clients without group ids: each is its own group in the shared batch
                a, b = color_batch(2, seed=4), color_batch(2, seed=5)
                pair = await asyncio.gather(post(c, body(["group"], a)), post(c, body(["group"], b)))
                # concurrent clients, one with a bad sample: only that client's scores abstain
                good, bad = color_batch(2, seed=6), color_batch(2, seed=7)
                mixed = await asyncio.gather(post(c, body(["fragile"], good)),
                                             post(c, body(["fragile"], bad, metadata=[{}, {"boom": True}])))
                return whole, a, b, pair, good, mixed

        whole, a, b, pair, good, mixed = asyncio.run(go())
        inp.group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
        torch.testing.assert_close(torch.tensor(whole["scores"]["group"]), GroupCentredBrightness("g")(inp).scores,
                                   atol=1e-5, rtol=0)
        for x, o in ((a, pair[0]), (b, pair[1])):
            x.group_ids = torch.zeros(2, dtype=torch.long)
            torch.testing.assert_close(torch.tensor(o["scores"]["group"]), GroupCentredBrightness("g")(x).scores,
                                       atol=1e-5, rtol=0)
        assert srv.batcher.num_batches < 6  # (the concurrent requests did share scorer calls)
        torch.testing.assert_close(torch.tensor(mixed[0]["scores"]["fragile"]), good.images.mean(dim=(1, 2, 3)),
                                   atol=1e-5, rtol=0)
        assert mixed[1]["scores"]["fragile"] == [None, None] and "boom" in mixed[1]["details"]["fragile"]["error"]
        assert "error" not in mixed[0]["details"]["fragile"]
        # the trainer's client: a scorer that raised on the server counts as failed, with the server's error (it
        # read only the scores before: silent abstains, failed_samples 0)
        bad = color_batch(2, seed=7)
        bad.metadata = [{}, {"boom": True}]
        remote = RemoteReward(name="fragile", url=th.url, rewards=["fragile"])
        try:
            out = remote(bad)
        finally:
            remote.close()
        assert torch.isnan(out.scores).all() and out.details["failed_samples"] == 2
        assert out.details["last_error"] == "reward 'fragile' failed on the server: ValueError: boom"
    finally:
        th.stop()
        srv.close()


def test_several_names_combine_nan_aware_and_report_components(server, rewards):
    _, url = server
    inp = color_batch(6, seed=1)
    remote = RemoteReward(name="r", url=url, rewards=["color_position", "brightness"], weights={"brightness": 2.0})
    try:
        out = run_sync(remote.score_async(inp))
    finally:
        remote.close()
    cp, br = rewards["color_position"](inp).scores, rewards["brightness"](inp).scores
    torch.testing.assert_close(out.details["brightness"], br, atol=1e-6, rtol=0)
    both = ~torch.isnan(cp)
    torch.testing.assert_close(out.scores[both], cp[both] + 2 * br[both], atol=1e-5, rtol=0)
    # where color_position abstains, it counts as its group's mean (the batch's when the whole group abstained),
    # never a 0 stand-in: the same rule as the top-level rewards
    from imagerl.algorithms.advantages import impute_group_means

    filled = impute_group_means(torch.stack([cp, br], 1), inp.group_ids)[:, 0]
    assert (~both).any() and torch.isfinite(filled).all()
    torch.testing.assert_close(out.scores[~both], filled[~both] + 2 * br[~both], atol=1e-5, rtol=0)


def test_concurrent_clients_are_coalesced_without_mixing_groups(server, rewards):
    srv, url = server
    inps = [color_batch(4, seed=s) for s in range(6)]  # every client uses group ids 0, 0, 1, 1
    batches0, score0 = srv.batcher.num_batches, srv.requests["score"]

    async def go() -> list[dict]:
        async with httpx.AsyncClient(timeout=20) as c:
            async def one(inp: RewardInput) -> dict:
                r = await c.post(f"{url}/v1/score", json={
                    "rewards": ["group_brightness", "brightness"], "images": [encode_png(x) for x in inp.images],
                    "prompts": inp.prompts, "group_ids": inp.group_ids.tolist()})
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(i) for i in inps))

    outs = asyncio.run(go())
    assert srv.requests["score"] - score0 == 6
    assert srv.batcher.num_batches - batches0 < 6, "concurrent requests should share scorer calls"
    for inp, o in zip(inps, outs):
        expect = rewards["group_brightness"](inp).scores
        torch.testing.assert_close(torch.tensor(o["scores"]["group_brightness"]), expect, atol=1e-5, rtol=0)
        assert o["details"]["group_brightness"]["batch_size"] >= 4


def test_health_lists_rewards_and_queue(server):
    srv, url = server
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok"
    assert set(h["rewards"]) == {"color_position", "brightness", "group_brightness"}
    assert h["chat_model"] == "tiny-qwen2.5-vl"
    assert h["queue_depth"] == 0


def test_openai_client_chat_completions_with_logprobs(server):
    import openai

    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
    assert [m.id for m in client.models.list().data] == ["tiny-qwen2.5-vl"]
    img = q8(torch.rand(3, 40, 56))
    r = client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "Is this red? Answer yes or no."),
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=4)
    ch = r.choices[0]
    assert isinstance(ch.message.content, str) and ch.finish_reason in ("stop", "length")
    lp = ch.logprobs.content
    assert len(lp) == r.usage.completion_tokens and 1 <= len(lp) <= 5
    for pos in lp:
        assert len(pos.top_logprobs) == 4
        vals = [t.logprob for t in pos.top_logprobs]
        assert vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)
        # greedy decoding picks the most likely token, so it heads its own top-k list
        assert pos.top_logprobs[0].logprob == pytest.approx(pos.logprob, abs=1e-6)
    # the probabilities are a real distribution: top-4 mass is below 1
    assert sum(math.exp(t.logprob) for t in lp[0].top_logprobs) < 1.0
    # each token's bytes are its raw bytes (part of a character included): joined, they are the reply's text
    local = server[0].chat
    ids = local.tokenizer.encode("是 yes")
    assert bytes(b for i in ids for b in local._tok_bytes(i)).decode() == "是 yes"
    assert local._tok_text(ids[0]) == "\ufffd" and local._tok_bytes(ids[0]) == [230]  # 是 = e6 98 af
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-qwen2.5-vl'"):
        client.chat.completions.create(model="gpt-4o", messages=msg(img, "hi"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=2, n=2)
    # what the server does not do is refused with the documented reason, never silently ignored
    with pytest.raises(openai.BadRequestError, match="stream=true is not supported"):
        client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="stop sequences are not supported"):
        client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=2, stop=["."])
    with pytest.raises(openai.BadRequestError, match=r"max_tokens=0 must be an integer in \[1, 32768\]"):  # (was: 64)
        client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=0)
    # settings that would change the answer and are not implemented are refused, never ignored; neutral ones pass
    with pytest.raises(openai.BadRequestError, match=r"'logit_bias' is not supported by this server"):
        client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=2, logit_bias={"9": 5})
    with pytest.raises(openai.BadRequestError, match=r"'repetition_penalty' is not supported"):
        client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=2,
                                       extra_body={"repetition_penalty": 1.05})
    client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=2, frequency_penalty=0,
                                   extra_body={"top_k": -1}, response_format={"type": "text"}, tool_choice="none")
    with pytest.raises(openai.BadRequestError, match=r"'ignore_eos' is not supported"):
        client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=2,
                                       extra_body={"ignore_eos": True})
    # top_k 1 (the judge client's documented extra_body for vLLM) is greedy: the same answer as temperature 0
    g1 = client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=4, temperature=1.0,
                                        extra_body={"top_k": 1}).choices[0].message.content
    g0 = client.chat.completions.create(model="tiny-qwen2.5-vl", messages=msg(img, "hi"), max_tokens=4,
                                        temperature=0).choices[0].message.content
    assert g1 == g0
    bad = [({"seed": 2**70}, r"seed=1180591620717411303424 must be an integer"), ({"seed": 1.5}, r"seed=1.5 must be"),
           ({"logprobs": "false"}, r"logprobs='false' must be true or false"),
           ({"max_tokens": 2.7}, r"max_tokens=2.7 must be an integer"),
           ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
            r"messages\[0\].content\[0\].text must be a string, got NoneType")]
    for extra, match in bad:
        body = {"model": "tiny-qwen2.5-vl", "messages": msg(img, "hi"), "max_tokens": 2, **extra}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=20)
        assert r.status_code == 400 and re.search(match, r.json()["error"]["message"]), (extra, r.text)
    # a null max_completion_tokens (clients send null fields) leaves max_tokens in charge
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-qwen2.5-vl", "messages": msg(img, "hi"),
                                                      "max_tokens": 3, "max_completion_tokens": None}, timeout=20)
    assert r.json()["usage"]["completion_tokens"] <= 3
    # and it fetches nothing: an image by URL (not an inline data: URL) is a 400, naming the field
    remote_img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}},
                                               {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[0\].*only base64 'data:image"):
        client.chat.completions.create(model="tiny-qwen2.5-vl", messages=remote_img, max_tokens=2)


def test_http_judge_equals_in_process_judge_and_batches(server):
    """The same tiny weights (same seed) in-process and behind our server give the same greedy answer and
    log-probs, also when concurrent requests were batched together (left padding must not change them)."""
    from imagerl.rewards.http_client import OpenAIChatBackend

    srv, url = server
    local = LocalVLMBackend(tiny=True, max_batch=1)
    http = OpenAIChatBackend(base_urls=url, timeout=20)
    imgs = [q8(torch.rand(3, 32 + 8 * i, 48)) for i in range(4)]
    texts = ["Is it red?", "Does the image show a circle? Answer yes or no.", "yes", "Rate the image from 0 to 10"]
    chat0 = srv.requests["chat"]
    batches0 = srv.chat._batcher.num_batches

    async def go():
        return await asyncio.gather(*(http.chat(msg(im, t), max_tokens=4, top_logprobs=3) for im, t in zip(imgs, texts)))

    try:
        remote_res = asyncio.run(go())
        assert http.model == "tiny-qwen2.5-vl"  # picked from /v1/models
        for im, t, rr in zip(imgs, texts, remote_res):
            lr = local.complete_sync(msg(im, t), max_tokens=4, top_logprobs=3).to_chat_result(True)
            assert rr.text == lr.text
            assert len(rr.top_logprobs) == len(lr.top_logprobs)
            for a, b in zip(rr.top_logprobs, lr.top_logprobs):
                assert a.keys() == b.keys()
                for k in a:
                    assert a[k] == pytest.approx(b[k], abs=1e-4)
        assert srv.requests["chat"] - chat0 == 4
        assert srv.chat._batcher.num_batches - batches0 < 4
    finally:
        http.close()
        local.close()


def test_sampled_decoding_is_seeded(server):
    import openai

    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
    m = msg(q8(torch.rand(3, 32, 32)), "Describe the image.")

    def ask(seed: int):
        r = client.chat.completions.create(model="tiny-qwen2.5-vl", messages=m, max_tokens=8, temperature=1.0,
                                           seed=seed, logprobs=True, top_logprobs=1)
        return r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content]

    a, b = ask(1), ask(1)
    assert a == b, "same seed, same sample"
    others = {ask(s)[0] for s in range(2, 6)}
    assert len(others | {a[0]}) > 1, "different seeds should give different samples from a near-uniform tiny model"
    greedy = client.chat.completions.create(model="tiny-qwen2.5-vl", messages=m, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=1).choices[0].logprobs.content
    # log-probs are of the model, not the sampler: every sampled token is at most as likely as the greedy choice
    assert all(lp <= g.top_logprobs[0].logprob + 1e-5 for lp, g in zip(a[1][:1], greedy[:1]))


def test_seeded_samples_do_not_depend_on_what_they_were_coalesced_with():
    """A seeded sampled request gives the same text alone and when it arrives together with other requests (each row
    draws from its own generator), without touching torch's global RNG (process-wide: the trainer's stream, and on a
    GPU every CUDA generator); a text carrying image placeholders fails alone, not the image request next to it."""
    b = LocalVLMBackend(tiny=True, max_batch=8, max_wait_ms=200)
    m = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    kw = dict(max_tokens=8, temperature=1.0)

    img = q8(torch.rand(3, 32, 32))

    async def go():
        alone = await b.complete(m("Describe it."), seed=1, **kw)
        together = await asyncio.gather(b.complete(m("Something else"), seed=7, **kw),
                                        b.complete(m("Describe it."), seed=1, **kw))
        bad = "<|vision_start|><|image_pad|><|vision_end|> what is this?"
        mixed = await asyncio.gather(b.complete(m(bad), max_tokens=2), b.complete(msg(img, "Describe."), max_tokens=2),
                                     return_exceptions=True)
        return alone, together, mixed

    state = torch.get_rng_state()
    try:
        alone, together, mixed = asyncio.run(go())
    finally:
        b.close()
    assert torch.equal(torch.get_rng_state(), state)
    assert together[1].text == alone.text
    assert isinstance(mixed[0], ValueError) and "image placeholders" in str(mixed[0])
    assert not isinstance(mixed[1], BaseException) and mixed[1].text is not None


def test_oversized_chat_images_are_refused_from_their_header():
    # a 14000 x 14000 PNG is a few KB: decoding it first (280 MiB for 9000 x 9000, inside the generation worker) is
    # what the pixel limit is for; without a limit PIL's own ceiling is an ImageTooLargeError (413), not a 400
    import io

    from PIL import Image

    from imagerl.rewards.judges.backend import ImageTooLargeError, data_uri_to_image

    def uri_of(side: int) -> str:
        buf = io.BytesIO()
        Image.new("1", (side, side)).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    uri = uri_of(9000)
    with pytest.raises(ImageTooLargeError, match=r"image is 9000x9000 = 81000000 pixels, over the limit of 1000000"):
        data_uri_to_image(uri, max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError, match=r"too large to decode"):
        data_uri_to_image(uri_of(14000))
    from imagerl.rewards.vlm_local import split_messages

    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]
    with pytest.raises(ImageTooLargeError, match=r"^messages\[0\].content\[0\]: image is 9000x9000"):
        split_messages(msgs, 1_000_000)


def test_sampling_leaves_another_threads_random_stream_alone():
    # the trainer draws from torch's global generator while the scoring thread runs judge requests: a seeded sample
    # that reseeded the global generator (process-wide) broke the trainer's stream mid-sequence
    import threading

    b = LocalVLMBackend(tiny=True, max_wait_ms=0)
    torch.manual_seed(123)
    want = torch.rand(3000).tolist()
    got: list[float] = []
    done = threading.Event()

    def draw():
        torch.manual_seed(123)
        while len(got) < 3000:
            got.append(float(torch.rand(1)))
        done.set()

    try:
        th = threading.Thread(target=draw)
        th.start()
        while not done.is_set():
            b.complete_sync([{"role": "user", "content": "Describe it."}], max_tokens=4, temperature=1.0, seed=5)
        th.join()
    finally:
        b.close()
    assert got == want


def test_greedy_answers_ignore_the_checkpoints_sampling_settings(tmp_path):
    # Qwen2.5-VL-Instruct ships a generation_config with repetition_penalty 1.05 (and top_k / top_p): greedy must stay
    # the argmax of the model's distribution, which is what the log-probs report; a tiny temperature is greedy too
    tiny = LocalVLMBackend(tiny=True, max_wait_ms=0)
    tiny.model.generation_config.repetition_penalty = 2.0
    tiny.model.generation_config.no_repeat_ngram_size = 1
    for part in (tiny.model, tiny.tokenizer, tiny.image_processor):
        part.save_pretrained(tmp_path)
    tiny.close()
    b = LocalVLMBackend(model=str(tmp_path), max_wait_ms=0)
    try:
        for t in (0.0, 1e-45):  # (1e-45 overflowed into NaN probabilities: a 500)
            g = b.complete_sync([{"role": "user", "content": "Say something, and say it again."}], max_tokens=12,
                                temperature=t, top_logprobs=1)
            assert len(g.tokens) > 3 and all(tok.top[0][0] == tok.token for tok in g.tokens)
    finally:
        b.close()


def test_local_vlm_loads_a_saved_checkpoint_directory(tmp_path):
    """The real loading path (a local directory with model, tokenizer and image-processor files), checked
    against the tiny model it was saved from: same greedy answer and log-probs."""
    tiny = LocalVLMBackend(tiny=True, max_wait_ms=0)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    tiny.image_processor.save_pretrained(tmp_path)
    loaded = LocalVLMBackend(model=str(tmp_path), max_wait_ms=0)
    try:
        assert loaded.served_name == str(tmp_path)
        m = msg(q8(torch.rand(3, 36, 36)), "Is it red?")
        a = tiny.complete_sync(m, max_tokens=4, top_logprobs=3)
        b = loaded.complete_sync(m, max_tokens=4, top_logprobs=3)
        assert a.text == b.text and a.prompt_tokens == b.prompt_tokens
        for x, y in zip(a.tokens, b.tokens):
            assert x.token == y.token and x.logprob == pytest.approx(y.logprob, abs=1e-5)
    finally:
        tiny.close()
        loaded.close()
    with pytest.raises(ValueError, match="tiny: true"):
        LocalVLMBackend()


def leaning_yes(backend: LocalVLMBackend, margin: float = 1.0):
    """The tiny random VLM answers neither yes nor no; set its 'yes' logit 30 above the largest and its 'No' logit
    `margin` below that (a forward hook on the real model's lm_head), so it answers 'yes' with
    P(yes) / (P(yes) + P(no)) = sigmoid(margin) whatever the image: the served log-probs then reach the judge's P(yes)
    through the real path. Returns the hook's handle (remove() it)."""
    (yes,), (no,) = (backend.tokenizer.encode(w, add_special_tokens=False) for w in ("yes", "No"))

    def shift(_mod, _inp, logits):
        top = logits.max(-1).values
        logits = logits.clone()
        logits[..., yes] = top + 30.0
        logits[..., no] = top + 30.0 - margin
        return logits

    return backend.model.lm_head.register_forward_hook(shift)


def test_yes_no_judge_through_our_chat_endpoint(server):
    """The judge reward with an `http` backend pointed at our server: every sample gets a request, and the served
    top_logprobs give P(yes) (the tiny judge made to lean yes by a known margin)."""
    srv, url = server
    judge = build_reward({"type": "yes_no_judge", "args": {"backend": {"type": "http", "base_urls": [f"{url}/v1"], "timeout": 20},
                                                           "top_logprobs": 5}})
    inp = color_batch(3)
    hook = leaning_yes(srv.chat)
    try:
        out = judge(inp)
    finally:
        hook.remove()
        judge.close()
    assert out.details["requests"] == 3 and out.details["request_failures"] == 0
    assert out.details["from_logprobs"] == 3 and out.details["abstained"] == 0
    torch.testing.assert_close(out.scores, torch.full((3,), 1 / (1 + math.exp(-1.0))), atol=1e-4, rtol=0)


def test_yes_no_judge_served_by_score_endpoint():
    judge = build_reward({"type": "yes_no_judge", "name": "judge",
                          "args": {"backend": {"type": "inprocess", "tiny": True}, "top_logprobs": 5}})
    srv = RewardServer({"judge": judge}, max_wait_ms=1)
    inp = color_batch(2)
    hook = leaning_yes(judge.backend, margin=2.0)
    try:
        with ServerThread(srv.app) as url:
            r = httpx.post(f"{url}/v1/score", json={"images": [encode_png(x) for x in inp.images], "prompts": inp.prompts},
                           timeout=30)
        assert r.status_code == 200, r.text
        d = r.json()
        assert len(d["scores"]["judge"]) == 2
        assert d["details"]["judge"]["requests"] == 2 and d["details"]["judge"]["request_failures"] == 0
        assert d["scores"]["judge"] == pytest.approx([1 / (1 + math.exp(-2.0))] * 2, abs=1e-4)
    finally:
        hook.remove()
        srv.close()


def test_work_of_a_client_that_hung_up_is_dropped_from_the_queue():
    # a client that timed out (and would retry) leaves; its request, still queued behind a slow batch, is not scored
    calls: list[int] = []

    class Slow(Reward):
        def score(self, inp):
            calls.append(len(inp))
            time.sleep(1.0)
            return RewardOutput(scores=inp.images.float().mean((1, 2, 3)))

    srv = RewardServer({"slow": Slow("slow")}, max_wait_ms=0)
    body = {"images": [_png(8, 8)] * 2, "prompts": ["a", "b"]}

    async def three():
        async with httpx.AsyncClient(timeout=0.4) as c:
            first = asyncio.ensure_future(c.post(f"{url}/v1/score", json=body))
            await asyncio.sleep(0.15)  # (its batch is running: the next two queue behind it)
            rest = [c.post(f"{url}/v1/score", json=body) for _ in range(2)]
            return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        with ServerThread(srv.app) as url:
            res = asyncio.run(three())
            assert all(isinstance(r, httpx.TimeoutException) for r in res)
            time.sleep(1.5)  # the first batch finishes; the two queued requests' clients are gone by then
            assert calls == [2]
            assert httpx.post(f"{url}/v1/score", json=body, timeout=10).status_code == 200  # (and it still serves)
    finally:
        srv.close()


def test_broken_scorer_abstains_with_error_and_server_survives(server):
    class Broken(Reward):
        def score(self, inp):
            raise RuntimeError("scorer exploded")

    srv = RewardServer({"broken": Broken("broken"), "brightness": build_reward({"type": "brightness"})}, max_wait_ms=1)
    inp = color_batch(2)
    try:
        with ServerThread(srv.app) as url:
            body = {"images": [encode_png(x) for x in inp.images], "prompts": inp.prompts}
            d = httpx.post(f"{url}/v1/score", json=body, timeout=10).json()
            assert d["scores"]["broken"] == [None, None]
            assert "scorer exploded" in d["details"]["broken"]["error"]
            assert all(isinstance(s, float) for s in d["scores"]["brightness"])
            assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        srv.close()


def test_ocr_reward_through_the_server():
    """The real OCR engine behind /v1/score: rendered text is read, and HTTP equals in-process."""
    pytest.importorskip("rapidocr", reason="OCR extra not installed: pip install 'imagerl[ocr]'")
    from PIL import Image, ImageDraw, ImageFont

    def render(text: str) -> torch.Tensor:
        img = Image.new("RGB", (360, 80), "white")
        ImageDraw.Draw(img).text((10, 15), text, fill="black", font=ImageFont.load_default(size=40))
        return torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1).float() / 255

    imgs = torch.stack([render("HELLO WORLD"), render("HELLO WORLD"), render("GRPO 2026")])
    inp = RewardInput(images=imgs, prompts=['a sign that says "HELLO WORLD"', 'a sign that says "GOODBYE"', "no quotes here"],
                      metadata=[{}, {}, {}])
    ocr = build_reward({"type": "ocr"})
    srv = RewardServer({"ocr": ocr}, max_wait_ms=1)
    try:
        local = ocr(inp).scores
        with ServerThread(srv.app) as url:
            remote = RemoteReward(url=url, rewards=["ocr"])
            try:
                out = remote(inp)
            finally:
                remote.close()
    finally:
        srv.close()
    assert out.scores[0] > 0.9 and out.scores[1] < 0.6, out.scores
    assert math.isnan(out.scores[2])  # nothing quoted: OCR abstains
    torch.testing.assert_close(out.scores, local, equal_nan=True)


# --------------------------------------------------------------------------- auth, limits, bad input


def _png(h: int, w: int) -> str:
    return encode_png(torch.rand(3, h, w))


def test_auth_rejects_missing_and_wrong_key_with_clear_message(guarded):
    _, url = guarded
    body = {"images": [_png(8, 8)], "prompts": ["a"]}
    r = httpx.post(f"{url}/v1/score", json=body)
    assert r.status_code == 401
    assert "Authorization: Bearer" in r.json()["error"]["message"] and "IMAGERL_TEST_SERVER_KEY" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and "wrong API key" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": "Bearer s3cret-test-key"})
    assert r.status_code == 200 and len(r.json()["scores"]["brightness"]) == 1
    assert httpx.get(f"{url}/health").status_code == 200  # health stays open for load balancers


def test_remote_reward_with_key_from_env(guarded, rewards):
    _, url = guarded
    inp = RewardInput(images=q8(torch.rand(2, 3, 16, 16)), prompts=["a", "b"], metadata=[{}, {}])
    ok = RemoteReward(name="b", url=url, rewards=["brightness"], api_key_env="IMAGERL_TEST_SERVER_KEY")
    os.environ["IMAGERL_WRONG_KEY"] = "wrong"
    bad = RemoteReward(name="b", url=url, rewards=["brightness"], api_key_env="IMAGERL_WRONG_KEY", retries=3)
    try:
        torch.testing.assert_close(ok(inp).scores, rewards["brightness"](inp).scores, atol=1e-6, rtol=0)
        # a wrong key is the same for every request: the run stops with the fix (abstaining on every sample would
        # silently drop this reward's signal when others stand beside it)
        with pytest.raises(RewardError, match=r"remote reward 'b': .*HTTP 401 .*Check rewards\[b\]\.args\.api_key_env"):
            bad(inp)
        assert bad.stats()["attempts"] == 1, "a 401 must not be retried"
        # so is a request over the server's size limit
        big = RewardInput(images=torch.rand(4, 3, 48, 48), prompts=list("abcd"), metadata=[{}] * 4)
        with pytest.raises(RewardError, match=r"HTTP 413 .*Lower args.batch_size .* server.max_request_bytes"):
            ok(big)
    finally:
        ok.close()
        bad.close()
    with pytest.raises(ValueError, match="IMAGERL_NOT_SET_ANYWHERE is not set"):
        RemoteReward(url=url, api_key_env="IMAGERL_NOT_SET_ANYWHERE")


def test_size_limits_and_bad_input_name_the_field(guarded, monkeypatch):
    _, url = guarded
    monkeypatch.setenv("IMAGERL_TEST_SERVER_KEY", "s3cret-test-key")
    h = {"Authorization": "Bearer s3cret-test-key"}

    def post(body=None, **kw):
        return httpx.post(f"{url}/v1/score", json=body, headers=h, **kw) if body is not None else httpx.post(f"{url}/v1/score", headers=h, **kw)

    r = post({"images": [_png(64, 64)], "prompts": ["a"]})  # 4096 px > 48*48
    assert r.status_code == 413
    m = r.json()["error"]["message"]
    assert "images[0]" in m and "2304" in m and "server.max_image_pixels" in m
    # through the remote reward: the run stops with the server's fix alone (not "lower args.batch_size")
    rr = RemoteReward(url=url, rewards=["brightness"], api_key_env="IMAGERL_TEST_SERVER_KEY", timeout=5)
    try:
        with pytest.raises(RewardError, match=r"server.max_image_pixels\); downscale the images or raise "
                                              r"server.max_image_pixels\.$"):
            rr(RewardInput(images=torch.rand(1, 3, 64, 64), prompts=["a"], metadata=[{}]))
    finally:
        rr.close()
    r = post({"images": [_png(48, 48)] * 6, "prompts": ["a"] * 6})  # ~6 x 9 KB of base64 > 20 KB
    assert r.status_code == 413 and "server.max_request_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must hold on a streamed body too
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(f"{url}/v1/score", content=chunks(), headers=h)
    assert r.status_code == 413
    corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10).decode()
    r = post({"images": [_png(8, 8), corrupt], "prompts": ["a", "b"]})
    assert r.status_code == 400 and "images[1]" in r.json()["error"]["message"]
    r = post({"images": [_png(8, 8), "not base64!!"], "prompts": ["a", "b"]})
    assert r.status_code == 400 and "images[1] is not valid base64" in r.json()["error"]["message"]
    r = post({"images": [_png(8, 8), _png(8, 16)], "prompts": ["a", "b"]})
    assert r.status_code == 400 and "images[1]" in r.json()["error"]["message"]
    r = post({"images": [_png(8, 8)], "prompts": ["a", "b"]})
    assert r.status_code == 400 and "prompts must be a list of 1" in r.json()["error"]["message"]
    r = post({"images": [_png(8, 8)], "prompts": ["a"], "rewards": ["clip"]})
    assert r.status_code == 400 and "['clip']" in r.json()["error"]["message"] and "brightness" in r.json()["error"]["message"]
    r = post({"images": [_png(8, 8)], "prompt": ["a"]})
    assert r.status_code == 400 and "unknown field" in r.json()["error"]["message"]
    r = post(content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, headers=h)
    assert r.status_code == 404 and "server.chat" in r.json()["error"]["message"]


def test_chat_rejects_oversized_and_corrupt_images(server):
    srv, url = server
    old = srv.chat.max_image_pixels
    srv.chat.max_image_pixels = 32 * 32
    try:
        big = msg(torch.rand(3, 40, 40), "hi")
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": big, "max_tokens": 2}, timeout=20)
        assert r.status_code == 413 and "1600 pixels" in r.json()["error"]["message"]
    finally:
        srv.chat.max_image_pixels = old
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": bad, "max_tokens": 2}, timeout=20)
    assert r.status_code == 400 and "messages[0].content[0]" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- the CLI entry


def test_demo_config_builds_a_working_server():
    """configs/reward_server_demo.yaml through the same path as `imagerl serve-reward` (load_config +
    build_server), served in-process."""
    from imagerl.config import load_config
    from imagerl.rewards.server import build_server

    cfg = load_config(REPO / "configs/reward_server_demo.yaml", ["model.tiny=true", "server.max_wait_ms=1"])
    srv = build_server(cfg)
    try:
        assert {"brightness", "color_position", "ocr", "judge"} <= set(srv.rewards)
        assert srv.chat is not None and srv.api_key is None
        with ServerThread(srv.app) as url:
            remote = RemoteReward(url=url, rewards=["color_position", "judge"])
            try:
                out = remote(color_batch(3))
            finally:
                remote.close()
        assert out.details["failed_samples"] == 0
        assert out.details["judge"].shape == (3,)
        assert out.scores[0] >= 0.4  # color_position ~0.99 weighs in even if the random judge abstains
    finally:
        srv.close()


@pytest.mark.slow
def test_serve_reward_cli_entry_serves_demo_config():
    """`python -m imagerl.serve configs/reward_server_demo.yaml` (what `imagerl serve-reward` calls) comes up,
    serves the demo rewards and the tiny chat judge, and a RemoteReward scores against it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # server.port=0: any free port, which the start line names
    proc = subprocess.Popen([sys.executable, "-m", "imagerl.serve", str(REPO / "configs/reward_server_demo.yaml"),
                             "server.port=0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import re

        line = ""
        while "imagerl reward server:" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the server exited before its start line"
        url = re.search(r"on (http://127\.0\.0\.1:\d+) ", line).group(1)
        assert not url.endswith(":0")
        deadline = time.monotonic() + 45
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        h = httpx.get(f"{url}/health").json()
        assert {"brightness", "color_position", "ocr", "judge"} <= set(h["rewards"])
        assert h["chat_model"] == "tiny-qwen2.5-vl"
        remote = RemoteReward(url=url, rewards=["color_position", "judge"])
        try:
            out = remote(color_batch(3))
        finally:
            remote.close()
        assert out.details["failed_samples"] == 0
        assert out.scores[0] >= 0.4  # color_position ~0.99 weighs in even if the random judge abstains
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_reward_cli_bad_config_exits_with_message(tmp_path, capsys):
    from imagerl.serve import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("rewards:\n  - type: brightnes\nserver:\n  port: 0\n")
    assert main(str(cfg), []) == 2
    err = capsys.readouterr().err
    assert "brightness" in err  # the closest valid name


def test_serve_reward_busy_port_or_bad_host_fails_before_loading_rewards(tmp_path, capsys, monkeypatch):
    import socket

    import imagerl.rewards.server as server_mod
    from imagerl.serve import main

    built = []
    monkeypatch.setattr(server_mod, "build_server", lambda cfg: built.append(cfg))  # (must not be reached)
    cfg = tmp_path / "r.yaml"
    cfg.write_text("rewards:\n  - type: brightness\n")
    with socket.socket() as busy:  # a real listener on a loopback port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(str(cfg), [f"server.port={port}"]) == 2
    assert f"server.port={port}: 127.0.0.1:{port} is already in use" in capsys.readouterr().err
    assert main(str(cfg), ["server.host=no-such-host.invalid"]) == 2
    assert "server.host=no-such-host.invalid: not a host name or address here" in capsys.readouterr().err
    assert built == []


def test_local_vlm_log_probs_are_the_models_next_token_distribution(server):
    """The reported log-probs of the first generated position are log_softmax of the model's own forward at the
    prompt's last position (raw logits: no temperature, no processors), the chosen token heading the top-k; checked
    against a plain forward of the real model on the same inputs, outside generate()."""
    from imagerl.rewards.vlm_local import expand_image_pads, split_messages

    b = server[0].chat
    messages = msg(color_batch(2).images[1], "Is the square red? Answer yes or no.")
    g = b.complete_sync(messages, max_tokens=2, top_logprobs=5)
    msgs, imgs = split_messages(messages, b.max_image_pixels)
    im = b.image_processor(images=imgs, return_tensors="pt")
    text = expand_image_pads(b._prompt(msgs), [int(x.prod()) // b.merge for x in im["image_grid_thw"]])
    ids = b.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = b.model(input_ids=ids, pixel_values=im["pixel_values"].to(b.model.dtype),
                         image_grid_thw=im["image_grid_thw"]).logits[0, -1]
    top = logits.float().log_softmax(-1).topk(5)
    assert [v for _, v in g.tokens[0].top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [t for t, _ in g.tokens[0].top] == [b._tok_text(int(i)) for i in top.indices]
    assert g.tokens[0].logprob == pytest.approx(float(top.values[0]), abs=1e-4)  # greedy: the top-1 token
