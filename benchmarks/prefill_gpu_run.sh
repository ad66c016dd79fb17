#!/usr/bin/env bash
# The prefill engineer's GPU run (issue 7, "Prefill at SDPA speed"), as sent to the device machine:
#   1. the attention tests on CUDA (tests/unit/test_prefill_sdpa.py, tests/unit/test_attention_reference.py);
#   2. benchmarks/prefill_attention_gpu.py: one Llama-8B-shaped layer at 32K, SDPA vs spectral prefill.
# Test tools travel as wheels in .whl/prefill (pytest, hypothesis and their pure-Python needs), installed
# to /tmp/site only when the machine lacks them. Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
if ! python3 -c "import pytest, hypothesis" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/prefill/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp/prefill_out}"
mkdir -p "$out"
python3 - <<'PY' 2>&1 | tee "$out/env.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
    op = getattr(torch.ops.aten, name, None)
    print(name, "missing" if op is None else op.default._schema)
PY
timeout 110 python3 -m pytest -q -p no:cacheprovider -rs tests/unit/test_prefill_sdpa.py tests/unit/test_attention_reference.py 2>&1 | tail -40 | tee "$out/pytest.log"
timeout 100 python3 benchmarks/prefill_attention_gpu.py --tokens 32768 --chunk 8192 --repeats 3 \
  --out "$out/prefill_attention_gpu.json" 2>&1 | tee "$out/bench.log"
