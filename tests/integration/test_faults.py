"""Fault injection: the judge client and the remote reward against a real misbehaving HTTP server.

`FaultServer` is a real raw-asyncio HTTP/1.1 server on 127.0.0.1 whose answers are scripted per path:
it returns 500s and 429s, hangs past the client's timeout, sends garbage JSON, drops the connection
without answering or mid-body, and otherwise answers with canned (valid) OpenAI / score responses.
It is a fault injector, not a judge: the payloads are canned so that the tests see only transport effects.

What must hold: transient faults are retried and the call finally succeeds, with the retries counted;
permanent faults make the affected samples abstain (NaN) with the count reported; 4xx is not retried;
and nothing hangs (every loop is bounded by timeouts and retry counts; pytest-timeout guards the rest).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections import defaultdict, deque
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagerl.rewards.base import build_reward  # noqa: E402
from imagerl.rewards.http_client import BackendUnavailableError, OpenAIChatBackend, RequestRejectedError  # noqa: E402
from imagerl.rewards.judges.backend import JudgeError  # noqa: E402
from imagerl.rewards.remote import RemoteReward, RewardServerDownError  # noqa: E402
from imagerl.types import RewardInput  # noqa: E402

pytestmark = pytest.mark.timeout(30)

MSG = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]

CHAT_OK = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fault-judge",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"}, "finish_reason": "stop",
                 "logprobs": {"content": [{"token": "Yes", "logprob": -0.1, "bytes": [89, 101, 115],
                                           "top_logprobs": [{"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": -2.4}]}]}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}


def score_ok(body: dict) -> dict:
    """Canned score answer: sample i of a request scores its index (so the client's reassembly is checked)."""
    n = len(body["images"])
    names = body.get("rewards") or ["s"]
    return {"scores": {nm: [float(i) for i in range(n)] for nm in names}, "details": {}}


class FaultServer:
    """Scripted raw HTTP server. `script[path]` is a queue of actions used one per request; when it is
    empty, `default[path]` (or "ok") applies. Actions: "ok", ("slow", s), ("status", code[, retry_after]), ("hang", s),
    "garbage", "drop" (close without answering), "half" (headers and part of the body, then close), "badgzip" (a body
    that is not the gzip its Content-Encoding says), ("json", obj) (200 with that JSON). `model` is the one model
    /v1/models lists."""

    def __init__(self) -> None:
        self.script: dict[str, deque] = defaultdict(deque)
        self.default: dict[str, Any] = {}
        self.poison = ""  # a /v1/score request whose prompts contain this always gets a 500
        self.model = "fault-judge"
        self.hits: dict[str, int] = defaultdict(int)
        self.loop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task] = set()
        ready = threading.Event()

        async def start() -> None:
            self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for t in list(self.tasks):
                t.cancel()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                length = 0
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v.strip())
                body = await reader.readexactly(length) if length else b""
                self.hits[path] += 1
                action = self.script[path].popleft() if self.script[path] else self.default.get(path, "ok")
                if path == "/v1/score" and self.poison and self.poison in body.decode():
                    action = ("status", 500)
                if not await self._act(action, path, body, writer):
                    return
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: bytes, extra: str = "") -> None:
        head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"{extra}Connection: keep-alive\r\n\r\n")
        writer.write(head.encode() + payload)
        await writer.drain()

    async def _act(self, action: Any, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        kind = action if isinstance(action, str) else action[0]
        if kind == "slow":  # a busy server: answers, after s seconds
            await asyncio.sleep(action[1])
            kind = "ok"
        if kind == "ok":
            if path == "/v1/models":
                data = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
            elif path == "/health":
                data = {"status": "ok", "rewards": ["s", "t"]}
            elif path == "/v1/score":
                data = score_ok(json.loads(body))
            else:
                data = CHAT_OK
            await self._send(writer, 200, json.dumps(data).encode())
        elif kind == "status":
            extra = f"Retry-After: {action[2]}\r\n" if len(action) > 2 else ""
            await self._send(writer, action[1], json.dumps({"error": {"message": f"injected {action[1]}"}}).encode(), extra)
        elif kind == "garbage":
            await self._send(writer, 200, b'{"choices": [ this is not json')
        elif kind == "badgzip":
            await self._send(writer, 200, json.dumps(CHAT_OK).encode(), "Content-Encoding: gzip\r\n")
        elif kind == "json":
            await self._send(writer, 200, json.dumps(action[1]).encode())
        elif kind == "hang":
            await asyncio.sleep(action[1])
            return False
        elif kind == "drop":
            writer.transport.abort()
            return False
        elif kind == "half":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"choi")
            await writer.drain()
            writer.transport.abort()
            return False
        return True


