#!/usr/bin/env bash
# Stop 23, H200, the lead's calls:
#   scan      -- benchmarks/decode_plan_scan_gpu.py: block lengths (compress_tail's T') and launch plans on
#                the state a real cache builds, graph replays with the L2 cleared, beside SDPA (CELLS: env);
#   verify    -- the same script's --matrix verify: the block-length rule and plan before stop 23 against now;
#   extra     -- its --matrix extra: the aggressive preset's batch-1 register plan, the default's short rows;
#   vspad     -- its --matrix vspad: a57db0e's padded value scales against the mask t < T (not run in stop 23);
#   attention -- `spectralcache bench attention` (the issue's grid, graph columns);
#   e2e       -- `spectralcache bench e2e` at 32K / 128K (DynamicCache eager, the default graphed);
#   tests     -- tests/gpu (two pytest runs side by side, the kernel's own file apart).
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop23_lead.sh "verify attention" OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
PARTS=${1:?parts: scan verify attention e2e tests}
W=${2:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD TQDM_MININTERVAL=5
mkdir -p "$W"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  echo "tree: ${SPECTRALCACHE_COMMIT:-unknown}"
} | tee "$W/env.txt"
for P in $PARTS; do
if [ "$P" = scan ] || [ "$P" = verify ] || [ "$P" = extra ] || [ "$P" = knobs ] || [ "$P" = knobs2 ] || [ "$P" = knobs3 ] || [ "$P" = vspad ]; then
  # scan: the block lengths and plans timed (CELLS); verify: the rule before stop 23 against the committed one;
  # extra: the aggressive preset's batch-1 register plan, then the default's second-wave rows at 128K
  mkdir -p "$W/$P"
  if [ "$P" = knobs2 ]; then
    timeout 200 python3 benchmarks/decode_plan_scan_gpu.py --matrix knobs2 --extra-presets aggressive \
      --extra-plans base,w2p8,w2p6 --out "$W/$P" 2>&1 | grep -v Warning | tee "$W/$P/log"
  elif [ "$P" = extra ]; then
    timeout 150 python3 benchmarks/decode_plan_scan_gpu.py --matrix extra --preset aggressive --extra-presets "" \
      --out "$W/$P/aggressive" 2>&1 | grep -v Warning | tee "$W/$P/log"
    timeout 100 python3 benchmarks/decode_plan_scan_gpu.py --matrix extra --cells 131072x1 --extra-presets "" \
      --out "$W/$P/default" 2>&1 | grep -v Warning | tee -a "$W/$P/log"
  else
    timeout "${SCAN_LIMIT:-500}" python3 benchmarks/decode_plan_scan_gpu.py --matrix "$P" --cells "${CELLS:-all}" \
      --extra-presets "${EXTRA:-aggressive}" --out "$W/$P" 2>&1 | grep -v Warning | tee "$W/$P/log"
  fi
  echo "[$P done $SECONDS s]"
elif [ "$P" = attention ]; then
  mkdir -p "$W/attention"
  timeout 240 python3 -m spectralcache.cli bench attention --device cuda --contexts 4096,16384,32768,65536,131072 \
    --batches 1,8 --presets default,aggressive --methods sdpa,sdpa_graph,kernel,kernel_graph \
    --out "$W/attention" --tag h200_stop23 > "$W/attention/log" 2>&1
  echo "[attention rc=$? $SECONDS s]"; grep -E "^ +[0-9]+ +[18] +(default|aggressive|-) +(sdpa_graph|kernel_graph)" "$W/attention/log"
elif [ "$P" = e2e ]; then
  mkdir -p "$W/e2e"
  timeout 240 python3 -m spectralcache.cli bench e2e --device cuda --lengths 32k,128k \
    --methods "dynamic;graphed:default" --decode-steps 16 --warmup-steps 3 --time-budget-s 200 \
    --out "$W/e2e" --tag h200_stop23 > "$W/e2e/log" 2>&1
  echo "[e2e rc=$? $SECONDS s]"; tail -8 "$W/e2e/log"
elif [ "$P" = tests ]; then
  mkdir -p "$W"/{t1,t2}
  timeout 280 python3 -m pytest -v -n 4 -rf -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_triton_decode_cuda.py \
    --ignore=tests/gpu/test_unsloth_cuda.py --timeout 270 > "$W/t1/log" 2>&1 &
  timeout 280 python3 -m pytest -v -n 8 -rf -p no:cacheprovider tests/gpu/test_triton_decode_cuda.py \
    --timeout 270 > "$W/t2/log" 2>&1 &
  wait
  for t in t1 t2; do grep -E "passed|failed" "$W/$t/log" | tail -1; grep -c PASSED "$W/$t/log"; grep "FAILED" "$W/$t/log" | head -10; done
  echo "[tests done $SECONDS s]"
else
  echo "unknown part $P"; exit 2
fi
done
