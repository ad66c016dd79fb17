#!/usr/bin/env bash
# Stop 16's closing GPU run (one device call, from a clean export of one commit):
# 1. the compiled kernel = torch reference at model shapes (kernel_shape_check_gpu.py: Gemma 3 270M
#    fp32/bf16 head_dim 256 incl. per-channel int4 keys and identity int4 rows read byte-once, Llama-8B bf16),
# 2. attention_kernel_dev quickcheck (7 modes x fp32/bf16, default launch options),
# 3. `spectralcache bench attention --device cuda` (issue 8's table), as bench_gpu.sh runs it.
#   OUT=<dir> bash benchmarks/gpu_stop16_final.sh SRC_ROOT     (SRC_ROOT holds src/ and benchmarks/)
set -uo pipefail
root=$1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 TQDM_DISABLE=1 PYTHONPATH=$root/src:$root/benchmarks
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv; \
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; \
  echo "commit ${SPECTRALCACHE_COMMIT:-unknown}"; } 2>&1 | tee "$OUT/env.txt"
timeout 150 python3 "$root/benchmarks/kernel_shape_check_gpu.py" --out "$OUT" \
  --configs "gemma270m_fp32:chK4+idV4+o8,gemma270m_bf16:chK4+idV4+o8,gemma270m_fp32:idK4+idV4,gemma270m_fp32:aggressive,gemma270m_bf16:chK8+idV4,llama8b_bf16:chK4+idV4+o8,llama8b_bf16:aggressive,llama8b_bf16:default" \
  2>&1 | tee "$OUT/shape_check.log"
timeout 170 python3 "$root/benchmarks/attention_kernel_dev.py" --out "$OUT/check" --sections quickcheck \
  2>&1 | tee "$OUT/quickcheck.log" | tail -16
timeout 130 python3 -m spectralcache.cli bench attention --device cuda --contexts 4k,16k,64k,128k \
  --batches 1,8 --rep-ms 50 --no-plot --out "$OUT" 2>&1 | tee "$OUT/run.log"
