#!/usr/bin/env bash
# Stop 22, H200, second (last) call (< 8 min): the committed plan (automatic short outlier / exact programs at
# batch 1) timed, and what the first call left open side by side.
#   A. (in parallel, CPU-bound compiles) compiled = reference (quickcheck) with 16-column int4 key tiles read
#      byte-once (int4_bytes 16, the aggressive ranks: Triton 3.6 compiled that tile wrong on the H100 at
#      stop 16) and the release-only merge ticket; CUDA tests (stop 22 options, launch options, graphs);
#      warm-up compiles of what B and C time;
#   C. (first, the committed plan's table) copy bandwidth + time section -- see below;
#   B. (then) side by side in one process per cell (graph replay beside SDPA): aggressive at 128K batch 1 / 8 and
#      32K batch 1, the default layout as stored (channel_zp_vt) at 128K batch 1 -- the committed plan vs
#      short_rows off, int4_bytes 16 (with / without short rows), merge 1 / 2, pdl 1 / 2 (both kernels /
#      the combine kernel only), 8 warps at 2 programs per SM, a 168-register cap at 3 per SM;
#   C. copy bandwidth + time section of the committed plan (channel_zp_vt, aggressive, lowrank) at 4K / 32K /
#      128K x batch 1 / 8, then aggressive again with int4_bytes 16.
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop22_final.sh OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W"/{qk,w1,w2,w3,v128,v128z,v128b8,v32,time,time16}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader | tee "$W/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$W/env.txt"
echo "SPECTRALCACHE_COMMIT=${SPECTRALCACHE_COMMIT:-unset}" | tee -a "$W/env.txt"
git status --short -- src benchmarks tests | tee -a "$W/env.txt"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm none --v-block-stages none --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride none --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none --v-key-raw none --v-outlier-cols none --v-merge none --v-pdl none --v-short-rows none --v-ablate none'
I16='"int4_bytes":16,"int4_pad":0'
EA="[{\"short_rows\":0},{$I16},{$I16,\"short_rows\":0},{\"merge\":1},{\"merge\":2},{\"pdl\":1},{\"pdl\":2},\
{\"num_warps\":8,\"programs_per_sm\":2},{\"maxnreg\":168,\"programs_per_sm\":3}]"
EZ='[{"short_rows":0},{"merge":2},{"pdl":1},{"pdl":2}]'
timeout 130 python3 $K --out "$W/qk" --sections quickcheck --check-block-size 512 \
  --check-modes "post_rope k4 rk16,post_rope k4,post_rope chK4zp idV4,q4 pad" \
  --check-configs "[{},{$I16},{\"merge\":2}]" > "$W/qk/log" 2>&1 &
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_triton_decode_cuda.py -rf \
  -k "stop22 or launch_options or graph or presets" > "$W/gpu_tests.log" 2>&1 &
# shellcheck disable=SC2086
timeout 130 python3 $K --out "$W/w1" --sections variants --variant-cells 4096x1 $PIN \
  --variant-presets aggressive --v-extra "$EA" > "$W/w1/log" 2>&1 &
# shellcheck disable=SC2086
timeout 130 python3 $K --out "$W/w2" --sections variants --variant-cells 32768x8 $PIN \
  --variant-presets aggressive,channel_zp_vt --v-extra "$EA" > "$W/w2/log" 2>&1 &
timeout 130 python3 $K --out "$W/w3" --sections time --contexts 4096 --batches 1,8 --no-ref \
  --time-presets channel_zp_vt,aggressive,default > "$W/w3/log" 2>&1 &
wait
grep -h "FAIL\|checks:" "$W/qk/log"
tail -4 "$W/gpu_tests.log"
grep -h -A3 "Traceback" "$W"/qk/log "$W"/w?/log | head -30
echo "[A done $SECONDS s]"
timeout 150 python3 $K --out "$W/time" --sections copy,time --contexts 131072,32768,4096 --batches 1,8 \
  --no-ref --time-presets channel_zp_vt,aggressive,default > "$W/time/log" 2>&1
grep -h "copy bandwidth\|^ *[0-9]* B[18] " "$W/time/log"
timeout 60 python3 $K --out "$W/time16" --sections time --contexts 131072,32768 --batches 1,8 --no-ref \
  --time-presets aggressive --time-configs "{\"aggressive\":{$I16}}" > "$W/time16/log" 2>&1
grep -h "^ *[0-9]* B[18] " "$W/time16/log"
echo "[C done $SECONDS s]"
var() {  # var OUT CELLS PRESETS EXTRA
  # shellcheck disable=SC2086
  timeout 70 python3 $K --out "$1" --sections variants --variant-cells "$2" $PIN --variant-presets "$3" \
    --v-extra "$4" > "$1/log" 2>&1
  grep -h "^variant  *[0-9]\|variant failed" "$1/log"
}
var "$W/v128" 131072x1 aggressive "$EA"
var "$W/v128z" 131072x1 channel_zp_vt "$EZ"
var "$W/v128b8" 131072x8 aggressive "$EA"
var "$W/v32" 32768x1 aggressive "$EA"
echo "[B done $SECONDS s]"