@pytest.fixture
def fault():
    s = FaultServer()
    yield s
    s.stop()


def client(url: str, **kw: Any) -> OpenAIChatBackend:
    kw = {"timeout": 0.5, "max_retries": 3, "backoff": 0.01, "backoff_max": 0.05, **kw}
    return OpenAIChatBackend(base_urls=url, **kw)


def inp(n: int, prompts: list[str] | None = None) -> RewardInput:
    return RewardInput(images=torch.rand(n, 3, 8, 8), prompts=prompts or [f"p{i}" for i in range(n)],
                       metadata=[{} for _ in range(n)])


# --------------------------------------------------------------------------- judge client


@pytest.mark.parametrize("fault_action,counter", [
    (("status", 500), "http_errors"),
    (("status", 503), "http_errors"),
    ("garbage", "bad_responses"),
    ("badgzip", "bad_responses"),  # (an httpx.DecodingError: retried as a bad answer, not raised raw)
    ("drop", "connection_errors"),
    ("half", "connection_errors"),
    (("hang", 5.0), "timeouts"),
])
def test_transient_fault_is_retried_then_succeeds(fault, fault_action, counter):
    fault.script["/v1/chat/completions"].extend([fault_action, fault_action])
    b = client(fault.url)
    try:
        t0 = time.monotonic()
        res = b.chat_sync(MSG, top_logprobs=2)
        elapsed = time.monotonic() - t0
        assert res.text == "Yes" and res.top_logprobs == [{"Yes": -0.1, "No": -2.4}]
        st = b.stats()
        assert st["retries"] == 2 and st[counter] == 2 and st["failures"] == 0
        assert fault.hits["/v1/chat/completions"] == 3
        # (the one bound on time here, and what it tells apart: two 0.5 s timeouts, ~1 s, from one 5 s hang)
        assert elapsed < 4.5
    finally:
        b.close()


def test_a_timed_out_request_is_retried_with_more_time(fault):
    # a server that needs 0.8 s: the 0.5 s timeout alone would fail every attempt (each a full copy of the work on
    # the server); the retry waits twice as long and gets the answer
    fault.default["/v1/chat/completions"] = ("slow", 0.8)
    b = client(fault.url, max_retries=2)  # (timeout 0.5)
    try:
        assert b.chat_sync(MSG).text == "Yes"
        assert b.stats()["timeouts"] == 1 and b.stats()["retries"] == 1
    finally:
        b.close()


def test_429_honours_retry_after(fault):
    fault.script["/v1/chat/completions"].append(("status", 429, "0.3"))
    b = client(fault.url, backoff_max=1.0)
    try:
        t0 = time.monotonic()
        assert b.chat_sync(MSG).text == "Yes"
        assert time.monotonic() - t0 >= 0.3
        assert b.stats()["retries"] == 1
    finally:
        b.close()


def test_permanent_fault_gives_up_after_bounded_attempts(fault):
    fault.default["/v1/chat/completions"] = ("status", 500)
    b = client(fault.url, max_retries=2)
    try:
        with pytest.raises(JudgeError, match=r"failed after 3 attempt\(s\).*injected 500"):
            b.chat_sync(MSG)
        assert fault.hits["/v1/chat/completions"] == 3
        assert b.stats()["failures"] == 1
    finally:
        b.close()


@pytest.mark.parametrize("status,match", [(400, "HTTP 400"), (401, "api_key_env"), (404, "HTTP 404")])
def test_client_errors_are_not_retried(fault, status, match):
    fault.default["/v1/chat/completions"] = ("status", status)
    b = client(fault.url)
    try:
        with pytest.raises(RequestRejectedError, match=match):
            b.chat_sync(MSG)
        assert fault.hits["/v1/chat/completions"] == 1
        assert b.stats()["retries"] == 0
    finally:
        b.close()


