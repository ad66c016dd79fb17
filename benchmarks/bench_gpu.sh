#!/usr/bin/env bash
# The GPU measurement run of issues 7 and 8: `spectralcache bench attention` + `bench e2e` on one
# card, as sent to the device machine. Every number in the README's GPU bench rows comes from it.
#
#   OUT=<dir> bash benchmarks/bench_gpu.sh smoke|final [SRC]
#
# PNGs are drawn afterwards from the JSON (`spectralcache bench attention|e2e --replot FILE`): the
# device returns at most 8 files.
# SRC is the directory holding the spectralcache package (default: src). For the recorded runs it
# is a clean export of one commit (`git archive HEAD src`), so the numbers belong to that commit
# and not to whatever was uncommitted in the shared working tree; SPECTRALCACHE_COMMIT names it.
set -uo pipefail
mode=${1:-final}
src=${2:-src}
OUT=${OUT:-/tmp/bench_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
run() { local limit=$1; shift; timeout "$limit" "$py" -m spectralcache.cli bench "$@"; }

{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  "$py" -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "commit ${SPECTRALCACHE_COMMIT:-unknown}, src $src, mode $mode"
} 2>&1 | tee "$OUT/env.txt"

case "$mode" in
smoke)
  # harness check on CUDA: attention (all methods that exist) 4K-128K b1/b8, e2e 8 layers 32K
  run 130 attention --device cuda --contexts 4k,16k,64k,128k \
      --batches 1,8 --rep-ms 50 --no-plot --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  run 150 e2e --device cuda --layers 8 --lengths 32k \
      --methods dynamic,default --decode-steps 16 --time-budget-s 140 --no-plot --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  ;;
final)
  # ~7 min: attention (batch 1 first), issue 7's 8-layer table, then the 32-layer model at the
  # issue's lengths, eager and graphed (every decode step replayed from a CUDA graph: SpectralCache
  # through GraphedDecoder, transformers' StaticCache as DynamicCache's graphable counterpart), as
  # far as --time-budget-s allows (a skipped case is recorded with its estimate)
  run 110 attention --device cuda --contexts 4k,16k,64k,128k \
      --batches 1,8 --rep-ms 50 --no-plot --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  run 60 e2e --device cuda --layers 8 --lengths 32k \
      --methods dynamic,default --decode-steps 12 --warmup-steps 3 --time-budget-s 50 --profile --no-plot --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  run 240 e2e --device cuda --lengths 32k,128k \
      --methods "dynamic;graphed:static;default;graphed:default;aggressive;graphed:aggressive" \
      --decode-steps 8 --warmup-steps 3 --time-budget-s 225 --profile --no-plot --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  ;;
*)
  echo "usage: OUT=dir bash benchmarks/bench_gpu.sh smoke|final [SRC]" >&2
  exit 2
  ;;
esac
ls -la "$OUT"
