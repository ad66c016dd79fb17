"""The compiled decode kernel against the torch reference on cache states of several model shapes
and configs (stop 15: the H100 fidelity sweep saw every 4-bit method answer degenerate text on
Gemma 3 270M, float32, head_dim 256, while the CPU answered like the baseline).

Each case fills a one-layer SpectralCache with random K/V (a prefill of ``tokens - 1`` tokens,
then one decode token: ``spectralcache.bench.attention.build_case`` with the config itself),
then compares ``decode_attention`` with ``spectral_attention`` on the same state: relative error
of the output (bar 1e-2), or the exception the kernel raised.

    python benchmarks/kernel_shape_check_gpu.py [--tokens 4100] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/kernel_shape_check_gpu.py --device cpu --tokens 700 --small
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

import torch

from spectralcache.attention.reference import spectral_attention
from spectralcache.attention.triton import decode_attention
from spectralcache.bench.attention import build_case
from spectralcache.config import SpectralConfig

# Overrides are applied to the "lowrank" preset (the default preset until stop 17), so each name keeps
# the layout it had; "default" is today's default preset (= "chK4+idV4+o8").
CONFIGS = {
    "default": ("default", {}),
    "lowrank": ("lowrank", {}),
    "aggressive": ("aggressive", {}),
    "default+idV4": ("lowrank", {"value_codec": "identity", "value_coeff_bits": 4}),
    "default+idV8": ("lowrank", {"value_codec": "identity"}),
    "idK4+idV4": ("lowrank", {"key_codec": "identity", "value_codec": "identity", "coeff_bits": 4}),
    "default+int4": ("lowrank", {"coeff_bits": 4}),
    "aggressive+tail": ("aggressive", {"compress_tail": True}),
    # per-channel int4 / int8 keys (key_codec="channel", issue 9's lever; kernel support stop 16)
    "chK4+idV4+o8": ("lowrank", {"key_codec": "channel", "value_codec": "identity", "coeff_bits": 4,
                                 "outliers_per_block": 8, "compress_tail": True}),
    "chK8+idV4": ("lowrank", {"key_codec": "channel", "value_codec": "identity", "value_coeff_bits": 4}),
    # per-channel zero points (key_zero_point): the default preset with them, and int8 channel keys
    "default+zp": ("default", {"key_zero_point": True}),
    "chK8zp+idV4": ("lowrank", {"key_codec": "channel", "value_codec": "identity", "value_coeff_bits": 4,
                                "key_zero_point": True}),
    "max": ("max", {}),
}  # fmt: skip
SHAPES = {  # name: (q_heads, kv_heads, head_dim, dtype)
    "gemma270m_fp32": (4, 1, 256, torch.float32),
    "gemma270m_bf16": (4, 1, 256, torch.bfloat16),
    "llama8b_bf16": (32, 8, 128, torch.bfloat16),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4100)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="block_size 64, for the CPU interpreter")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of SHAPES names")
    ap.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma list of CONFIGS names, or shape:config pairs"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    pairs = [p.split(":") for p in args.configs.split(",") if ":" in p]
    todo = pairs or [(s, c) for s in args.shapes.split(",") for c in args.configs.split(",")]
    for sname, cname in todo:
        shape, (preset, over) = SHAPES[sname], CONFIGS[cname]
        over = dict(over)
        if args.small:
            over.update(
                block_size=64, hot_size=16, landmarks=4, outliers_per_block=4, rank_keys=8, rank_values=16
            )
        cfg = SpectralConfig.from_preset(preset, **over)
        row = {"shape": sname, "config": cname, "overrides": {k: str(v) for k, v in over.items()}}
        try:
            q_heads, kv_heads, head_dim, dtype = shape
            c = build_case(cfg, 1, args.tokens, q_heads, kv_heads, head_dim, dtype, device, seed=len(rows))
            ref = spectral_attention(c.query, c.state, None).float()
            out = decode_attention(c.query, c.state, None).float()
            err = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
            row.update(rel_err=err, ok=err < 1e-2, finite=bool(torch.isfinite(out).all()))
        except Exception as exc:  # report, go on with the next case
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                       trace=traceback.format_exc()[-1500:])  # fmt: skip
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_shape_check.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
