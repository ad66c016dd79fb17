#!/usr/bin/env bash
# The 2-GPU run behind benchmarks/results/tp_* (issue 10): the lossless-equality test with NCCL,
# then tp_generate.py at 32K and 128K. Run from a checkout (or a `git archive` snapshot of one)
# on a host with 2 GPUs; results go to ${OUT:-/tmp/tp_out}.
# (TP_DEVICE=cpu BENCH_ARGS="--shape tiny --contexts 1200 --new 2" checks this script on CPU.)
# NVLink multicast stays off (the shared device hosts require it).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tp_out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
NGPU=${NGPU:-2}
{ nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"; } > "$OUT/tp_env.txt" 2>&1
cat "$OUT/tp_env.txt"
SPECTRALCACHE_TP_DEVICE=${TP_DEVICE:-cuda} SPECTRALCACHE_TP_RESULTS="$OUT/tp_test" timeout "${TEST_TIMEOUT:-150}" \
  python3 -m pytest -q -x tests/unit/test_tp.py -k two_ranks -p no:cacheprovider > "$OUT/tp_test_nccl.log" 2>&1
echo "test rc=$?"; tail -3 "$OUT/tp_test_nccl.log"
timeout "${BENCH_TIMEOUT:-210}" torchrun --standalone --nproc_per_node "$NGPU" benchmarks/tp_generate.py \
  ${BENCH_ARGS:---contexts 32768 131072 --new 32 --warmup 3} --max-seconds "${BENCH_MAX_SECONDS:-160}" \
  --out "$OUT/tp_h100x${NGPU}.json" 2>&1 | grep -v -i "warn\|Loading weights\|forward_call" > "$OUT/tp_generate.log"
echo "bench rc=${PIPESTATUS[0]}"; tail -12 "$OUT/tp_generate.log"
