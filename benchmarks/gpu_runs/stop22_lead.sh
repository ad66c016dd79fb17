#!/usr/bin/env bash
# Stop 22, H200, the lead's calls (run on the final kernel tree):
#   tests  -- tests/gpu in two pytest runs side by side (the kernel's own file apart), generous limits;
#   bench  -- `spectralcache bench attention`, the issue's grid (4K/16K/64K/128K x batch 1/8 x default /
#             aggressive) with the graphed columns new in stop 22 (sdpa_graph, kernel_graph), the torch
#             reference and the decode step; then `spectralcache bench e2e`: the 32-layer Llama-8B-shaped
#             model at 32K (DynamicCache eager, the default graphed) and Gemma 3 270M's architecture with
#             random weights (--model gemma3-270m-shape) graphed at 4K and 32K (16K: the probe).
#   final  -- value rows aligned vs not (benchmarks/value_align_gpu.py), the bench grid, tests/gpu whole;
#   probe  -- the new graphed paths alone (sliding-window capture, bench graph columns, Gemma shape graphed).
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop22_lead.sh probe|bench|final|fix|tests OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
PART=${1:?tests or bench}
W=${2:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD TQDM_MININTERVAL=5
mkdir -p "$W"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  echo "tree: ${SPECTRALCACHE_COMMIT:-unknown}"
} | tee "$W/env.txt"
if [ "$PART" = probe ]; then
  # the new graphed paths first: the sliding-window capture on a tiny Gemma 3, the bench's graph
  # columns, and Gemma 3 270M's architecture decoded graphed at 16K
  mkdir -p "$W"/{p1,e2e}
  timeout 200 python3 -m pytest -v -rf -p no:cacheprovider tests/gpu/test_graphed_cuda.py \
    tests/gpu/test_bench_attention_cuda.py --timeout 190 > "$W/p1/log" 2>&1
  grep -E "passed|failed" "$W/p1/log" | tail -1; grep -E "^FAILED|^E  " "$W/p1/log" | head -20
  timeout 150 python3 -m spectralcache.cli bench e2e --device cuda --model gemma3-270m-shape --lengths 16k \
    --methods "dynamic;graphed:default;default;dynamic#again" --decode-steps 16 --warmup-steps 3 --time-budget-s 120 \
    --no-plot --out "$W/e2e" --tag h200_gemma3_shape_probe > "$W/e2e/gemma_probe.log" 2>&1
  echo "[e2e gemma rc=$?]"; tail -8 "$W/e2e/gemma_probe.log"
  echo "[probe done $SECONDS s]"
  exit 0
fi
if [ "$PART" = final ]; then
  # after the value rows were aligned (cache/layer.py VALUE_ROW_ALIGN): aligned vs unaligned vs 512-token
  # blocks side by side; the bench grid again; tests/gpu whole (two pytest runs side by side)
  mkdir -p "$W"/{align,attention,t1,t2,e2e}
  timeout 150 python3 benchmarks/value_align_gpu.py --out "$W/align" > "$W/align/log" 2>&1
  echo "[align rc=$?]"; cat "$W/align/log" | grep -v Warning | tail -20
  timeout 120 python3 -m spectralcache.cli bench attention --device cuda --contexts 4096,16384,65536,131072 \
    --batches 1,8 --presets default,aggressive --methods sdpa,sdpa_graph,kernel,kernel_graph,torch,step \
    --out "$W/attention" --tag h200_stop22_final > "$W/attention/log" 2>&1
  echo "[attention rc=$?]"; grep -E "^ +[0-9]+ +[18] +(default|aggressive|-) +(sdpa_graph|kernel_graph)" "$W/attention/log"
  timeout 260 python3 -m pytest -v -n 4 -rf -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_triton_decode_cuda.py \
    --ignore=tests/gpu/test_unsloth_cuda.py --timeout 250 > "$W/t1/log" 2>&1 &
  timeout 260 python3 -m pytest -v -n 8 -rf -p no:cacheprovider tests/gpu/test_triton_decode_cuda.py \
    --timeout 250 > "$W/t2/log" 2>&1 &
  wait
  for t in t1 t2; do grep -E "passed|failed" "$W/$t/log" | tail -1; grep -c PASSED "$W/$t/log"; grep "FAILED" "$W/$t/log" | head -10; done
  echo "[final done $SECONDS s]"
  exit 0
