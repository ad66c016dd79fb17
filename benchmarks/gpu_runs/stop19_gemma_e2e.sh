#!/usr/bin/env bash
# Device side (issue 8: real Gemma 3 270M decode >= DynamicCache at 16K): prepare the CPU box's
# Gemma (stop19_gemma_setup.sh) and time decode with `spectralcache bench e2e`.
#   carry [".whl/g8"]:  bash benchmarks/gpu_runs/stop19_gemma_e2e.sh [bench e2e args]
set -uo pipefail
: "${OUT:?OUT must be set}"
source benchmarks/gpu_runs/stop19_gemma_setup.sh >"$OUT/gemma_prepare.log" 2>&1
cat "$OUT/gemma_prepare.log"
grep -q "PREPARE OK" "$OUT/gemma_prepare.log" || exit 1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null || true
} 2>&1 | tee "$OUT/gemma_env.txt"
python3 -m spectralcache.cli bench e2e --device cuda --model gemma3-270m --no-plot --out "$OUT" "$@" \
    2>&1 | tee "$OUT/gemma_e2e.log"
