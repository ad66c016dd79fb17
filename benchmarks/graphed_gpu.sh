#!/usr/bin/env bash
# Graphed decode on one GPU: the capture / replay tests, then the 32-layer Llama-8B-shaped model
# decoding eager vs from a CUDA graph, side by side in one process (spectralcache bench e2e).
#
#   OUT=<dir> bash benchmarks/graphed_gpu.sh [TEST_S] [E2E_S]
#
# Needs pytest on the device machine: the wheels in .whl/prefill (carried) are installed first.
set -uo pipefail
OUT=${OUT:-/tmp/graphed_gpu}
test_s=${1:-110}
e2e_s=${2:-170}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --find-links .whl/prefill pytest hypothesis -t /tmp/site 2>&1 | tail -2
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"
timeout "$test_s" python3 -m pytest -q -p no:cacheprovider --tb=short tests/gpu/test_graphed_cuda.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout "$e2e_s" python3 -m spectralcache.cli bench e2e --device cuda --lengths 32k,128k \
    --methods "dynamic;graphed:static;graphed:default;default;graphed:aggressive" \
    --decode-steps 8 --warmup-steps 3 --time-budget-s $((e2e_s - 20)) --no-plot \
    --out "$OUT" --tag cuda_llama8b_32l_graphed 2>&1 | tee "$OUT/e2e.log"
