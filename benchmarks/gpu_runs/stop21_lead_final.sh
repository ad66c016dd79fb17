#!/usr/bin/env bash
# Stop 21, H200, the lead's last call: the default preset with its value bytes stored tokens-contiguous
# (cache/layer.py since 9cbe8db; `channel_zp_vt` in the dev script = that layout on a synthetic state,
# `channel_zp` = the row-major layout the cache stored before), timed beside SDPA, plus the CUDA tests
# and the 32-layer end to end at 128K.
#   A. (parallel, CPU-bound compiles) tests/gpu in two pytest runs (the kernel's own file apart);
#      warm-up compiles of what B times (Triton's on-disk cache);
#   B. side by side at 128K batch 1 (the automatic plan = 3 stages for tokens-contiguous values, and 2);
#      the time section: 128K / 32K / 4K x batch 1 / 8, graph replay beside SDPA, copy bandwidth;
#   C. end to end, 32 layers, 128K: DynamicCache (eager), StaticCache (CUDA graph), the default (graphed).
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop21_lead_final.sh OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W"/{t1,t2,w1,w2,v128k,time,e2e}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  echo "tree: ${SPECTRALCACHE_COMMIT:-unknown}"
} | tee "$W/env.txt"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm none --v-block-stages none --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride none --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none --v-key-raw none --v-outlier-cols none --v-ablate none'
EX='[{},{"num_stages":2},{"num_stages":3}]'
timeout 220 python3 -m pytest -v -n 4 -rf -p no:cacheprovider tests/gpu/test_compress_cuda.py \
  tests/gpu/test_graphed_cuda.py tests/gpu/test_kernel_presets_cuda.py tests/gpu/test_prefill_syncs_cuda.py \
  --timeout 200 > "$W/t1/log" 2>&1 &
timeout 220 python3 -m pytest -v -n 6 -rf -p no:cacheprovider tests/gpu/test_triton_decode_cuda.py \
  --timeout 200 > "$W/t2/log" 2>&1 &
# shellcheck disable=SC2086
timeout 200 python3 $K --out "$W/w1" --sections variants --variant-cells 4096x1,32768x8 $PIN \
  --variant-presets channel_zp_vt,channel_zp --v-extra "$EX" > "$W/w1/log" 2>&1 &
timeout 200 python3 $K --out "$W/w2" --sections time --contexts 4096 --batches 1,8 --no-ref \
  --time-presets channel_zp_vt,channel_zp,aggressive > "$W/w2/log" 2>&1 &
wait
for t in t1 t2; do grep -E "passed|failed" "$W/$t/log" | tail -1; grep "^FAILED" "$W/$t/log" | head -10; done
grep -h -A3 "Traceback" "$W"/w?/log | head -20
echo "[A done $SECONDS s]"
# shellcheck disable=SC2086
timeout 90 python3 $K --out "$W/v128k" --sections variants --variant-cells 131072x1 $PIN \
  --variant-presets channel_zp_vt,channel_zp --v-extra "$EX" > "$W/v128k/log" 2>&1
grep -h "^variant  *[0-9]\|variant failed" "$W/v128k/log"
timeout 120 python3 $K --out "$W/time" --sections copy,time --contexts 131072,32768,4096 --batches 1,8 \
  --no-ref --time-presets channel_zp_vt,channel_zp,aggressive > "$W/time/log" 2>&1
grep -h "copy bandwidth\|^ *[0-9]* B[18] " "$W/time/log"
echo "[B done $SECONDS s]"
timeout 100 python3 -m spectralcache.cli bench e2e --device cuda --lengths 128k \
  --methods "dynamic;graphed:static;graphed:default" --decode-steps 8 --warmup-steps 3 --time-budget-s 90 --no-plot \
  --out "$W/e2e" --tag h200_llama8b_32l_stop21 > "$W/e2e/log" 2>&1
echo "[e2e rc=$?]"; tail -12 "$W/e2e/log"
echo "[C done $SECONDS s]"
