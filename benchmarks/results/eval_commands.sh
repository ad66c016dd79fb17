#!/usr/bin/env bash
# The exact commands behind benchmarks/results/eval_* (CPU, Gemma 3 270M, float32).
#
# Usage: bash benchmarks/results/eval_commands.sh RESULTS_ROOT [TIME_LIMIT_S]
#
# Runs five resumable jobs side by side, each on its own share of the CPU cores
# (OMP/torch threads set per job), each stopped after TIME_LIMIT_S seconds (default: no
# limit). Rerunning the script continues where it stopped: finished samples are skipped.
# The results are plain JSON; `spectralcache plot RESULTS_ROOT/<dir>` redraws the plots.
#
# On a machine where the model package is installed this needs nothing else. Where it
# is not, point SPECTRALCACHE_GGUF at the package's assembled GGUF file.
set -u
root="${1:?usage: eval_commands.sh RESULTS_ROOT [TIME_LIMIT_S]}"
limit="${2:-0}"
mkdir -p "$root"
py="${PYTHON:-python3}"

methods="baseline,spectral:default,spectral:aggressive,quantized:int4,streaming:sinks=4,window=1024"
needle_methods="baseline,spectral:default,spectral:aggressive,streaming:sinks=4,window=1024"

job() {  # job NAME THREADS ARGS...
  local name="$1" threads="$2"
  shift 2
  echo "[$(date -u +%H:%M:%S)] start $name ($threads threads): spectralcache $*" >>"$root/commands.log"
  OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" timeout "${limit}" \
    nice -n 10 "$py" -m spectralcache.cli "$@" --threads "$threads" --no-progress --no-plots >>"$root/$name.log" 2>&1 &
}
[ "$limit" = 0 ] && limit=1000000

# Materialize the cached weights once, before the jobs race for it.
"$py" -c "from spectralcache.eval.model import load_model; load_model()" >>"$root/setup.log" 2>&1

for task in niah_single_1 niah_multikey_1 vt; do
  job "tasks_$task" "${TASK_THREADS:-3}" eval --tasks "$task" --lengths 4096 --samples 20 --methods "$methods" --out "$root/eval_tasks"
done
job needle "${NEEDLE_THREADS:-4}" eval needle --lengths 1024,2048,4096,8192 --depths 0,0.25,0.5,0.75,1 --samples 2 \
  --methods "$needle_methods" --out "$root/eval_needle"
[ -e "$root/eval_perplexity/perplexity/summary.json" ] || job perplexity 3 eval perplexity --prefill 2048 --continue 512 --segments 2 \
  --methods "$methods,spectral:pre_rope" --out "$root/eval_perplexity"
[ -e "$root/eval_spectrum/spectrum.json" ] || job spectrum 1 eval spectrum --length 4096 --out "$root/eval_spectrum"
wait
echo "[$(date -u +%H:%M:%S)] all jobs ended" >>"$root/commands.log"
