#!/usr/bin/env bash
# Stop 21, H200, the lead's calls: the CUDA tests in tests/gpu (every one, verbose, failures listed),
# and -- with `e2e` as second argument -- the 32-layer Llama-8B-shaped end to end beside DynamicCache
# (eager) and StaticCache (CUDA graph, transformers' own static cache under the bench's graphed decoder).
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop21_lead.sh OUTDIR [e2e]
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD
mkdir -p "$W"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  echo "tree: ${SPECTRALCACHE_COMMIT:-unknown}"
} | tee "$W/env.txt"
if [ "${2:-}" = "e2e" ]; then
  timeout 330 python3 -m spectralcache.cli bench e2e --device cuda --lengths 32k,128k \
    --methods "dynamic;graphed:static;graphed:default;graphed:aggressive" \
    --decode-steps 8 --warmup-steps 3 --time-budget-s 300 --out "$W" --tag h200_llama8b_32l_stop21 \
    > "$W/e2e.log" 2>&1
  echo "[e2e rc=$? after $SECONDS s]"
  tail -30 "$W/e2e.log"
fi
timeout 260 python3 -m pytest -v -n 8 -rf -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_unsloth_cuda.py \
  --timeout 200 > "$W/gpu_tests.log" 2>&1
echo "[tests rc=$? after $SECONDS s]"
grep -E "passed|failed|FAILED|ERROR" "$W/gpu_tests.log" | tail -25
grep -n -A12 "test_compress_blocks_one_sync" "$W/gpu_tests.log" | grep -E "assert|sites|\.py:[0-9]+" | head -20