def test_fail_over_to_the_healthy_url(fault):
    dead = FaultServer()
    dead.default["/v1/chat/completions"] = "drop"
    b = OpenAIChatBackend(base_urls=[dead.url, fault.url], timeout=0.5, max_retries=2, backoff=0.01)

    async def many():
        return await asyncio.gather(*(b.chat(MSG) for _ in range(8)))

    try:
        res = asyncio.run(many())
        assert [r.text for r in res] == ["Yes"] * 8
        st = b.stats()
        assert dead.hits["/v1/chat/completions"] >= 1, "load is spread over both URLs"
        assert st["failovers"] >= 1 and st["connection_errors"] == dead.hits["/v1/chat/completions"]
        assert st["failures"] == 0
    finally:
        b.close()
        dead.stop()


def test_a_url_that_refuses_connections_sits_out(fault):
    # a dead server refuses at once, so it always has 0 requests in flight: least-in-flight alone would send it most
    # requests (28 of 32 failed without retries). It failed the health check, so it sits out and none fails.
    from imagerl.rewards.server import bind_socket

    sock = bind_socket()  # bound, never listening: connections are refused
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    b = OpenAIChatBackend(base_urls=[dead, fault.url], timeout=0.5, max_retries=0, backoff=0.01)

    async def many():
        return await asyncio.gather(*(b.chat(MSG) for _ in range(16)))

    try:
        res = asyncio.run(many())
        assert [r.text for r in res] == ["Yes"] * 16 and b.stats()["connection_errors"] == 0
        # once its cooldown is over it is tried again (how a restarted server comes back), and a refusal puts it
        # back out for twice as long
        b.pool.down_until[dead] = 0.0
        live = b.pool.base_urls[1]
        b.pool.in_flight[live] += 1  # (so that the least-in-flight choice is the dead URL)
        with pytest.raises(JudgeError, match="connection error"):
            b.chat_sync(MSG)
        b.pool.in_flight[live] -= 1
        assert b.pool._down_streak[dead] == 2 and b.pool.down_until[dead] > time.monotonic() + 1.5 * b.pool.down_cooldown
    finally:
        b.close()
        sock.close()


def test_a_url_that_never_accepts_cools_down_like_a_refusing_one(fault):
    # a listening socket whose accept queue is full drops new SYNs: connecting times out (a blackholed host). That is
    # a connection failure (the URL sits out), not a slow answer (the read timeout doubled on the retry)
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fill = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(hole.getsockname())
        except BlockingIOError:
            pass
        fill.append(s)
    dead = f"http://127.0.0.1:{hole.getsockname()[1]}/v1"
    b = OpenAIChatBackend(base_urls=[dead, fault.url], timeout=0.5, connect_timeout=0.2, max_retries=2, backoff=0.01,
                          health_check=False, model="fault-judge")
    try:
        b.pool.in_flight[b.pool.base_urls[1]] += 1  # (so that the first choice is the dead URL)
        assert b.chat_sync(MSG).text == "Yes"  # failed over
        st = b.stats()
        assert st["connection_errors"] >= 1 and st["timeouts"] == 0
        assert b.pool.down_until[dead] > time.monotonic()
    finally:
        b.close()
        for s in fill + [hole]:
            s.close()


def test_replicas_must_serve_the_same_model(fault):
    # backend.model empty: the model is the first server's; a replica serving another would 404 half the samples
    other = FaultServer()
    other.model = "other-judge"
    b = client([fault.url, other.url])
    try:
        with pytest.raises(BackendUnavailableError, match=rf"judge server at {other.url}/v1 does not serve model "
                                                          r"'fault-judge' \(backend.model is empty: the first server's\); "
                                                          r"it serves \['other-judge'\]: set backend.model"):
            b.chat_sync(MSG)
    finally:
        b.close()
        other.stop()


def test_health_check_names_url_and_fix_when_down(fault):
    url = fault.url
    fault.stop()
    b = client(url)
    try:
        with pytest.raises(BackendUnavailableError, match=r"vllm serve.*base_urls") as e:
            b.chat_sync(MSG)
        assert url in str(e.value)
        assert not isinstance(e.value, JudgeError), "a judge never reachable must stop the run, not abstain"
    finally:
        b.close()
    fault.__init__()  # a fresh server so the fixture's stop() has one to stop


