#!/usr/bin/env bash
# Device side, sourced by the stop-19 Gemma runs: join the nine payload chunks (the GGUF file, the
# gguf wheel and the CPU box's Gemma config + tokenizer; built on the CPU box as
# benchmarks/results/fidelity/stop19_gpu/README.md says), install gguf into /tmp/site and make
# the model cache match the CPU box's (stop19_gemma_prepare.py). Calls 1..8 each carried one chunk:
#   carry [".whl/gN"]:  mkdir -p /tmp/pay && cp .whl/gN/chunk.N /tmp/pay/     (N = 0..7)
# the calling command carries .whl/g8 (chunk 8, payload.sha256, the task files).
# Exports PYTHONPATH, SPECTRALCACHE_GGUF and SPECTRALCACHE_CACHE for what follows.
SITE=/tmp/site
if [ ! -f /tmp/gpayx/.ok ]; then
  mkdir -p /tmp/pay && cp .whl/g8/chunk.8 /tmp/pay/ || return 1
  cat /tmp/pay/chunk.0 /tmp/pay/chunk.1 /tmp/pay/chunk.2 /tmp/pay/chunk.3 /tmp/pay/chunk.4 \
      /tmp/pay/chunk.5 /tmp/pay/chunk.6 /tmp/pay/chunk.7 /tmp/pay/chunk.8 >/tmp/gpayload.tar || return 1
  echo "$(cat .whl/g8/payload.sha256)  /tmp/gpayload.tar" | sha256sum -c - || return 1
  mkdir -p /tmp/gpayx "$SITE" && tar -xf /tmp/gpayload.tar -C /tmp/gpayx && rm -f /tmp/gpayload.tar || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      /tmp/gpayx/gguf-*.whl || return 1
  touch /tmp/gpayx/.ok
fi
export PYTHONPATH=$SITE:$PWD/src:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 \
    SPECTRALCACHE_GGUF=/tmp/gpayx/gemma-3-270m-q4_k_m.gguf SPECTRALCACHE_CACHE=/tmp/sc_cache
python3 benchmarks/gpu_runs/stop19_gemma_prepare.py /tmp/gpayx/cpu_cache .whl/g8/tasks/niah_single_1_8192.jsonl
