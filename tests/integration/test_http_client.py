"""`OpenAIChatBackend` against real servers on loopback: our reward server with a tiny Qwen2.5-VL, and a
small FastAPI app in this file that records how requests arrive (concurrency, headers, spreading).

Fault handling (retries, timeouts, dropped connections) is in test_faults.py.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi import FastAPI, Request  # noqa: E402

from imagerl.rewards.http_client import (  # noqa: E402
    BackendUnavailableError,
    OpenAIChatBackend,
    normalize_base_urls,
    parse_chat_response,
)
from imagerl.rewards.judges.backend import build_backend, image_to_data_uri  # noqa: E402
from imagerl.rewards.server import RewardServer, ServerThread  # noqa: E402
from imagerl.rewards.vlm_local import LocalVLMBackend  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def msg(text: str = "Is it red?", img: torch.Tensor | None = None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    if img is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_to_data_uri(img)}})
    return [{"role": "user", "content": parts}]


class Recorder:
    """A real FastAPI chat endpoint that answers after `delay` seconds and records what it saw."""

    def __init__(self, name: str, delay: float = 0.05) -> None:
        self.name, self.delay = name, delay
        self.in_flight = self.max_in_flight = self.count = 0
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            return {"object": "list", "data": [{"id": "rec", "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> dict:
            self.count += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.bodies.append(await request.json())
            self.auth.append(request.headers.get("authorization"))
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": self.name},
                                 "finish_reason": "stop", "logprobs": None}], "usage": {}}

        self.thread = ServerThread(app).start()
        self.url = self.thread.url


@pytest.fixture(scope="module")
def ours():
    srv = RewardServer({}, chat_backend=LocalVLMBackend(tiny=True, max_wait_ms=5), api_key="k-123", api_key_env="IMAGERL_HC_KEY")
    th = ServerThread(srv.app).start()
    yield th.url
    th.stop()
    srv.close()


# ---------------------------------------------------------------------------------------------------


def test_url_and_key_configuration_errors(monkeypatch):
    assert normalize_base_urls("http://h:8000", "f", "/v1") == ["http://h:8000/v1"]
    assert normalize_base_urls(["http://h:8000/v1/"], "f", "/v1") == ["http://h:8000/v1"]
    with pytest.raises(ValueError, match="not an http"):
        OpenAIChatBackend(base_urls="localhost:8000")
    with pytest.raises(ValueError, match="looks like a key"):
        OpenAIChatBackend(api_key_env="sk-abcdef123")
    monkeypatch.delenv("IMAGERL_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="IMAGERL_UNSET_KEY is not set"):
        OpenAIChatBackend(api_key_env="IMAGERL_UNSET_KEY")
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIChatBackend(max_concurrency=0)
    # the registry names used by judge configs
    b = build_backend({"type": "http", "base_url": "http://127.0.0.1:9/v1", "model": "m"})
    assert isinstance(b, OpenAIChatBackend) and b.base_urls == ["http://127.0.0.1:9/v1"]
    b.close()
    with pytest.raises(ValueError, match="max_retry"):
        build_backend({"type": "http", "max_retry": 3})


def test_parse_openai_response_format():
    d = {"choices": [{"message": {"content": "No"}, "finish_reason": "stop", "logprobs": {"content": [
        {"token": "No", "logprob": -0.2, "top_logprobs": [{"token": "Yes", "logprob": -1.9}, {"token": "No", "logprob": -0.2}]},
        {"token": ".", "logprob": -0.01, "top_logprobs": []}]}}], "usage": {"completion_tokens": 2}}
    r = parse_chat_response(d)
    assert r.text == "No" and r.top_logprobs == [{"No": -0.2, "Yes": -1.9}, {".": -0.01}]
    assert r.usage["finish_reason"] == "stop" and r.usage["completion_tokens"] == 2
    assert parse_chat_response({"choices": [{"message": {"content": None}, "logprobs": None}]}).top_logprobs is None
    # malformed shapes are the retried "unreadable response" errors (TypeError/KeyError...), never AttributeError
    for bad in ({}, {"choices": []}, {"choices": [{"message": {"content": 3}}]}, [1], {"choices": [{"message": None}]},
                {"choices": [{"message": {"content": "y"}, "logprobs": [{"token": "y"}]}]}):
        with pytest.raises((KeyError, IndexError, TypeError, ValueError)):
            parse_chat_response(bad)


def test_chat_with_key_and_logprobs_across_event_loops(ours, monkeypatch):
    monkeypatch.setenv("IMAGERL_HC_KEY", "k-123")
    b = OpenAIChatBackend(base_urls=ours, api_key_env="IMAGERL_HC_KEY", timeout=20)
    img = torch.rand(3, 30, 30)
    try:
        # each asyncio.run is a fresh loop, as in a training loop that runs one per step
        r1 = asyncio.run(b.chat(msg(img=img), max_tokens=3, top_logprobs=2))
        r2 = asyncio.run(b.chat(msg(img=img), max_tokens=3, top_logprobs=2))
        r3 = b.chat_sync(msg(img=img), max_tokens=3)
    finally:
        b.close()
    assert r1.text == r2.text == r3.text  # greedy (temperature 0) is deterministic
    assert len(r1.top_logprobs) == r1.usage["completion_tokens"] >= 1
    assert all(1 <= len(d) <= 3 and all(v <= 0 for v in d.values()) for d in r1.top_logprobs)
    assert r3.top_logprobs is None  # not asked for
    b.close()  # idempotent


def test_auth_failure_is_a_clear_start_up_error(ours, monkeypatch):
    monkeypatch.setenv("IMAGERL_HC_WRONG", "nope")
    for kw in ({"api_key_env": "IMAGERL_HC_WRONG"}, {}):
        b = OpenAIChatBackend(base_urls=ours, timeout=5, **kw)
        try:
            with pytest.raises(BackendUnavailableError, match=r"HTTP 401.*api_key_env"):
                b.chat_sync(msg())
        finally:
            b.close()


def test_wrong_model_lists_served_models(ours, monkeypatch):
    monkeypatch.setenv("IMAGERL_HC_KEY", "k-123")
    b = OpenAIChatBackend(base_urls=ours, api_key_env="IMAGERL_HC_KEY", model="Qwen/Qwen2.5-VL-7B-Instruct")
    try:
        with pytest.raises(BackendUnavailableError, match=r"does not serve model 'Qwen/Qwen2.5-VL-7B-Instruct'.*tiny-qwen2.5-vl"):
            asyncio.run(b.check())
    finally:
        b.close()


def test_concurrency_bound_and_request_fields():
    rec = Recorder("a", delay=0.1)
    b = OpenAIChatBackend(base_urls=rec.url, model="rec", max_concurrency=3, extra_body={"top_k": 1})

    async def many():
        return await asyncio.gather(*(b.chat(msg(f"q{i}"), max_tokens=7, temperature=0.5, top_logprobs=4) for i in range(9)))

    try:
        res = asyncio.run(many())
    finally:
        b.close()
        rec.thread.stop()
    assert [r.text for r in res] == ["a"] * 9
    assert rec.max_in_flight == 3, "max_concurrency bounds requests in flight"
    body = rec.bodies[0]
    assert body["model"] == "rec" and body["max_tokens"] == 7 and body["temperature"] == 0.5
    assert body["logprobs"] is True and body["top_logprobs"] == 4 and body["top_k"] == 1
    assert rec.auth[0] is None  # no api_key_env -> no Authorization header


def test_load_is_spread_over_base_urls():
    a, b_ = Recorder("a", delay=0.05), Recorder("b", delay=0.05)
    b = OpenAIChatBackend(base_urls=[a.url, b_.url], max_concurrency=8)

    async def many():
        return await asyncio.gather(*(b.chat(msg()) for _ in range(16)))

    try:
        res = asyncio.run(many())
        assert b.model == "rec"  # taken from /v1/models
    finally:
        b.close()
        a.thread.stop()
        b_.thread.stop()
    texts = [r.text for r in res]
    assert a.count + b_.count == 16
    assert 6 <= a.count <= 10, f"least-in-flight should split 16 requests about evenly, got {a.count}/{b_.count}"
    assert texts.count("a") == a.count