fi
if [ "$PART" = fix ]; then
  # the value tile's mask by 16-token groups (decode._value_tokens_padded, T_V): aligned / mask T /
  # unaligned / 512-token blocks side by side; the CUDA tests on real preset states and the layout;
  # the bench's graph columns; end to end at 32K / 128K
  mkdir -p "$W"/{align,attention,t3,e2e}
  timeout 100 python3 benchmarks/value_align_gpu.py --out "$W/align" > "$W/align/log" 2>&1
  echo "[align rc=$?]"; grep -E "^T=|^  [a-z]" "$W/align/log"
  timeout 60 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_kernel_presets_cuda.py \
    tests/unit/test_value_layout.py > "$W/t3/log" 2>&1
  echo "[t3 rc=$?]"; tail -2 "$W/t3/log"
  timeout 60 python3 -m spectralcache.cli bench attention --device cuda --contexts 4096,32768,131072 \
    --batches 1,8 --presets default,aggressive --methods sdpa,sdpa_graph,kernel_graph \
    --out "$W/attention" --tag h200_stop22_fix > "$W/attention/log" 2>&1
  echo "[attention rc=$?]"; grep -E "^ +[0-9]+ +[18] +(default|aggressive|-) +(sdpa_graph|kernel_graph)" "$W/attention/log"
  timeout 130 python3 -m spectralcache.cli bench e2e --device cuda --lengths 32k,128k \
    --methods "dynamic;graphed:default" --decode-steps 8 --warmup-steps 3 --time-budget-s 120 --no-plot \
    --out "$W/e2e" --tag h200_llama8b_32l_stop22_fix > "$W/e2e/llama.log" 2>&1
  echo "[e2e rc=$?]"; tail -5 "$W/e2e/llama.log"
  echo "[fix done $SECONDS s]"
  exit 0
fi
if [ "$PART" = tests ]; then
  mkdir -p "$W"/{t1,t2}
  timeout 300 python3 -m pytest -v -n 4 -rf -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_triton_decode_cuda.py \
    --ignore=tests/gpu/test_unsloth_cuda.py --timeout 280 > "$W/t1/log" 2>&1 &
  timeout 300 python3 -m pytest -v -n 8 -rf -p no:cacheprovider tests/gpu/test_triton_decode_cuda.py \
    --timeout 280 > "$W/t2/log" 2>&1 &
  wait
  for t in t1 t2; do grep -E "passed|failed" "$W/$t/log" | tail -1; grep "^FAILED" "$W/$t/log" | head -20; done
  echo "[tests done $SECONDS s]"
  exit 0
fi
mkdir -p "$W"/{attention,e2e}
timeout 330 python3 -m spectralcache.cli bench attention --device cuda --contexts 4096,16384,65536,131072 \
  --batches 1,8 --presets default,aggressive --methods sdpa,sdpa_graph,kernel,kernel_graph,torch,step \
  --out "$W/attention" --tag h200_stop22 > "$W/attention/log" 2>&1
echo "[attention rc=$?]"; grep -A80 "^decode attention" "$W/attention/log" | head -90
echo "[attention done $SECONDS s]"
timeout 120 python3 -m spectralcache.cli bench e2e --device cuda --lengths 32k \
  --methods "dynamic;graphed:default" --decode-steps 16 --warmup-steps 3 --time-budget-s 100 --no-plot \
  --out "$W/e2e" --tag h200_llama8b_32l_stop22 > "$W/e2e/llama.log" 2>&1
echo "[e2e llama rc=$?]"; tail -6 "$W/e2e/llama.log"
timeout 150 python3 -m spectralcache.cli bench e2e --device cuda --model gemma3-270m-shape --lengths 4k,32k \
  --methods "dynamic;graphed:default;dynamic#again" --decode-steps 16 --warmup-steps 3 --time-budget-s 120 --no-plot \
  --out "$W/e2e" --tag h200_gemma3_shape_stop22 > "$W/e2e/gemma.log" 2>&1
echo "[e2e gemma rc=$?]"; tail -8 "$W/e2e/gemma.log"
echo "[bench done $SECONDS s]"
