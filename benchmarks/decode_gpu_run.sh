#!/usr/bin/env bash
# The decode-kernel engineer's GPU run (issue 8: host overhead, CUDA-graph replay), as sent to the
# device machine:  OUT=<dir> SPECTRALCACHE_COMMIT=<hash> bash benchmarks/decode_gpu_run.sh [sections]
#   1. tests/gpu/test_triton_decode_cuda.py (kernel = reference on CUDA; fast launch; graph replay);
#   2. benchmarks/decode_host_overhead.py (host us per call, real-layer step, graph replay at 32K);
#   3. benchmarks/attention_kernel_dev.py --sections copy,time at 4K / 32K / 128K, batch 1.
# Test tools travel as wheels in .whl/prefill, installed to /tmp/site only when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
sections=${1:-tests,host,kernel}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
if ! python3 -c "import pytest, hypothesis" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/prefill/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp/decode_out}"
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "commit ${SPECTRALCACHE_COMMIT:-unknown}; $(nproc) CPUs; $(uname -r)"
} 2>&1 | tee "$out/env.txt"
case ",$sections," in *,tests,*)
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_triton_decode_cuda.py 2>&1 | tail -25 | tee "$out/gpu_tests.log" ;;
esac
case ",$sections," in *,host,*)
  timeout 200 python3 benchmarks/decode_host_overhead.py --out "$out" 2>&1 | tee "$out/host.log" ;;
esac
case ",$sections," in *,kernel,*)
  timeout 200 python3 benchmarks/attention_kernel_dev.py --out "$out" --sections copy,time \
    --contexts 4096,32768,131072 --batches 1 --no-ref 2>&1 | tee "$out/kernel.log" ;;
esac
