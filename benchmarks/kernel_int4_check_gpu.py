"""Which Triton decode-kernel launch option breaks the aggressive preset on CUDA (GPU only).

The final `bench attention` run at ed66d10 (H100) found the kernel wrong for the aggressive
preset (int4 coefficients, ranks 16 / 32, 16 outliers; relative error 2-3 against the torch
reference at every context and batch) and right for the default preset (int8). The CPU tests run
the kernels in Triton's interpreter, which never takes the inline-PTX widening (``dequant_asm``).
This builds the bench's own states (``bench.attention.build_case``) and compares the kernel with
the torch reference under each launch option switched on or off, one at a time.

    PYTHONPATH=src python benchmarks/kernel_int4_check_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spectralcache.attention.reference import spectral_attention
from spectralcache.attention.triton import decode_attention
from spectralcache.bench.attention import build_case

CONFIGS = {
    "defaults": {},
    "dequant_asm=True": {"dequant_asm": True},
    "dequant_asm=False": {"dequant_asm": False},
    "outlier_split=False": {"outlier_split": False},
    "min_rows=16": {"min_rows": 16},
    "exact_spread=False": {"exact_spread": False},
    "v5-like": {"dequant_asm": False, "outlier_split": False, "min_rows": 16, "exact_spread": False},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tokens", default="4096,131072")
    ap.add_argument("--presets", default="aggressive,default")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--tag", default="h100")
    args = ap.parse_args()
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    rows = []
    for preset in args.presets.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for batch in (1, 8):
                case = build_case(preset, batch, tokens, 32, 8, 128, torch.bfloat16, torch.device("cuda"))
                ref = spectral_attention(case.query, case.state, None).float()
                for name, cfg in configs.items():
                    try:
                        out = decode_attention(case.query, case.state, None, **cfg).float()
                        torch.cuda.synchronize()
                        err = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
                        row = {
                            "preset": preset,
                            "tokens": tokens,
                            "batch": batch,
                            "config": name,
                            "rel_err": err,
                        }
                    except Exception as exc:  # report and go on
                        row = {
                            "preset": preset,
                            "tokens": tokens,
                            "batch": batch,
                            "config": name,
                            "error": repr(exc),
                        }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del case
                torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"kernel_int4_check_{args.tag}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
