"""HTTP transport for remote judges and rewards: an OpenAI-compatible chat client and its retry pool.

`OpenAIChatBackend` is the `JudgeBackend` for any OpenAI-compatible chat-completions server: vLLM
(``vllm serve``), SGLang, or our own reward server (`imagerl serve-reward`, which serves a local VLM at
``/v1/chat/completions``). It asks for ``logprobs``/``top_logprobs`` and parses them into
`ChatResult.top_logprobs`, so judges can read P("yes") instead of parsing text.

Why httpx and not the `openai` package: we need things the SDK does not give in one client, namely
several base URLs with least-in-flight load spreading and fail-over, retry accounting we can log,
and the same pool reused for our non-OpenAI ``/v1/score`` endpoint (`RemoteReward`). The wire format
is small and stable, and the official `openai` client is used in the tests to check that our server
speaks it.

Every request runs on a private event loop in a background thread (`BackgroundLoop`). Callers await
it from any loop: the trainer's ``asyncio.run`` per step, a server's loop, or plain sync code. An
httpx client and asyncio semaphores belong to the loop that created them; a private loop keeps one
connection pool alive across the caller's short-lived loops instead of leaking one per step.

Retries: 408/429/5xx, connection errors (refused, reset, dropped), timeouts (with twice the read timeout each
time, at most 4x) and unparseable 200 responses are retried up to ``max_retries`` times with exponential backoff
and full jitter
(``Retry-After`` is honoured, capped at ``backoff_max``); each retry prefers another base URL.
Other 4xx (400 bad request, 401/403 auth, 404 wrong model) fail at once: retrying cannot fix them.

A base URL that refuses or drops a connection (or failed the start-up health check) sits out a cooldown
(``down_cooldown`` seconds, doubling while it keeps failing, at most 8x): a dead server answers at once, so a
least-in-flight choice would otherwise send it most requests. While every URL is down, the one whose cooldown
ends first is tried (that is how a restarted server comes back).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import httpx

from .base import RewardError
from .judges.backend import ChatResult, JudgeError, position_logprobs

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class BackendUnavailableError(RewardError):
    """No configured server answered the start-up health check, or it does not serve the model.

    Deliberately not a `JudgeError`: judges turn JudgeErrors into abstains, but a judge that was never
    reachable is a setup error that must stop the run with the fix, not silently abstain on everything."""


class RequestRejectedError(JudgeError):
    """The server refused the request with a 4xx that retrying cannot fix (bad request, auth, model)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _RetryableError(Exception):
    def __init__(self, message: str, kind: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------------
# A private event loop in a thread
# --------------------------------------------------------------------------------------------------


class BackgroundLoop:
    """An asyncio loop running in a daemon thread; coroutines are submitted from any thread."""

    def __init__(self, name: str = "imagerl-http") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the background loop from the caller's loop (cancellation propagates)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self._loop:
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def close(self, final: Callable[[], Awaitable[Any]] | None = None, timeout: float = 5.0) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or loop.is_closed():
            return
        if final is not None:
            try:
                asyncio.run_coroutine_threadsafe(final(), loop).result(timeout)
            except Exception as e:  # noqa: BLE001 - closing must not raise
                log.debug("%s: error while closing: %s", self._name, e)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)
        if not loop.is_running():
            loop.close()


# --------------------------------------------------------------------------------------------------
# A pool of base URLs with retries
# --------------------------------------------------------------------------------------------------


def read_api_key(api_key_env: str, field: str) -> str | None:
    """The key from the environment variable *named* in the config; never a key written in YAML."""
    if not api_key_env:
        return None
    if api_key_env.startswith(("sk-", "Bearer ")) or len(api_key_env) > 64:
        raise ValueError(f"{field}='{api_key_env[:6]}...' looks like a key, not the NAME of an environment variable; "
                         f"put the key in an env var (export JUDGE_API_KEY=...) and set {field}: JUDGE_API_KEY")
    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(f"{field}={api_key_env}: environment variable {api_key_env} is not set; "
                         f"export {api_key_env}=<key> before starting (or set {field}: '' for a server without auth)")
    return key


