#!/usr/bin/env bash
# Stop 24, H200, the lead's calls:
#   breakdown -- benchmarks/decode_breakdown_gpu.py: split / combine kernel times per graph replay, the combine
#                plan before stop 24 (oldcomb) against the automatic one (base), and plan knobs, side by side;
#   attention -- `spectralcache bench attention` (the issue's grid, graph columns);
#   e2e       -- `spectralcache bench e2e` at 32K / 128K (DynamicCache eager, the default graphed);
#   tests     -- tests/gpu (two pytest runs side by side, the kernel's own file apart).
# Usage (repo root, device machine): SPECTRALCACHE_COMMIT=<tree> bash benchmarks/gpu_runs/stop24_lead.sh "breakdown attention" OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
PARTS=${1:?parts: breakdown attention e2e tests}
W=${2:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD TQDM_MININTERVAL=5
mkdir -p "$W"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  echo "tree: ${SPECTRALCACHE_COMMIT:-unknown}"
} | tee "$W/env.txt"
for P in $PARTS; do
if [ "$P" = breakdown ]; then
  mkdir -p "$W/breakdown"
  timeout "${BD_LIMIT:-150}" python3 benchmarks/decode_breakdown_gpu.py --variants "${BD_VARIANTS:-base,noflag,nomask,base,noflag}" \
    --out "$W/breakdown" 2>&1 | grep -v -i warn | tee "$W/breakdown/log"
  echo "[breakdown done $SECONDS s]"
elif [ "$P" = attention ]; then
  mkdir -p "$W/attention"
  timeout 240 python3 -m spectralcache.cli bench attention --device cuda --contexts 4096,16384,32768,65536,131072 \
    --batches 1,8 --presets default,aggressive --methods sdpa,sdpa_graph,kernel,kernel_graph \
    --out "$W/attention" --tag h200_stop24 > "$W/attention/log" 2>&1
  echo "[attention rc=$? $SECONDS s]"; grep -E "^ +[0-9]+ +[18] +(default|aggressive|-) +(sdpa_graph|kernel_graph)" "$W/attention/log"
elif [ "$P" = e2e ]; then
  mkdir -p "$W/e2e"
  timeout 240 python3 -m spectralcache.cli bench e2e --device cuda --lengths 32k,128k \
    --methods "dynamic;graphed:default" --decode-steps 16 --warmup-steps 3 --time-budget-s 200 \
    --out "$W/e2e" --tag h200_stop24 > "$W/e2e/log" 2>&1
  echo "[e2e rc=$? $SECONDS s]"; tail -8 "$W/e2e/log"
elif [ "$P" = tests ]; then
  mkdir -p "$W"/{t1,t2}
  timeout 280 python3 -m pytest -v -n 4 -rf -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_triton_decode_cuda.py \
    --ignore=tests/gpu/test_unsloth_cuda.py --timeout 270 > "$W/t1/log" 2>&1 &
  timeout 280 python3 -m pytest -v -n 8 -rf -p no:cacheprovider tests/gpu/test_triton_decode_cuda.py tests/unit/test_decode_stop24.py \
    --timeout 270 > "$W/t2/log" 2>&1 &
  wait
  for t in t1 t2; do grep -E "passed|failed" "$W/$t/log" | tail -1; grep -c PASSED "$W/$t/log"; grep "FAILED" "$W/$t/log" | head -10; done
  echo "[tests done $SECONDS s]"
else
  echo "unknown part $P"; exit 2
fi
done