def test_judge_reward_abstains_when_the_judge_fails_for_good(fault):
    """The judge reward over the HTTP client: a permanently failing judge -> NaN for every sample, counted."""
    fault.default["/v1/chat/completions"] = ("status", 502)
    judge = build_reward({"type": "yes_no_judge", "args": {"backend": {
        "type": "http", "base_urls": [fault.url], "timeout": 0.5, "max_retries": 1, "backoff": 0.01}}})
    try:
        out = judge(inp(3))
    finally:
        judge.close()
    assert torch.isnan(out.scores).all()
    assert out.details["request_failures"] == 3 and out.details["abstained"] == 3
    assert fault.hits["/v1/chat/completions"] == 6  # 3 samples x (1 + 1 retry)


@pytest.mark.parametrize("status,match", [
    # a wrong key, model or path is the same for every request: the run stops with the server's reason and the fix
    (401, r"judge server at .* rejected the request: HTTP 401 injected 401.*api_key_env"),
    (403, r"judge server at .* rejected the request: HTTP 403 injected 403.*api_key_env"),
    (404, r"judge server at .* rejected the request: HTTP 404 injected 404.*base_urls .* and args.backend.model"),
    # a 400 on every request (a field the server does not take, a template it cannot read) is a setup error too
    (400, r"the judge server refused all 3 requests; the last: .*HTTP 400 injected 400"),
])
def test_judge_reward_stops_on_a_rejection_no_request_can_change(fault, status, match):
    # (instead of abstaining on every sample: beside another reward the judge would silently carry no signal)
    from imagerl.rewards.base import RewardError

    fault.default["/v1/chat/completions"] = ("status", status)
    judge = build_reward({"type": "yes_no_judge", "name": "judge", "args": {"backend": {
        "type": "http", "base_urls": [fault.url], "timeout": 0.5, "max_retries": 1, "backoff": 0.01}}})
    try:
        with pytest.raises(RewardError, match=rf"^reward 'judge': {match}"):
            judge(inp(3))
    finally:
        judge.close()


def test_judge_reward_says_why_requests_failed(fault):
    # a 400 can be one sample's (an image too large): that sample abstains, and the server's words are kept
    fault.script["/v1/chat/completions"].append(("status", 400))
    judge = build_reward({"type": "yes_no_judge", "args": {"backend": {
        "type": "http", "base_urls": [fault.url], "timeout": 0.5, "max_retries": 1, "backoff": 0.01},
        "max_concurrency": 1}})
    try:
        out = judge(inp(3))
    finally:
        judge.close()
    assert int(torch.isnan(out.scores).sum()) == 1 and out.details["request_failures"] == 1
    assert "HTTP 400 injected 400" in out.details["last_error"]


def test_judge_reward_recovers_from_transient_faults(fault):
    fault.script["/v1/chat/completions"].extend(["drop", ("status", 500), "garbage"])
    judge = build_reward({"type": "yes_no_judge", "args": {"backend": {
        "type": "http", "base_urls": [fault.url], "timeout": 0.5, "max_retries": 4, "backoff": 0.01}}})
    try:
        out = judge(inp(3))
        stats = judge.backend.stats()
    finally:
        judge.close()
    expect = math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.4))  # P(yes) from the canned log-probs
    torch.testing.assert_close(out.scores, torch.full((3,), expect), atol=1e-5, rtol=0)
    assert stats["retries"] == 3 and out.details["request_failures"] == 0


# --------------------------------------------------------------------------- remote reward


def test_remote_reward_transient_faults_retried(fault):
    fault.script["/v1/score"].extend([("status", 503), "drop"])
    r = RemoteReward(url=fault.url, rewards=["s"], batch_size=2, retries=3, backoff=0.01, timeout=0.5, max_concurrency=1)
    try:
        out = r(inp(5))
    finally:
        r.close()
    assert out.scores.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]  # index within each 2-sample request
    assert out.details["retries"] == 2 and out.details["failed_samples"] == 0


def test_remote_reward_counts_each_calls_own_retries(fault):
    # two overlapped scoring calls share one pool: the 2 retries are reported once in all, not by both calls
    fault.script["/v1/score"].extend([("status", 503), ("status", 503)])
    r = RemoteReward(url=fault.url, rewards=["s"], batch_size=2, retries=3, backoff=0.01, timeout=0.5, max_concurrency=1)

    async def both():
        return await asyncio.gather(r.score_async(inp(2)), r.score_async(inp(2)))

    try:
        outs = asyncio.run(both())
    finally:
        r.close()
    assert sum(o.details["retries"] for o in outs) == 2 == r.stats()["retries"]


