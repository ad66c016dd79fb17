#!/usr/bin/env bash
# One device call: the decode kernel of two source trees timed side by side on the same warm GPU
# (graph replay + eager, attention_kernel_dev.py's copy/time sections), then the new tree's
# correctness checks (quickcheck modes, compiled kernel = torch reference at model shapes).
#
#   bash benchmarks/gpu_kernel_ab.sh OLD_SRC_ROOT NEW_SRC_ROOT   (each holds src/ and benchmarks/)
# Writes under $OUT: env.txt, old/, new/ (kernel_dev.json + .log), checks/.
set -o pipefail
OLD=$1 NEW=$2
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mkdir -p "$OUT/old" "$OUT/new" "$OUT/checks"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv; \
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; } \
  2>&1 | tee "$OUT/env.txt"
for side in old new; do
  root=$OLD; [ "$side" = new ] && root=$NEW
  PYTHONPATH=$root/src:$root/benchmarks timeout 150 python3 "$root/benchmarks/attention_kernel_dev.py" \
    --out "$OUT/$side" --sections copy,time --contexts 4096,32768,131072 --batches 1,8 --no-ref \
    2>&1 | tee "$OUT/$side/kernel_dev.log"
done
PYTHONPATH=$NEW/src:$NEW/benchmarks timeout 200 python3 "$NEW/benchmarks/attention_kernel_dev.py" \
  --out "$OUT/checks" --sections quickcheck 2>&1 | tee "$OUT/checks/quickcheck.log"
PYTHONPATH=$NEW/src timeout 200 python3 "$NEW/benchmarks/kernel_shape_check_gpu.py" --out "$OUT/checks" \
  --configs "gemma270m_fp32:chK4+idV4+o8,llama8b_bf16:chK4+idV4+o8,gemma270m_bf16:chK8+idV4,gemma270m_fp32:idK4+idV4,llama8b_bf16:aggressive,llama8b_bf16:default" \
  2>&1 | tee "$OUT/checks/shape_check.log"
