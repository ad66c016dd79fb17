"""One profiled launch of the fused decode kernel per case, for Nsight Compute (issue 8).

Builds the Llama-3.1-8B-shaped random state of ``attention_kernel_dev.py`` (bf16, 512-token
blocks) for each ``preset:context:batch`` case, warms the kernel up (compile + plan), then runs
exactly one ``decode_attention`` call between ``cudaProfilerStart`` / ``cudaProfilerStop``, so
``ncu --profile-from-start off`` records that launch only (split + combine kernels).

    ncu --profile-from-start off --clock-control none ... python benchmarks/kernel_ncu_gpu.py \
        --cases aggressive:131072:1,default:131072:1   (benchmarks/kernel_ncu_gpu.sh runs it)
"""

from __future__ import annotations

import argparse
import json

import torch

from attention_kernel_dev import llama_state, state_bytes
from spectralcache.attention.triton import decode_attention


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="aggressive:131072:1,default:131072:1")
    ap.add_argument("--config", default="{}", help="JSON launch options passed to decode_attention")
    args = ap.parse_args()
    config = json.loads(args.config)
    cudart = torch.cuda.cudart()
    for case in args.cases.split(","):
        preset, ctx, batch = case.split(":")
        state = llama_state(int(ctx), int(batch), preset)
        q = torch.randn(int(batch), 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            decode_attention(q, state, **config)
        torch.cuda.synchronize()
        cudart.cudaProfilerStart()
        decode_attention(q, state, **config)
        torch.cuda.synchronize()
        cudart.cudaProfilerStop()
        print(json.dumps({"case": case, "bytes": state_bytes(state), "config": config}), flush=True)
        del state
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
