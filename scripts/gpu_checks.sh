#!/usr/bin/env bash
# The GPU checks of issue 2, in two calls of the device tool (each well inside its 10-minute limit), after
# `bash scripts/fetch_device_wheels.sh` here:
#   run(command="bash scripts/gpu_checks.sh tests", carry=[".whl"])   # pytest -m gpu + short CUDA trainings
#   run(command="bash scripts/gpu_checks.sh bench", carry=[".whl"])   # the AR rollout benchmark, fp32 and bf16
# Logs land in one archive, $OUT/gpu_checks_<what>.tgz ($OUT: what the device tool brings back, at most 8 files;
# else ./gpu-out), and a summary of every step's exit status and RESULT line ends the output. Record the results
# in benchmarks/ar_rollout.md and benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-tests}
device=${GPU_CHECKS_DEVICE:-cuda}  # (cpu: a dry run of the training part on a machine without a GPU)
out=${OUT:-gpu-out}
logs=$(mktemp -d /tmp/gpu-logs.XXXXXX)
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="$PWD/src:/tmp/site"
else
  export PYTHONPATH="$PWD/src"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -c "import torch, transformers, diffusers, imagerl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', '| transformers', transformers.__version__, '| diffusers', diffusers.__version__)" \
  || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$logs/nvidia-smi.csv" 2>&1

fail=0
step() {  # step NAME CMD...: run, tee the log, remember a failure, go on
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc"
  echo "$name rc=$rc" >> "$logs/summary.txt"
  [ "$rc" = 0 ] || fail=1
}
train() {  # a short CUDA training through the CLI; prints the first-epoch ratio deviation and the rewards
  local name=$1; shift
  rm -rf "/tmp/gpu/$name"  # (a warm machine keeps /tmp: never resume an earlier check)
  step "$name" python3 -m imagerl.cli train "$@" run.device="$device" logging.progress_bar=false run.output_dir="/tmp/gpu/$name"
  python3 - "/tmp/gpu/$name/metrics.jsonl" "$name" <<'PY' 2>&1 | tee -a "$logs/$name.log"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
dev = max(r.get("ratio/first_epoch_max_dev", float("nan")) for r in rows)
n = min(10, len(rows) // 2) or 1
first, last = (sum(r["reward/mean"] for r in rows[:n]) / n, sum(r["reward/mean"] for r in rows[-n:]) / n)
print(f"RESULT {sys.argv[2]}: {len(rows)} steps, reward first {n} {first:.3f} -> last {n} {last:.3f}, max first-epoch |ratio-1| {dev:.2e}")
PY
}

case "$what" in
  tests)
    step pytest_gpu python3 -m pytest -m gpu -q -p no:cacheprovider tests/integration/test_janus_policy.py tests/integration/test_recipes_smoke.py
    train demo_fp32 train.steps=40                                  # the CPU demo, on the GPU (fp32: ratio 1 to 1e-5; CUDA-graph decode)
    train demo_nograph train.steps=40 rollout.cuda_graph=false      # the same, decoding step by step: the same numbers
    train demo_bf16 train.steps=40 run.dtype=bf16                   # the recipe's precision: fp32 weights, bf16 autocast
    train flow_fp32 demo_flow train.steps=20
    train janus_recipe janus_pro_t2i_grpo model.tiny=true model.tiny_size=test train.steps=2
    for r in flow_grpo_sd3 flux_grpo qwen_image_grpo deepgen_mr_grpo; do  # bf16 weights + autocast, on the GPU
      train "recipe_$r" "$r" model.tiny=true model.tiny_size=test data.prompts_per_step=2 rollout.group_size=4 train.steps=2
    done
    ;;
  bench)
    step bench_fp32 python3 benchmarks/bench_ar_rollout.py --device "$device" --batch 1,8,32 --repeats 5 --threads 8 --peak-n 8192
    step bench_bf16 python3 benchmarks/bench_ar_rollout.py --device "$device" --dtype bf16 --batch 1,8,32 --repeats 5 --threads 8 --peak-n 8192 --skip-hf-modules
    ;;
  *) echo "usage: gpu_checks.sh tests|bench"; exit 2 ;;
esac
grep -H "^RESULT" "$logs"/*.log >> "$logs/summary.txt"
tar czf "$out/gpu_checks_$what.tgz" -C "$logs" .
echo "=== summary"; cat "$logs/summary.txt"
if [ "$fail" = 0 ]; then echo "gpu_checks $what: all passed"; else echo "gpu_checks $what: SOME FAILED (see the logs)"; fi
exit $fail
