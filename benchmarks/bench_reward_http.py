"""Reward transport benchmark: HTTP (our reward server on loopback) versus in-process, side by side.

1. Throughput (images/s) of the same scorer called in-process and through HTTP in one run -> the
   overhead ratio of the transport (PNG encode + JSON + HTTP + decode + dynamic batching):
   - color_position (a cheap pixel rule: the ratio is the whole transport cost),
   - yes_no_judge on a tiny Qwen2.5-VL, via our POST /v1/score (`remote` reward),
   - yes_no_judge on a tiny Qwen2.5-VL, via OpenAI chat completions (`http` backend -> our
     /v1/chat/completions) versus the `inprocess` backend.
2. Overlap: a slow remote judge (a server-side delay) scored with `score_async` while a CPU-bound
   rollout-like loop runs (torch matmuls) -> iteration time versus the sum of the parts.

The server runs in this process (uvicorn in a thread) and shares its CPU cores with the client, so on a
small machine the HTTP numbers include contention a separate server host would not have.

    python benchmarks/bench_reward_http.py [--n 128] [--size 64] [--repeats 3] [--out benchmarks/reward_http.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from imagerl.rewards.base import Reward, build_reward  # noqa: E402
from imagerl.rewards.remote import RemoteReward  # noqa: E402
from imagerl.rewards.server import RewardServer, ServerThread  # noqa: E402
from imagerl.types import RewardInput, RewardOutput  # noqa: E402


class SlowJudge(Reward):
    """Server-side stand-in for a slow remote judge: waits `delay_s` per scorer call, then scores brightness."""

    def __init__(self, name: str = "slow_judge", delay_s: float = 0.5) -> None:
        super().__init__(name)
        self.delay_s = delay_s
        self.inner = build_reward({"type": "brightness"})

    def score(self, inp: RewardInput) -> RewardOutput:
        time.sleep(self.delay_s)
        return self.inner(inp)


def batch(n: int, size: int, seed: int = 0) -> RewardInput:
    """Smooth random images (8x8 noise upsampled): PNG compresses them like generated images, whereas
    per-pixel noise is PNG's worst case (about 2x slower to encode, 3-4x larger)."""
    g = torch.Generator().manual_seed(seed)
    colors = ["red", "green", "blue", "yellow"]
    low = torch.rand(n, 3, 8, 8, generator=g)
    imgs = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return RewardInput(images=imgs,
                       prompts=[f"a {colors[i % 4]} square on the left" for i in range(n)],
                       metadata=[{} for _ in range(n)], group_ids=torch.arange(n) // 8)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: imports, connection pool, first-call caches
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def timed_pair(fa: Callable[[], Any], fb: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median times of two functions measured alternately, so load changes on a shared machine hit both."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def rollout_like(steps: int) -> None:
    """CPU-bound work standing in for a rollout: a fixed number of matmuls (torch releases the GIL). Fixed work, not
    a fixed time, so that contention with the scoring side shows up as a longer rollout."""
    a = torch.randn(256, 256)
    for _ in range(steps):
        a = torch.tanh(a @ a.T / 16.0)


def rollout_steps_for(seconds: float) -> int:
    """How many `rollout_like` steps take about `seconds` alone on this machine."""
    rollout_like(20)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        rollout_like(10)
        n += 10
    return max(1, round(n * seconds / (time.perf_counter() - t0)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128, help="images per scoring call")
    ap.add_argument("--n-judge", type=int, default=32, help="images per judge call (the tiny VLM is slower)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--batch-size", type=int, default=32, help="RemoteReward samples per request")
    ap.add_argument("--delay", type=float, default=1.0, help="server-side delay of the slow judge (s)")
    ap.add_argument("--rollout", type=float, default=1.0, help="rollout-like work per iteration (s)")
    ap.add_argument("--n-overlap", type=int, default=32, help="images per batch in the overlap demo")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--out", default="", help="also write the Markdown report here")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    judge_args = {"backend": {"type": "inprocess", "tiny": True, "max_batch": 16, "max_wait_ms": 5}, "top_logprobs": 20,
                  "max_tokens": 1}
    local = {
        "color_position": build_reward({"type": "color_position"}),
        "judge": build_reward({"type": "yes_no_judge", "name": "judge", "args": judge_args}),
    }
    served = {
        "color_position": build_reward({"type": "color_position"}),
        "judge": build_reward({"type": "yes_no_judge", "name": "judge", "args": judge_args}),
        "slow_judge": SlowJudge(delay_s=args.delay),
    }
    from imagerl.rewards.vlm_local import LocalVLMBackend

    srv = RewardServer(served, max_batch=max(64, args.n), max_wait_ms=5,
                       chat_backend=LocalVLMBackend(tiny=True, max_batch=16, max_wait_ms=5))
    th = ServerThread(srv.app).start()
    url = th.url
    rows = []
    try:
        inp = batch(args.n, args.size)
        inp_j = batch(args.n_judge, args.size, seed=1)
        cases = [
            ("color_position", "POST /v1/score", inp, local["color_position"],
             RemoteReward(url=url, rewards=["color_position"], batch_size=args.batch_size)),
            ("yes_no_judge (tiny Qwen2.5-VL)", "POST /v1/score", inp_j, local["judge"],
             RemoteReward(url=url, rewards=["judge"], batch_size=args.batch_size)),
            ("yes_no_judge (tiny Qwen2.5-VL)", "OpenAI chat, `http` backend", inp_j, local["judge"],
             build_reward({"type": "yes_no_judge", "args": {**judge_args, "backend": {
                 "type": "http", "base_urls": [url], "max_concurrency": 16}}})),
        ]
        for name, path, x, loc, rem in cases:
            t_loc, t_rem = timed_pair(lambda: loc(x), lambda: rem(x), args.repeats)
            # same numbers either way (8-bit PNG aside): a transport that changes scores is a bug
            a, b = loc(x).scores, rem(x).scores
            both = ~torch.isnan(a) & ~torch.isnan(b)
            if not torch.equal(torch.isnan(a), torch.isnan(b)):
                raise RuntimeError(f"{name} via {path}: abstains differ between in-process and HTTP")
            diff = float((a[both] - b[both]).abs().max()) if both.any() else float("nan")
            rows.append((name, path, len(x), len(x) / t_loc, len(x) / t_rem, t_rem / t_loc, diff))
            rem.close()
            print(f"{name:32s} {path:30s} in-process {len(x) / t_loc:8.1f} img/s   HTTP {len(x) / t_rem:8.1f} img/s   "
                  f"overhead x{t_rem / t_loc:.2f}   max|diff| {diff:.2e}", flush=True)

        # ---- overlap: slow remote judge + rollout-like work --------------------------------------------
        slow = RemoteReward(url=url, rewards=["slow_judge"], batch_size=args.n_overlap)
        x = batch(args.n_overlap, args.size, seed=2)
        slow(x)  # warm-up
        steps = rollout_steps_for(args.rollout)
        t_roll = timed(lambda: rollout_like(steps), 3)
        t_score = timed(lambda: slow(x), 3)

        def sequential() -> None:
            for _ in range(args.iters):
                rollout_like(steps)
                slow(x)

        async def overlapped() -> None:
            # score batch k while batch k+1 rolls out (the rollout runs in a worker thread so this loop can
            # drive the scoring request); the last batch's score is awaited at the end
            pending = None
            for _ in range(args.iters):
                roll = asyncio.create_task(asyncio.to_thread(rollout_like, steps))
                if pending is not None:
                    await pending
                await roll
                pending = asyncio.create_task(slow.score_async(x))
            await pending

        t_seq, t_ovl = (t / args.iters for t in timed_pair(sequential, lambda: asyncio.run(overlapped()), 3))
        # the best this pipeline can do: the first rollout and the last scoring cannot overlap anything
        floor = (t_roll + (args.iters - 1) * max(t_roll, t_score) + t_score) / args.iters
        slow.close()
        print(f"overlap: rollout {t_roll:.3f}s + score {t_score:.3f}s = {t_roll + t_score:.3f}s; floor {floor:.3f}s; sequential iteration "
              f"{t_seq:.3f}s; overlapped iteration {t_ovl:.3f}s (x{t_seq / t_ovl:.2f} faster)", flush=True)
    finally:
        th.stop()
        srv.close()
        for r in local.values():
            r.close()

    lines = [
        "# Reward transport: HTTP versus in-process",
        "",
        "Reproduce:",
        "",
        "```",
        "python " + " ".join(["benchmarks/bench_reward_http.py", *sys.argv[1:]]),
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"server in the same process (uvicorn thread, 127.0.0.1). Images {args.size}x{args.size}, median of "
        f"{args.repeats} alternating runs after a warm-up; RemoteReward batch_size {args.batch_size}.",
        "",
        "## Throughput",
        "",
        "| scorer | transport | images | in-process img/s | HTTP img/s | HTTP time / in-process time | max abs score diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, path, n, a, b, ratio, diff in rows:
        d = "n/a: every sample abstained on both sides (random tiny judge)" if diff != diff else f"{diff:.1e}"
        lines.append(f"| {name} | {path} | {n} | {a:.1f} | {b:.1f} | {ratio:.2f} | {d} |")
    lines += [
        "",
        "Reading: the ratio is HTTP time over in-process time for the same scorer and images (1.0 = free transport).",
        "Most of the transport cost is PNG encode (client) + decode (server), about 3 ms per 64x64 image on one",
        "core here: it dominates a microsecond pixel rule and is small next to a real VLM judge. Score differences",
        "come from the 8-bit PNG quantisation of float images (in-process scorers see the float tensor).",
        "The tiny judge has random weights, so it rarely says yes/no and abstains; its rows measure transport only.",
        "",
        "## Overlap: slow remote judge scored with `score_async` during rollout-like work",
        "",
        f"Server-side delay {args.delay}s per scorer call, {args.n_overlap} images per batch; rollout-like work: "
        f"a fixed number of torch matmuls taking {args.rollout}s alone; {args.iters} iterations; medians of 3 alternating runs.",
        "",
        "| rollout alone (s) | scoring alone (s) | sum (s) | sequential iteration (s) | overlapped iteration (s) | "
        "pipeline floor (s) | speed-up |",
        "|---|---|---|---|---|---|---|",
        f"| {t_roll:.3f} | {t_score:.3f} | {t_roll + t_score:.3f} | {t_seq:.3f} | {t_ovl:.3f} | {floor:.3f} | "
        f"{t_seq / t_ovl:.2f}x |",
        "",
        f"Pipeline floor = (rollout + (iterations - 1) x max(rollout, scoring) + scoring) / iterations: with {args.iters}",
        "iterations the first rollout and the last scoring overlap nothing, so the best speed-up is sequential / floor",
        f"({t_seq / floor:.2f}x here), approaching (rollout + scoring) / max(rollout, scoring) only over many iterations.",
        "What the overlapped iteration takes above the floor is CPU contention (PNG coding and the server share the",
        "cores with the rollout work, which is fixed work and so slows down under contention) and thread hand-offs.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
