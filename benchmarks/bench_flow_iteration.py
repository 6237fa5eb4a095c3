"""Seconds per GRPO iteration (rollout / train split) of a flow policy: our scheme versus the straightforward
scheme of peer training scripts, measured side by side in ONE run on the same model, prompts and seed, plus
achieved FLOP/s against a matmul peak measured in the same run.

Model: the SD3 adapter's `bench` preset (the real diffusers SD3Transformer2DModel / AutoencoderKL / CLIP / T5
classes at tiny size, random weights, offline), LoRA r=16 on the attention projections.

Schemes (same prompts, group size, steps, SDE, noise level, CFG scale):
  peer            rollout one sample at a time (cond+uncond batched as in diffusers' pipeline), CFG also in
                  training, every SDE step trained, one timestep and ONE sample per forward (batch 1).
  ours_same_algo  exactly the peer's algorithm (CFG in rollout and training, every step trained), but batched:
                  the whole rollout in one forward per step, training micro-batches of all samples per step.
  ours            the DeepGen-RL-style configuration this project recommends: batched as above, no CFG in
                  rollout/training (cfg_in_training=false; CFG only at evaluation), timestep_fraction=0.6.

    .venv/bin/python benchmarks/bench_flow_iteration.py [--repeats 3] [--threads 1] [--steps 10]

FLOPs are counted with torch.utils.flop_counter (matmuls/convolutions/attention) in an untimed pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from imagerl.config import Config  # noqa: E402
from imagerl.types import PromptBatch  # noqa: E402

PROMPTS = ["a red square on the left", "a blue circle on the top", "a green star on the right", "a white triangle on the bottom"]


def make_policy(args, scheme: str):
    from imagerl.policies.flow.sd3 import SD3Policy

    cfg = Config()
    cfg.run.seed = 0
    cfg.model.family, cfg.model.tiny, cfg.model.tiny_size = "sd3", True, "bench"
    cfg.model.lora.enabled, cfg.model.lora.r, cfg.model.lora.alpha = True, 16, 32.0
    r, a = cfg.rollout, cfg.algorithm
    r.num_steps, r.sde, r.noise_level, r.cfg_scale = args.steps, "flow_grpo", 0.7, 4.5
    n = args.prompts * args.group
    if scheme == "peer":
        r.micro_batch_size, r.cfg_in_training, a.timestep_fraction, a.micro_batch_size = 1, True, 1.0, 1
    elif scheme == "ours_same_algo":
        r.micro_batch_size, r.cfg_in_training, a.timestep_fraction, a.micro_batch_size = 0, True, 1.0, n
    else:
        r.micro_batch_size, r.cfg_in_training, a.timestep_fraction, a.micro_batch_size = 0, False, 0.6, n
    pol = SD3Policy(cfg, torch.device("cpu"))
    pol.eval()
    return pol


def iteration(pol, args, seed: int) -> tuple[float, float]:
    """One GRPO iteration without rewards (random advantages): rollout, then the trainer's inner loop
    (micro-batches x unit chunks, gradient accumulation, one optimizer step). Returns (rollout s, train s)."""
    a = pol.cfg.algorithm
    opt = pol._bench_opt
    g = torch.Generator().manual_seed(seed)
    batch = PromptBatch(prompts=PROMPTS[: args.prompts], metadata=[{}] * args.prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        ro = pol.rollout(batch, args.group, g)
    t1 = time.perf_counter()
    adv = torch.randn(len(ro), generator=g)
    opt.zero_grad(set_to_none=True)
    for lo in range(0, len(ro), a.micro_batch_size):
        idx = torch.arange(lo, min(lo + a.micro_batch_size, len(ro)))
        sub = ro.select(idx)
        for units in pol.unit_chunks(sub, g):
            out = pol.log_prob(sub, units)
            ratio = torch.exp(out.logp - sub.old_logp[:, units])
            loss = -(torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4) * adv[idx, None]).mean()
            loss.backward()
    opt.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def count_flops(pol, args) -> tuple[float, float]:
    with FlopCounterMode(display=False) as fc:
        g = torch.Generator().manual_seed(123)
        batch = PromptBatch(prompts=PROMPTS[: args.prompts], metadata=[{}] * args.prompts)
        with torch.no_grad():
            ro = pol.rollout(batch, args.group, g)
    roll = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        a = pol.cfg.algorithm
        for lo in range(0, len(ro), a.micro_batch_size):
            sub = ro.select(torch.arange(lo, min(lo + a.micro_batch_size, len(ro))))
            for units in pol.unit_chunks(sub, g):
                pol.log_prob(sub, units).logp.sum().backward()
    pol._bench_opt.zero_grad(set_to_none=True)
    return float(roll), float(fc.get_total_flops())


def matmul_peak(seconds: float = 2.0, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed on a shared CPU)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per rollout")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schemes = ["peer", "ours_same_algo", "ours"]
    pols = {}
    for s in schemes:
        pols[s] = make_policy(args, s)
        pols[s]._bench_opt = torch.optim.AdamW(pols[s].trainable_parameters(), lr=1e-4)
    peak = matmul_peak()
    flops = {s: count_flops(pols[s], args) for s in schemes}
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in schemes}
    for s in schemes:  # warm-up
        iteration(pols[s], args, seed=999)
    for rep in range(args.repeats):  # interleaved so machine-load drift hits every scheme alike
        for s in schemes:
            times[s].append(iteration(pols[s], args, seed=rep))
    n = args.prompts * args.group
    print(f"SD3 bench preset, LoRA r=16, {args.prompts} prompts x {args.group} = {n} samples, {args.steps} steps, "
          f"flow_grpo a=0.7, cfg 4.5, threads={args.threads}, median of {args.repeats}")
    print(f"matmul peak (fp32 {1024}^3): {peak / 1e9:.1f} GFLOP/s")
    print("| scheme | rollout s | train s | iteration s | speedup vs peer | rollout GFLOP | train GFLOP | achieved GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for s in schemes:
        ro = statistics.median(t[0] for t in times[s])
        tr = statistics.median(t[1] for t in times[s])
        it = statistics.median(t[0] + t[1] for t in times[s])
        base = base or it
        fl = sum(flops[s])
        ach = fl / it
        print(f"| {s} | {ro:.2f} | {tr:.2f} | {it:.2f} | {base / it:.2f}x | {flops[s][0] / 1e9:.1f} | "
              f"{flops[s][1] / 1e9:.1f} | {ach / 1e9:.1f} | {100 * ach / peak:.0f}% |")


if __name__ == "__main__":
    main()
