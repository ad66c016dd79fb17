#!/usr/bin/env bash
# Stop 18, H100 call 1 (run from the repo root on the device machine): compiled correctness of the
# fused combine and of key zero points, then fused vs two-launch timings of the decode kernel for
# the presets default (low-rank layout in attention_kernel_dev), aggressive, channel (the stop-17
# default's layout) and channel_zp (the stop-18 default's), at 4K / 32K / 128K batch 1 and 32K
# batch 8, each beside SDPA. Usage: bash benchmarks/gpu_runs/stop18_kernel.sh OUTDIR
# Needs the tree at 6b541c6 (git worktree add /tmp/s18 6b541c6): the fused combine it times was
# removed again in 4651dde (slower at every cell), and with it the --time-fused / --time-cells options.
set -o pipefail
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
C='[{"fused_combine": true}]'
mkdir -p "$W/c1" "$W/c2" "$W/warm" "$W/t"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$W/env.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$W/env.txt"
timeout 230 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_combine_cuda.py \
  tests/gpu/test_graphed_cuda.py::test_replayed_step_with_fused_combine \
  tests/gpu/test_triton_decode_cuda.py -k "zero_point or fused" > "$W/gpu_tests.log" 2>&1 &
timeout 230 python3 $K --out "$W/c1" --sections quickcheck --check-configs "$C" \
  --check-modes 'post_rope chK4zp idV4,pre_rope chK8 idV4' > "$W/c1/log" 2>&1 &
timeout 230 python3 $K --out "$W/c2" --sections quickcheck --check-configs "$C" \
  --check-modes 'post_rope k4,G8 b4,q4 pad' > "$W/c2/log" 2>&1 &
timeout 230 python3 $K --out "$W/warm" --sections time --time-cells 4096x1 --time-fused 0,1 --no-ref \
  > "$W/warm/log" 2>&1 &
wait
timeout 300 python3 $K --out "$W/t" --sections copy,time --time-cells 4096x1,32768x1,131072x1,32768x8 \
  --time-fused 0,1 --no-ref 2>&1 | tee "$W/t/log"
tail -n 6 "$W/gpu_tests.log" "$W/c1/log" "$W/c2/log"