def normalize_base_urls(base_urls: str | list[str], field: str, suffix: str = "") -> list[str]:
    urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
    if not urls:
        raise ValueError(f"{field} is empty: give at least one URL such as http://127.0.0.1:8000{suffix}")
    out = []
    for u in urls:
        u = str(u).strip().rstrip("/")
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"{field}: '{u}' is not an http(s) URL (e.g. http://127.0.0.1:8000{suffix})")
        if suffix and not u.endswith(suffix):
            u += suffix
        out.append(u)
    return out


@dataclass
class PoolStats:
    requests: int = 0  # logical requests (each may take several attempts)
    attempts: int = 0
    retries: int = 0
    failures: int = 0  # requests that failed for good
    timeouts: int = 0
    connection_errors: int = 0
    http_errors: int = 0  # retryable status codes seen (429, 5xx)
    bad_responses: int = 0  # 200 with a body we could not parse
    failovers: int = 0  # a retry sent to a different base URL


class HTTPPool:
    """Several base URLs behind one `post_json`: least-in-flight choice, retries, fail-over, counters.

    Must be used on a single event loop (the owner's `BackgroundLoop`)."""

    def __init__(
        self,
        base_urls: list[str],
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        max_concurrency: int = 16,
        what: str = "server",
        fix_hint: str = "",
        key_field: str = "api_key_env",
        down_cooldown: float = 5.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be > 0 (seconds per request)")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} must be >= 0")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency} must be >= 1")
        self.base_urls = base_urls
        self.api_key = api_key
        self.timeout = float(timeout)
        self.connect_timeout = min(float(connect_timeout), self.timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.max_concurrency = int(max_concurrency)
        self.what = what
        self.fix_hint = fix_hint
        self.key_field = key_field
        self.stats = PoolStats()
        self.in_flight = {u: 0 for u in base_urls}
        self.down_cooldown = float(down_cooldown)
        self.down_until = {u: 0.0 for u in base_urls}  # time.monotonic() until which a URL sits out
        self._down_streak = {u: 0 for u in base_urls}
        self._rr = itertools.count()
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._rng = random.Random()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.max_concurrency * max(1, len(self.base_urls)),
                                  max_keepalive_connections=self.max_concurrency * max(1, len(self.base_urls)))
            self._client = httpx.AsyncClient(
                headers=headers, limits=limits, trust_env=False,  # loopback/judge URLs never go through a proxy
                timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            )
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def mark_down(self, url: str) -> None:
        """`url` refused or dropped a connection: skip it for a cooldown that doubles while it keeps failing."""
        self._down_streak[url] = min(self._down_streak[url] + 1, 4)
        self.down_until[url] = time.monotonic() + self.down_cooldown * 2 ** (self._down_streak[url] - 1)

    def mark_up(self, url: str) -> None:
        self._down_streak[url], self.down_until[url] = 0, 0.0

    def pick(self, avoid: str | None = None) -> str:
        """Least in-flight URL among those not cooling down after a connection failure (while all are, the one that
        comes back first); ties broken round-robin; `avoid` (the URL that just failed) if possible."""
        now = time.monotonic()
        up = [u for u in self.base_urls if self.down_until[u] <= now]
        if not up:
            return min(self.base_urls, key=lambda u: self.down_until[u])
        cands = [u for u in up if u != avoid] or up
        start = next(self._rr)
        order = cands[start % len(cands):] + cands[: start % len(cands)]
        return min(order, key=lambda u: self.in_flight[u])

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max)
        # full jitter: uniform in [0, backoff * 2^attempt], so synchronized clients spread out
        return self._rng.uniform(0.0, min(self.backoff_max, self.backoff * (2 ** attempt)))

    async def get_json(self, url: str) -> tuple[int, Any]:
        """One GET without retries (health checks): (status, parsed JSON or text)."""
        r = await self.client.get(url)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    async def post_json(self, path: str, body: dict[str, Any], parse: Callable[[Any], T],
                        call_stats: PoolStats | None = None) -> T:
        """POST `body` to `<base>/<path>` and return `parse(json)`; retries per the module docstring.

        Raises `RequestRejectedError` on non-retryable 4xx and `JudgeError` when retries run out. `call_stats`
        also counts this call's retries (the pool's counters are shared by every call in flight)."""
        self.stats.requests += 1
        client = self.client
        assert self._sem is not None
        payload = json.dumps(body, allow_nan=False).encode()
        last_url: str | None = None
        errors: list[str] = []
        # a timed-out request is retried with twice the read timeout (up to 4x): a busy server gets the time it
        # needs instead of the same too-short wait again, each retry adding another full copy of the work
        read_timeout = self.timeout
        async with self._sem:
            for attempt in range(self.max_retries + 1):
                url = self.pick(avoid=last_url)
                if last_url is not None and url != last_url:
                    self.stats.failovers += 1
                last_url = url
                self.stats.attempts += 1
                self.in_flight[url] += 1
                try:
                    out = await self._attempt(client, f"{url}/{path.lstrip('/')}", payload, parse, read_timeout)
                    self.mark_up(url)
                    return out
                except _RetryableError as e:
                    errors.append(f"{url}: {e}")
                    if e.kind == "connection":  # (a timeout is a busy server, not a dead one)
                        self.mark_down(url)
                    if e.kind == "timeout":
                        read_timeout = min(2 * read_timeout, 4 * self.timeout)
                    if attempt == self.max_retries:
                        break
                    self.stats.retries += 1
                    if call_stats is not None:
                        call_stats.retries += 1
                    delay = self._delay(attempt, e.retry_after)
                    log.debug("retrying %s after %.2fs: %s", path, delay, e)
                finally:
                    self.in_flight[url] -= 1
                await asyncio.sleep(delay)
        self.stats.failures += 1
        shown = errors if len(errors) <= 3 else errors[:1] + [f"... {len(errors) - 2} more ..."] + errors[-1:]
        raise JudgeError(f"{self.what} request to /{path.lstrip('/')} failed after {len(errors)} attempt(s): "
                         + "; ".join(shown))

    async def _attempt(self, client: httpx.AsyncClient, url: str, payload: bytes, parse: Callable[[Any], T],
                       read_timeout: float | None = None) -> T:
        t = read_timeout or self.timeout
        try:
            r = await client.post(url, content=payload, headers={"Content-Type": "application/json"},
                                  timeout=httpx.Timeout(t, connect=self.connect_timeout))
        except httpx.ConnectTimeout as e:  # (before TimeoutException: a host that never accepts is down, not slow;
            self.stats.connection_errors += 1  # it cools down like a refused one, and the read timeout stays)
            raise _RetryableError(f"connection error (no connection within {self.connect_timeout:g}s)", "connection") from e
        except httpx.TimeoutException as e:
            self.stats.timeouts += 1
            raise _RetryableError(f"timed out after {t:g}s ({type(e).__name__})", "timeout") from e
        except httpx.TransportError as e:  # refused, reset, dropped mid-response, protocol errors
            self.stats.connection_errors += 1
            raise _RetryableError(f"connection error ({type(e).__name__}: {e})", "connection") from e
        except httpx.HTTPError as e:  # e.g. a body that does not decode as its Content-Encoding says
            self.stats.bad_responses += 1
            raise _RetryableError(f"unreadable response ({type(e).__name__}: {str(e)[:200]})", "bad_response") from e
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            self.stats.http_errors += 1
            ra = r.headers.get("retry-after")
            try:
                retry_after = float(ra) if ra is not None else None
            except ValueError:
                retry_after = None
            raise _RetryableError(f"HTTP {r.status_code} {_error_text(r)}", "http", retry_after)
        if r.status_code >= 400:
            self.stats.failures += 1
            msg = f"{self.what} at {url} rejected the request: HTTP {r.status_code} {_error_text(r)}"
            if r.status_code in (401, 403):
                msg += (f". Check {self.key_field}: it must name an env var holding the key the server expects "
                        f"(the server's own api key env var)")
            raise RequestRejectedError(msg, r.status_code)
        try:
            return parse(r.json())
        except (ValueError, KeyError, TypeError, IndexError) as e:
            self.stats.bad_responses += 1
            raise _RetryableError(f"unreadable response ({type(e).__name__}: {str(e)[:200]})", "bad_response") from e


