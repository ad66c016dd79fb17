"""How much do per-channel zero points (``key_zero_point``) cut the key error on Gemma's real keys?

One prefill of the perplexity corpus (``spectralcache.eval.spectrum.capture``, Gemma 3 270M,
float32, CPU) at ``--length`` tokens; for each full-attention layer the post-RoPE keys are cut
into blocks of 512 tokens and quantized per channel with the library's quantizer
(``linalg.quant.quantize_cols``): symmetric (the ``channel`` codec) and with zero points, at
4 bits, plus finer token groups (one scale per channel per ``g`` tokens, a lever not built into
the cache) and 8 bits for scale. No outliers are taken out here (the cache keeps 8 per block
exact), so this is the codec alone.

Two errors per block, summed over blocks: the keys' relative Frobenius error, and the score
error ``||Q (K - K̂)ᵀ||_F / ||Q Kᵀ - mean||_F`` with ``Q`` = 64 of the layer's own keys at random
positions standing in for queries (a proxy: queries and keys share the post-RoPE frame; the
retrieval runs in ``docs/fidelity.md`` are the real test).

    python benchmarks/key_zero_point_probe.py --out benchmarks/results/fidelity/zero_point_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spectralcache.eval.model import load_model
from spectralcache.eval.spectrum import capture
from spectralcache.linalg.quant import dequantize_rows, quantize_cols

BLOCK = 512


def codec(bits: int, zero_point: bool, group: int = BLOCK):
    def run(x: torch.Tensor) -> torch.Tensor:  # [T, D] -> decoded [T, D]
        t, d = x.shape
        g = x.reshape(t // group, group, d)
        return dequantize_rows(quantize_cols(g, bits, zero_point=zero_point)).reshape(t, d)

    return run


CODECS = {
    "int4 symmetric (channel)": codec(4, False),
    "int4 zero point": codec(4, True),
    "int4 symmetric, 128-token groups": codec(4, False, 128),
    "int4 zero point, 128-token groups": codec(4, True, 128),
    "int4 zero point, 64-token groups": codec(4, True, 64),
    "int8 symmetric": codec(8, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity/zero_point_probe.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model()
    kv = capture(model, tok, args.length)
    rows = []
    for layer, kinds in kv.items():
        keys = kinds["keys_post_rope"]  # [H, T, D]
        for head in range(keys.shape[0]):
            k = keys[head]
            n = k.shape[0] // BLOCK * BLOCK
            g = torch.Generator().manual_seed(1000 * layer + head)
            q = k[torch.randint(0, k.shape[0], (args.queries,), generator=g)]
            for name, fn in CODECS.items():
                kerr = ktot = serr = stot = 0.0
                for b in range(0, n, BLOCK):
                    x = k[b : b + BLOCK]
                    xh = fn(x)
                    kerr += float((x - xh).square().sum())
                    ktot += float(x.square().sum())
                    s = q @ x.T
                    serr += float((q @ (x - xh).T).square().sum())
                    stot += float((s - s.mean(1, keepdim=True)).square().sum())
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "codec": name,
                        "key_error": (kerr / ktot) ** 0.5,
                        "score_error": (serr / stot) ** 0.5,
                    }
                )
    print(f"Gemma 3 270M, {args.length} tokens, post-RoPE keys, blocks of {BLOCK} (score error / key error)")
    layers = sorted({r["layer"] for r in rows})
    print("| codec | " + " | ".join(f"layer {i}" for i in layers) + " |")
    print("|---|" + "---|" * len(layers))
    for name in CODECS:
        cells = []
        for i in layers:
            sel = [r for r in rows if r["layer"] == i and r["codec"] == name]
            se = sum(r["score_error"] for r in sel) / len(sel)
            ke = sum(r["key_error"] for r in sel) / len(sel)
            cells.append(f"{se:.3f} / {ke:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "length": args.length,
                "block": BLOCK,
                "queries": args.queries,
                "rows": rows,
                "seconds": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
