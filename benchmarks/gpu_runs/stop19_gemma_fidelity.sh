#!/usr/bin/env bash
# Device side (issue 9: retrieval at 16K, >= 30 samples): `benchmarks/fidelity_study.py run` on
# the CPU box's Gemma 3 270M (stop19_gemma_setup.sh), on the task files generated on the CPU box
# (carried in .whl/g8/tasks, so the prompts are the CPU runs' own), stopped at a wall-clock budget.
# Samples run outermost, so a stopped run is a consistent smaller sample (its last sample may be
# partial: trim it before `report`). Results come back packed in $OUT/fidelity_eval.tgz.
#   carry [".whl/g8"]:  bash benchmarks/gpu_runs/stop19_gemma_fidelity.sh BUDGET_S LENGTH [run args]
set -uo pipefail
: "${OUT:?OUT must be set}"
BUDGET=${1:?budget in seconds}
LENGTH=${2:?task length}
shift 2
t0=$SECONDS
source benchmarks/gpu_runs/stop19_gemma_setup.sh >"$OUT/fidelity_prepare.log" 2>&1
grep -q "PREPARE OK" "$OUT/fidelity_prepare.log" || { cat "$OUT/fidelity_prepare.log"; exit 1; }
RES=/tmp/fidelity19
mkdir -p "$RES/eval/tasks"
cp .whl/g8/tasks/*_"$LENGTH".jsonl "$RES/eval/tasks/" || exit 1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null || true
  echo "budget ${BUDGET} s; length ${LENGTH}; run args: $*"
} 2>&1 | tee "$OUT/fidelity_env.txt"
left=$((BUDGET - (SECONDS - t0) - 15))
echo "run budget ${left} s (start at +$((SECONDS - t0)) s)" | tee -a "$OUT/fidelity_run.log"
timeout -s INT -k 10 "$left" python3 benchmarks/fidelity_study.py --out "$RES" run --device cuda \
    --no-progress --lengths "$LENGTH" "$@" 2>&1 | tee -a "$OUT/fidelity_run.log"
echo "run ended (rc ${PIPESTATUS[0]}) at +$((SECONDS - t0)) s" | tee -a "$OUT/fidelity_run.log"
tar -czf "$OUT/fidelity_eval.tgz" -C "$RES" . && ls -la "$OUT"