def _error_text(r: httpx.Response) -> str:
    try:
        d = r.json()
        if isinstance(d, dict):
            err = d.get("error", d.get("detail", d))
            if isinstance(err, dict):
                err = err.get("message", err)
            return str(err)[:500]
    except ValueError:
        pass
    return r.text[:300]


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible chat backend
# --------------------------------------------------------------------------------------------------


def parse_chat_response(d: Any) -> ChatResult:
    """OpenAI chat-completion JSON -> ChatResult; raises KeyError/TypeError/ValueError when malformed."""
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object, got {type(d).__name__}")
    choice = d["choices"][0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise TypeError("choices[0].message is not a JSON object")
    content = choice["message"].get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise TypeError("choices[0].message.content is not a string")
    top = None
    lp = choice.get("logprobs")
    if lp and not isinstance(lp, dict):
        raise TypeError("choices[0].logprobs is not a JSON object (a chat-completions response has logprobs.content)")
    if lp and lp.get("content") is not None:
        top = []
        for pos in lp["content"]:
            top.append(position_logprobs(str(pos["token"]), float(pos["logprob"]),
                                         [(str(alt["token"]), float(alt["logprob"])) for alt in pos.get("top_logprobs") or []]))
    usage = dict(d.get("usage") or {})
    if choice.get("finish_reason") is not None:
        usage["finish_reason"] = choice["finish_reason"]
    return ChatResult(text=content, top_logprobs=top, usage=usage)


class OpenAIChatBackend:
    """`JudgeBackend` over HTTP for vLLM / SGLang / our reward server (OpenAI chat-completions format).

    Args:
      base_urls: one URL or a list, e.g. http://127.0.0.1:8000/v1 ("/v1" is appended when missing);
        `base_url` (one URL, the openai SDK's name) is accepted too.
      model: the served model id; "" = the first model the server lists.
      api_key_env: NAME of the env var holding the key ("" = send none; vLLM without --api-key accepts any).
      max_concurrency: requests in flight at once from this client.
      timeout: seconds per attempt; connect_timeout bounds the TCP connect.
      max_retries, backoff, backoff_max: retries of transient failures, exponential backoff with jitter.
      health_check: check the servers (GET /v1/models) before the first request.
      extra_body: extra JSON fields sent with every request (e.g. vLLM's {"top_k": 1}).
    """

    def __init__(
        self,
        base_urls: str | list[str] = "http://127.0.0.1:8000/v1",
        model: str = "",
        base_url: str = "",
        api_key_env: str = "",
        max_concurrency: int = 16,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        health_check: bool = True,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if base_url:  # the single-URL spelling of the openai SDK
            base_urls = [base_url]
        self.base_urls = normalize_base_urls(base_urls, "backend.base_urls", suffix="/v1")
        self.model = model
        self.health_check = health_check
        self.extra_body = dict(extra_body or {})
        self.pool = HTTPPool(
            self.base_urls, api_key=read_api_key(api_key_env, "backend.api_key_env"), timeout=timeout,
            connect_timeout=connect_timeout, max_retries=max_retries, backoff=backoff, backoff_max=backoff_max,
            max_concurrency=max_concurrency, what="judge server", key_field="backend.api_key_env",
        )
        self._io = BackgroundLoop("imagerl-judge-http")
        self._checked = False
        self._check_lock: asyncio.Lock | None = None
        self.served_models: dict[str, list[str]] = {}

    # -- health -------------------------------------------------------------------------------
    async def check(self) -> list[str]:
        """GET /v1/models on every base URL; raise `BackendUnavailableError` naming the URLs and the fix
        when none answers, or when `model` is not served. Returns the healthy URLs."""
        return await self._io.run(self._check())

    def check_sync(self) -> list[str]:
        return self._io.run_sync(self._check())

    async def _check(self) -> list[str]:
        healthy, problems = [], []
        for url in self.base_urls:
            try:
                status, body = await self.pool.get_json(f"{url}/models")
            except httpx.HTTPError as e:
                problems.append(f"{url}: cannot connect ({type(e).__name__})")
                self.pool.mark_down(url)
                continue
            if status in (401, 403):
                raise BackendUnavailableError(
                    f"judge server at {url} refused our key (HTTP {status}): set backend.api_key_env to the name of an "
                    f"env var holding the key the server was started with (vllm serve --api-key / server.api_key_env)"
                )
            if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
                problems.append(f"{url}: GET /models answered HTTP {status}, not an OpenAI model list")
                continue
            ids = [str(m.get("id")) for m in body["data"] if isinstance(m, dict)]
            self.served_models[url] = ids
            if not ids:
                problems.append(f"{url}: serves no chat model")
                continue
            healthy.append(url)
        if not healthy:
            raise BackendUnavailableError(
                f"no judge server answered at {self.base_urls}: {'; '.join(problems)}. "
                f"Is `vllm serve <model>` (or `imagerl serve-reward CONFIG`) running? Check backend.base_urls "
                f"(host, port and the /v1 path)."
            )
        # every healthy replica must serve the model, also when it is picked here from the first one's list
        # (backend.model empty): a replica with another model would answer 404 and abstain its share of samples
        model = self.model or self.served_models[healthy[0]][0]
        for url in healthy:
            if model not in self.served_models[url]:
                how = f"model '{model}'" if self.model else f"model '{model}' (backend.model is empty: the first server's)"
                raise BackendUnavailableError(
                    f"judge server at {url} does not serve {how}; it serves {self.served_models[url]}: set backend.model "
                    f"to a model every backend.base_urls server serves, or start them with the same model"
                )
        for p in problems:
            log.warning("judge backend: %s (continuing with %s)", p, healthy)
        self.model = model
        self._checked = True
        return healthy

    async def _ensure_checked(self) -> None:
        if self._checked or not self.health_check:
            return
        if self._check_lock is None:
            self._check_lock = asyncio.Lock()
        async with self._check_lock:
            if not self._checked:
                await self._check()

    # -- chat ---------------------------------------------------------------------------------
    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_logprobs: int | None = None,
    ) -> ChatResult:
        return await self._io.run(self._chat(messages, max_tokens, temperature, top_logprobs))

    def chat_sync(self, messages: list[dict[str, Any]], **kw: Any) -> ChatResult:
        return self._io.run_sync(self._chat(messages, kw.get("max_tokens", 64), kw.get("temperature", 0.0),
                                            kw.get("top_logprobs")))

    async def _chat(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float,
                    top_logprobs: int | None) -> ChatResult:
        await self._ensure_checked()
        if not self.model:
            raise JudgeError("backend.model is empty and the health check is off: set backend.model to the served model id")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                                "temperature": float(temperature), **self.extra_body}
        if top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = int(top_logprobs)
        t0 = time.perf_counter()
        res = await self.pool.post_json("chat/completions", body, parse_chat_response)
        res.usage["latency_s"] = time.perf_counter() - t0
        return res

    # -- bookkeeping --------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters since start: requests, attempts, retries, failures, timeouts, connection_errors, ..."""
        return dict(vars(self.pool.stats))

    def close(self) -> None:
        self._io.close(self.pool.aclose)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
