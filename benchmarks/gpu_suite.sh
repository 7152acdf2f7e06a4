#!/usr/bin/env bash
# The GPU figures of this project, on one H100/H200 machine, in at most ~8 minutes:
#   1. MFU of configs/llama-1b-gpu.yaml through the real `raylm pretrain` path (1 GPU worker)
#   2. MFU of configs/gpt-125m-gpu.yaml, the same way
#   3. vLLM serving throughput (benchmarks/serve.py: vLLM's own server and raylm with serve.engine=vllm, c16)
#   4. one PPO iteration with vLLM rollout (tiny models: data -> pretrain -> sft -> reward, then `raylm ppo`)
# Each prints one line "gpu_suite: <what>: <figure>"; the full logs go to $OUT_DIR (default a temp dir).
#
#   benchmarks/gpu_suite.sh                     # PYTHON=.venv/bin/python VLLM_PYTHON=~/.cache/raylm/vllm-venv/bin/python
#
# Without a GPU it exits at once with status 2 and says so (tests/test_gpu_suite.py). Steps 3-4 need a Python with
# vllm (`python -m serve.vllm_engine --setup` makes one); without it they print "skipped" with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu_suite: no NVIDIA GPU visible (nvidia-smi -L lists none); this suite needs one H100/H200. Nothing ran." >&2
    exit 2
fi
PY=${PYTHON:-.venv/bin/python}
VLLM_PY=${VLLM_PYTHON:-$HOME/.cache/raylm/vllm-venv/bin/python}
OUT_DIR=${OUT_DIR:-$(mktemp -d -t raylm-gpu-suite-XXXX)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
ONE_GPU=(pretrain.num_workers=1 ray.num_gpus=1 pretrain.placement_strategy=PACK pretrain.cpus_per_worker=8)
echo "gpu_suite: $(nvidia-smi -L | head -1); logs in $OUT_DIR"

field() {  # the number after "KEY": in a log (the benchmarks end with JSON)
    grep -o "\"$1\": [0-9.]*" "$2" | tail -1 | awk '{print $2}'
}

# 1-2. MFU through `raylm pretrain` (synthetic shards; the plain-PyTorch baseline is skipped to save time).
timeout 200 "$PY" benchmarks/pretrain_mfu.py -c configs/llama-1b-gpu.yaml --steps 12 --sequences 512 --no-baseline \
    "${ONE_GPU[@]}" pretrain.grad_accum=4 > "$OUT_DIR/mfu-1b.log" 2>&1
echo "gpu_suite: llama-1b MFU (1 GPU, raylm pretrain): $(field raylm_mfu "$OUT_DIR/mfu-1b.log" || true) (tokens/s $(field raylm_tokens_per_s "$OUT_DIR/mfu-1b.log"))"
timeout 120 "$PY" benchmarks/pretrain_mfu.py -c configs/gpt-125m-gpu.yaml --steps 30 --sequences 4096 --no-baseline \
    "${ONE_GPU[@]}" > "$OUT_DIR/mfu-125m.log" 2>&1
echo "gpu_suite: gpt-125m MFU (1 GPU, raylm pretrain): $(field raylm_mfu "$OUT_DIR/mfu-125m.log") (tokens/s $(field raylm_tokens_per_s "$OUT_DIR/mfu-125m.log"))"

if [ ! -x "$VLLM_PY" ]; then
    echo "gpu_suite: vllm serving: skipped (no Python with vllm at $VLLM_PY; python -m serve.vllm_engine --setup)"
    echo "gpu_suite: ppo iteration with vllm rollout: skipped (same reason)"
    exit 0
fi
# 3. Serving: the tiny chat model, 256 requests at concurrency 16, 32 tokens each.
timeout 150 "$PY" benchmarks/serve.py --vllm-python "$VLLM_PY" --concurrency 16 --requests 256 \
    > "$OUT_DIR/serve.log" 2>&1
"$PY" - "$OUT_DIR/serve.log" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith('{"benchmark": "serve"')]
if not lines:
    print("gpu_suite: vllm serving c16: failed (see serve.log)")
else:
    res = json.loads(lines[-1])["results"]
    print("gpu_suite: vllm serving c16 output tokens/s: " + ", ".join(
        f"{k} {v['c16']['tokens_per_s']:.0f}" for k, v in res.items()))
EOF
# 4. PPO: the tiny recipe's models, shortened, then one iteration with vLLM rollout on the GPU.
RUN=$OUT_DIR/ppo-run
timeout 150 "$PY" -m cluster.cli run --stages data,pretrain,sft,reward --run-dir "$RUN" pretrain.max_steps=20 \
    sft.max_steps=10 reward.max_steps=10 > "$OUT_DIR/ppo-prep.log" 2>&1
start=$(date +%s)
if timeout 120 "$PY" -m cluster.cli ppo --run-dir "$RUN" ppo.rollout_engine=vllm ppo.iterations=1 \
    > "$OUT_DIR/ppo.log" 2>&1; then
    echo "gpu_suite: ppo iteration with vllm rollout: $(( $(date +%s) - start )) s for the stage (1 iteration, incl. start-up)"
else
    echo "gpu_suite: ppo iteration with vllm rollout: failed (see $OUT_DIR/ppo.log)"
fi