def test_remote_reward_permanent_fault_abstains_only_affected_chunk(fault):
    fault.poison = "POISON"
    r = RemoteReward(url=fault.url, rewards=["s"], batch_size=2, retries=1, backoff=0.01, timeout=0.5)
    try:
        out = r(inp(6, prompts=["a", "b", "POISON", "c", "d", "e"]))
    finally:
        r.close()
    assert torch.isnan(out.scores[2:4]).all(), "the failed chunk abstains: never a neutral value"
    assert out.scores[[0, 1, 4, 5]].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert out.details["failed_samples"] == 2 and out.details["failed_requests"] == 1
    assert "injected 500" in out.details["last_error"]


def test_remote_reward_hanging_server_is_bounded(fault):
    fault.default["/v1/score"] = ("hang", 10.0)
    r = RemoteReward(url=fault.url, rewards=["s"], batch_size=4, retries=1, backoff=0.01, timeout=0.3)
    try:
        t0 = time.monotonic()
        out = r(inp(8))
        assert time.monotonic() - t0 < 8.0  # (tells ~0.6 s of timeouts apart from the 10 s hang, with room for load)
    finally:
        r.close()
    assert torch.isnan(out.scores).all()
    assert out.details["failed_samples"] == 8 and out.details["failed_requests"] == 2
    assert r.stats()["timeouts"] == 4  # 2 requests x 2 attempts


def test_remote_reward_garbage_answer_abstains(fault):
    fault.default["/v1/score"] = "garbage"
    r = RemoteReward(url=fault.url, rewards=["s"], retries=1, backoff=0.01, timeout=0.5)
    try:
        out = r(inp(3))
    finally:
        r.close()
    assert torch.isnan(out.scores).all() and out.details["failed_samples"] == 3
    assert r.stats()["bad_responses"] == 2


@pytest.mark.parametrize("entry", ["abc", {"v": 1}, True, math.inf, 1e39, int("9" * 400)])
def test_remote_reward_odd_score_entries_make_their_chunk_abstain(fault, entry):
    # a foreign server's answer whose scores are not numbers or null: the chunk abstains, counted, with what was wrong
    # (was: a raw ValueError / TypeError out of the step, True scored 1.0, and Infinity became float32's max)
    fault.script["/v1/score"].append(("json", {"scores": {"s": [0.5, entry]}, "details": ["not", "a", "dict"]}))
    r = RemoteReward(url=fault.url, rewards=["s"], batch_size=2, retries=0, timeout=0.5, max_concurrency=1)
    try:
        out = r(inp(4))
    finally:
        r.close()
    assert torch.isnan(out.scores[:2]).all() and out.scores[2:].tolist() == [0.0, 1.0]  # (the next chunk: canned)
    assert out.details["failed_samples"] == 2 and "not finite numbers or null" in out.details["last_error"]


def test_remote_reward_odd_failure_details_count_the_chunk(fault):
    # a scorer error reported with a failed_samples that is no count (a string, Infinity) counts the whole chunk
    fault.script["/v1/score"].append(("json", {"scores": {"s": [None, None]},
                                               "details": {"s": {"error": "boom", "failed_samples": "x"}}}))
    r = RemoteReward(url=fault.url, rewards=["s"], batch_size=2, retries=0, timeout=0.5, max_concurrency=1)
    try:
        out = r(inp(2))
    finally:
        r.close()
    assert out.details["failed_samples"] == 2 and out.details["last_error"] == "reward 's' failed on the server: boom"


def test_remote_reward_server_down_at_start_says_how_to_start_it():
    from imagerl.rewards.server import bind_socket

    sock = bind_socket()  # bound but never listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    r = RemoteReward(url=url, rewards=["s"], timeout=0.5)
    try:
        with pytest.raises(RewardServerDownError, match=r"imagerl serve-reward CONFIG"):
            r(inp(2))
    finally:
        r.close()
        sock.close()


def test_remote_reward_unknown_name_fails_at_start(fault):
    r = RemoteReward(url=fault.url, rewards=["s", "clip"], timeout=0.5)
    try:
        with pytest.raises(ValueError, match=r"does not serve \['clip'\]"):
            r(inp(2))
    finally:
        r.close()
