"""SpectralLayer.update cost: decode steps and block appends on a long context (CPU or CUDA).

Times the cache side only (no attention): a prefill of ``--context`` tokens, then ``--steps``
decode tokens, each ``update`` timed; steps that compressed a block are reported apart
(they include the compression, identical in both layouts, plus the append into the cold tier).
Uses only the public layer API, so the same script can time an older checkout side by side:

    python benchmarks/layer_update.py --json new.json
    git archive <old-commit> src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src python benchmarks/layer_update.py --json old.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from spectralcache.cache.layer import SpectralLayer
from spectralcache.config import SpectralConfig


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = SpectralConfig(
        block_size=args.block,
        rank_keys=16,
        rank_values=32,
        hot_size=64,
        landmarks=16,
        outliers_per_block=8,
    )
    b, h, d = 1, args.heads, args.head_dim
    layer = SpectralLayer(cfg, 0, head_dim=d, num_kv_heads=h)
    dtype = getattr(torch, args.dtype)
    k = torch.randn(b, h, args.context, d, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    layer.update(k, k.clone())
    sync()
    prefill_s = time.perf_counter() - t0
    layer.release_chunk()
    tokens = torch.randn(args.steps, b, h, 1, d, device=dev, dtype=dtype)
    plain, with_block = [], []
    for i in range(args.steps):
        nb = layer.num_blocks
        sync()
        t0 = time.perf_counter()
        layer.update(tokens[i], tokens[i])
        sync()
        dt = time.perf_counter() - t0
        layer.release_chunk()
        (with_block if layer.num_blocks > nb else plain).append(dt)
    memory = {}
    if hasattr(layer, "tier_used_tensors"):  # this layout: allocated capacity vs live data
        from spectralcache.cache.memory import held_bytes, logical_bytes

        memory = {
            "held_bytes": held_bytes(*[t for ts in layer.tier_tensors().values() for t in ts]),
            "used_bytes": sum(logical_bytes(*ts) for ts in layer.tier_used_tensors().values()),
            "dynamic_bytes": 2 * b * h * d * layer.get_seq_length() * k.element_size(),
        }
    return {
        **memory,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "context": args.context,
        "heads": h,
        "head_dim": d,
        "block_size": args.block,
        "dtype": args.dtype,
        "blocks_after": layer.num_blocks,
        "prefill_s": prefill_s,
        "decode_steps": len(plain),
        "decode_ms_median": 1e3 * statistics.median(plain),
        "decode_ms_p90": 1e3 * sorted(plain)[int(0.9 * len(plain))],
        "block_steps": len(with_block),
        "block_step_ms_median": 1e3 * statistics.median(with_block) if with_block else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run(args)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
