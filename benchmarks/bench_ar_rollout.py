"""Janus image-token rollout speed: imagerl's sampler vs transformers' `generate(generation_mode="image")`.

Both run in this one process on the same tiny Janus ("bench" preset: 16x16 = 256 image tokens, a 4-layer
Llama of hidden 256, 1024 codes), the same prompts, batch, CFG scale and sampling settings, after warm-up,
interleaved repeats, median. Only token sampling is timed (VQ decoding is the same call for both and is
reported on its own). Also measured in the same run: the machine's matmul peak in the model's dtype (a large square
matmul), and the FLOP/s our sampler achieves with the model FLOPs counted analytically, as a fraction
of that peak.

    python benchmarks/bench_ar_rollout.py --threads 2 --batch 1,8
    python benchmarks/bench_ar_rollout.py --device cuda --batch 1,8,32 [--dtype bf16]    # on a GPU

Variants timed:
  imagerl       JanusPolicy.sample_tokens as rollout() runs it by default: FastLlamaDecoder on prepared weights
                (the time includes preparing the weights and the embedding table, done once per call); on CUDA
                the fixed-shape decode step captured once as a CUDA graph and replayed per token
                (rollout.cuda_graph null = on for CUDA), on a CPU the live-length loop
  imagerl-live  (CUDA) the same with rollout.cuda_graph=false: the live-length loop, step by step
  imagerl-hf    the live-length loop through the transformers modules (use_fast_decoder=False)
  imagerl-static (CPU, `--static`) rollout.cuda_graph=true on a CPU: the fixed-shape step, eagerly
  transformers  model.generate(generation_mode="image") (static cache, logits processors)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA runs asynchronously; the clock must see finished work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(n: int, repeats: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n x n @ n x n matmul in `dtype` on `device` (the model's dtype: a bf16 model on a GPU
    is measured against the bf16 tensor-core peak, not the fp32 one)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops_per_image(pol, prompt_len: int, cfg_rows: int) -> float:
    """Analytic FLOPs to sample one image: for every image token and every CFG row, 2 x (weights touched:
    language model without embeddings, generation head, image-embedding aligner) + attention
    (4 x layers x context x hidden: scores and weighted values). The vocabulary projection is counted
    on every row, as transformers computes it (ours mixes CFG before it and does half of it)."""
    m = pol.model
    lm = pol._base_lm()
    lm_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n and "norm" not in n)
    head = sum(p.numel() for p in m.model.generation_head.parameters() if p.dim() == 2)
    aligner = sum(p.numel() for p in m.model.generation_aligner.parameters() if p.dim() == 2)
    c = lm.config
    T = pol.num_image_tokens
    total = 0.0
    for t in range(T):
        ctx = prompt_len + t + 1
        total += cfg_rows * (2 * (lm_params + head + aligner) + 4 * c.num_hidden_layers * ctx * c.hidden_size)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=str, default="8", help="images per call (CFG doubles the rows); a comma list sweeps")
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", default="bench", help="tiny preset (bench | demo | test)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="architecture knob of the random model (model.tiny_overrides: hidden_size, intermediate_size, "
                         "num_layers, num_heads, num_kv_heads, grid, codebook_size), e.g. a Janus-Pro-1B-shaped one")
    ap.add_argument("--peak-n", type=int, default=2048)
    ap.add_argument("--skip-hf-modules", action="store_true", help="do not time the imagerl-hf variant")
    ap.add_argument("--static", action="store_true", help="on a CPU, also time the fixed-shape step eagerly")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (the model and both samplers run there)")
    ap.add_argument("--dtype", default="fp32", help="model weights: fp32 | bf16 | fp16 (bf16 is what GPUs run)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from imagerl.config import load_config
    from imagerl.policies.ar.janus import JanusPolicy

    cfg = load_config(None, [
        "model.tiny=true", f"model.tiny_size={args.size}", f"rollout.cfg_scale={args.cfg_scale}",
        f"rollout.temperature={args.temperature}", f"rollout.top_k={args.top_k}", f"rollout.top_p={args.top_p}",
        f"model.dtype={args.dtype}", *(f"model.tiny_overrides.{kv}" for kv in args.override),
    ])
    device = torch.device(args.device)
    pol = JanusPolicy(cfg, device)
    peak_dtype = next(pol.model.parameters()).dtype
    peak = matmul_peak(args.peak_n, 5, device, peak_dtype)
    print(f"{args.dtype} matmul peak ({args.peak_n}^3, {device}, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    speedups = []
    for b in [int(x) for x in args.batch.split(",")]:
        speedups.append(run_batch(args, pol, b, peak))
    print(f"RESULT speedup={','.join(f'{x[0]:.2f}' for x in speedups)}"
          + (f" live={','.join(f'{x[1]:.2f}' for x in speedups)}" if device.type == "cuda" else ""))
    return 0


def run_batch(args, pol, batch: int, peak: float) -> tuple[float, float]:
    from transformers import GenerationConfig

    # one prompt repeated: transformers' generate counts pad slots as positions, so equal lengths keep
    # the two samplers on the same computation
    enc = pol.encode_prompts(["a red square on the left of a blue circle"] * batch)
    P, T = enc.ids.shape[1], pol.num_image_tokens
    gen = torch.Generator().manual_seed(0)
    gc = GenerationConfig(
        do_sample=True, guidance_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, bos_token_id=pol.bos_id, pad_token_id=pol.pad_id,
        eos_token_id=pol.tokenizer.eos_token_id, generation_kwargs={"boi_token_id": pol.boi_id}, max_new_tokens=T,
    )

    def ours() -> torch.Tensor:
        with torch.inference_mode():
            return pol.sample_tokens(enc.ids, enc.valid, pol.params, gen).tokens

    def ours_with(**switches):
        """`ours` with policy switches (use_fast_decoder, decode_static) set for the call."""
        def run() -> torch.Tensor:
            old = {k: getattr(pol, k) for k in switches}
            for k, v in switches.items():
                setattr(pol, k, v)
            try:
                return ours()
            finally:
                for k, v in old.items():
                    setattr(pol, k, v)
        return run

    def hf() -> torch.Tensor:
        torch.manual_seed(0)
        with torch.inference_mode():
            return pol.model.generate(enc.ids, attention_mask=enc.valid.long(), generation_mode="image", generation_config=gc)

    variants = {"imagerl": ours, "transformers": hf}
    if pol.device.type == "cuda":
        variants["imagerl-live"] = ours_with(decode_static="")
    if not args.skip_hf_modules:
        variants["imagerl-hf"] = ours_with(decode_static="", use_fast_decoder=False)
    if args.static and pol.device.type != "cuda":
        variants["imagerl-static"] = ours_with(decode_static="eager")
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for name, f in variants.items():
        for _ in range(args.warmup):
            out = f()
            assert out.shape == (batch, T), (name, out.shape)
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all variants alike
        for name, f in variants.items():
            sync(pol.device)
            t, c = time.perf_counter(), time.process_time()
            f()
            sync(pol.device)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    with torch.inference_mode():
        tok = ours()
        sync(pol.device)
        t = time.perf_counter()
        pol.decode_images(tok)
        sync(pol.device)
        vq_s = time.perf_counter() - t

    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: batch * T / v for k, v in med.items()}
    rows = 2 if args.cfg_scale != 1 else 1
    flops = batch * model_flops_per_image(pol, P, rows)
    n_params = sum(p.numel() for p in pol._base_lm().parameters())
    shape = f" with {' '.join(args.override)}" if args.override else ""
    print(f"# Janus rollout benchmark ({args.size} preset{shape}: {pol.grid}x{pol.grid} = {T} image tokens, "
          f"LM {n_params / 1e6:.2f} M params, prompt {P} tokens)")
    print(f"# torch {torch.__version__}, threads {args.threads}, batch {batch} images (x{rows} CFG rows), "
          f"{args.dtype} weights, cfg {args.cfg_scale}, temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, "
          f"repeats {args.repeats} (median), cpu {os.cpu_count()} cores, device {pol.device}"
          + (f" ({torch.cuda.get_device_name(pol.device)})" if pol.device.type == "cuda" else ""))
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print("| sampler | median wall s / batch | image tokens / s (wall) | speed-up vs transformers (wall) | "
          "min wall s | max wall s | median CPU s | speed-up (CPU time) |")
    print("|---|---|---|---|---|---|---|---|")
    for k in variants:
        print(f"| {k} | {med[k]:.3f} | {tps[k]:.0f} | {tps[k] / tps['transformers']:.2f}x | "
              f"{min(times[k]):.3f} | {max(times[k]):.3f} | {cmed[k]:.3f} | {cmed['transformers'] / cmed[k]:.2f}x |")
    ach = flops / med["imagerl"]
    print(f"imagerl sampler: {flops / 1e9:.2f} GFLOP per batch (analytic), {ach / 1e9:.2f} GFLOP/s = "
          f"{100 * ach / peak:.1f}% of the matmul peak")
    print(f"transformers generate: {flops / med['transformers'] / 1e9:.2f} GFLOP/s = "
          f"{100 * flops / med['transformers'] / peak:.1f}% of the matmul peak")
    print(f"VQ decode of the batch (not in the timings above): {vq_s:.3f} s")
    print()
    return tps["imagerl"] / tps["transformers"], tps.get("imagerl-live", 0.0) / tps["transformers"]


if __name__ == "__main__":
    sys.exit(main())
