#!/usr/bin/env bash
# Stop 19, H200 (one call, < 9 min): the decode kernel's int4 changes for the default preset's layout
# (nibble-split dots, PTX widening of packed int4, deferred softmax sums) against the stop-18 kernel
# (nibble_split 0, int4_asm 0, defer_den 0), at block 512 / 8 outliers (channel_zp) and block 128 /
# 2 outliers (channel_zp_b128).
#   1. compiled correctness (quickcheck; kernel vs torch reference) of the new and old paths, while a
#      warm-up process compiles every variant of the scan (Triton's on-disk cache);
#   2. variant scan, CUDA-graph replay beside SDPA: 4K / 32K / 128K batch 1, 128K batch 8 (and the
#      low-rank layouts at 128K batch 1: new vs stop-18 kernel);
#   3. time section with the automatic plan: copy bandwidth, 4K..128K x batch 1 / 8 for both layouts,
#      then the low-rank ("default" in the dev script = the lowrank preset) and aggressive layouts at 128K.
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop19_kernel.sh OUTDIR [PHASES]
# PHASES: any of "check,scan,time" (default all three).
set -f
W=${1:?output dir}
PHASES=${2:-check,scan,time}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W/qa" "$W/qb" "$W/qc" "$W/warm" "$W/warm2" "$W/warm3" "$W/scan_lr" "$W/scan" "$W/time" "$W/time_lr"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader | tee "$W/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$W/env.txt"
git log -1 --format='%H %s' 2>/dev/null | tee -a "$W/env.txt"
git status --short -- src benchmarks tests | tee -a "$W/env.txt"
# every launch option pinned to decode_attention's default ("none" = automatic)
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm 4 --v-block-stages 0 --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride 0 --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none'
OLD='{"nibble_split":0,"int4_asm":0,"defer_den":0}'
EXTRA="[$OLD,{\"nibble_split\":0},{\"nibble_split\":\"keys\"},{\"int4_asm\":0},{\"defer_den\":0},{\"flat_tiles\":0},{\"flat_tiles\":1},{\"block_t\":128,\"num_warps\":8},{\"block_t\":128,\"num_warps\":8,\"nibble_split\":0},{\"num_stages\":4},{\"num_stages\":2},{\"block_t\":32,\"num_warps\":2,\"programs_per_sm\":8},{\"block_t\":128,\"num_warps\":4,\"maxnreg\":null},{\"block_stages\":2},{\"block_t\":128,\"num_warps\":8,\"block_stages\":2},{\"block_parts\":1},{\"programs_per_sm\":2}]"
echo "$EXTRA" > "$W/scan/extra.json"
VP='--variant-presets channel_zp,channel_zp_b128'

if [[ $PHASES == *check* ]]; then
  # compiled = reference: the int4 identity / channel layouts under the new defaults, the old path,
  # asm widening without the split, keys-only split, 128-token tiles; plus int4 low-rank and masks
  M1='post_rope chK4zp idV4,pre_rope chK4zp idV4,post_rope chK4 idV4,post_rope idK4 idV'
  M2='post_rope k4,pre_rope k4,idV v4,G8 b4,q4 pad'
  timeout 140 python3 $K --out "$W/qa" --sections quickcheck --check-block-size 128 \
    --check-configs "[{},$OLD,{\"nibble_split\":\"keys\"}]" --check-modes "$M1" > "$W/qa/log" 2>&1 &
  timeout 140 python3 $K --out "$W/qb" --sections quickcheck --check-block-size 512 \
    --check-configs '[{"nibble_split":0},{"int4_asm":0},{"block_t":128,"num_warps":8,"outlier_split":false}]' \
    --check-modes "$M1" > "$W/qb/log" 2>&1 &
  timeout 140 python3 $K --out "$W/qc" --sections quickcheck --check-block-size 128 \
    --check-configs "[{},$OLD]" --check-modes "$M2" > "$W/qc/log" 2>&1 &
  # shellcheck disable=SC2086
  timeout 140 python3 $K --out "$W/warm" --sections variants --variant-cells 4096x1 $PIN \
    --variant-presets channel_zp --v-extra "@$W/scan/extra.json" > "$W/warm/log" 2>&1 &
  # shellcheck disable=SC2086
  timeout 140 python3 $K --out "$W/warm3" --sections variants --variant-cells 4096x1 $PIN \
    --variant-presets channel_zp_b128 --v-extra "@$W/scan/extra.json" > "$W/warm3/log" 2>&1 &
  # shellcheck disable=SC2086
  timeout 140 python3 $K --out "$W/warm2" --sections variants --variant-cells 4096x1 $PIN \
    --variant-presets default,aggressive --v-extra "[$OLD,{\"defer_den\":0},{\"int4_asm\":0}]" \
    > "$W/warm2/log" 2>&1 &
  wait
  grep -h "FAIL\|checks:" "$W/qa/log" "$W/qb/log" "$W/qc/log"
  grep -h -A3 "Traceback" "$W"/q?/log "$W"/warm*/log | head -30
fi
if [[ $PHASES == *scan* ]]; then
  # shellcheck disable=SC2086
  timeout 170 python3 $K --out "$W/scan" --sections variants \
    --variant-cells 4096x1,32768x1,131072x1,131072x8 $PIN $VP --v-extra "@$W/scan/extra.json" \
    > "$W/scan/log" 2>&1
  # the low-rank layouts (int4 widening and deferred sums reach them too): new vs stop-18 kernel
  # shellcheck disable=SC2086
  timeout 45 python3 $K --out "$W/scan_lr" --sections variants --variant-cells 131072x1 $PIN \
    --variant-presets default,aggressive --v-extra "[$OLD,{\"defer_den\":0},{\"int4_asm\":0}]" \
    > "$W/scan_lr/log" 2>&1
  grep -h "^variant  *[0-9]\|variant failed" "$W/scan/log" "$W/scan_lr/log" | head -200
fi
if [[ $PHASES == *time* ]]; then
  timeout 130 python3 $K --out "$W/time" --sections copy,time --contexts 4096,16384,32768,131072 \
    --batches 1,8 --no-ref --time-presets channel_zp,channel_zp_b128 > "$W/time/log" 2>&1
  timeout 60 python3 $K --out "$W/time_lr" --sections copy,time --contexts 131072 --batches 1,8 --no-ref \
    --time-presets default,aggressive > "$W/time_lr/log" 2>&1
  grep -h "copy bandwidth\|^ *[0-9]* B[18] " "$W/time/log" "$W/time_lr/log"
fi
