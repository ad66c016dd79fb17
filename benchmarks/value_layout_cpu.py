"""The torch reference decode on CPU with the default preset's value bytes stored tokens-contiguous
(``cache/layer.py`` since stop 21) against the row-major layout before it.

The layout was chosen for the CUDA kernel (``benchmarks/results/kernel_stop21/``); the CPU path -- the
reference ``spectral_attention``, which the demo and CPU users run -- must not pay for it. A real
``SpectralLayer`` (default preset, Llama-8B attention shape: 8 KV heads, head_dim 128, float32) is
prefilled with random K/V, once with the layout and once with it switched off
(``stores_values_tokens_contiguous`` patched to False), and one query token (32 heads) is attended;
median milliseconds of ``--repeats`` calls, the two layouts interleaved ``--rounds`` times.

Usage::

    python benchmarks/value_layout_cpu.py --tokens 16384 --threads 1 --out benchmarks/results/value_layout_cpu

Prints a table and writes ``value_layout_cpu.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import spectralcache.cache.layer as layer_mod
from spectralcache.attention.reference import spectral_attention
from spectralcache.cache.layer import SpectralLayer
from spectralcache.config import get_preset


def build(tokens: int, tokens_contiguous: bool, seed: int) -> SpectralLayer:
    rule = layer_mod.stores_values_tokens_contiguous
    if not tokens_contiguous:
        layer_mod.stores_values_tokens_contiguous = lambda config: False
    try:
        layer = SpectralLayer(get_preset("default"), 0, head_dim=128, num_kv_heads=8)
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(1, 8, tokens, 128, generator=g)
        v = torch.randn(1, 8, tokens, 128, generator=g)
        layer.update(k, v)
        layer.release_chunk()
    finally:
        layer_mod.stores_values_tokens_contiguous = rule
    return layer


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/value_layout_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    query = torch.randn(1, 32, 1, 128, generator=torch.Generator().manual_seed(7))
    rows = []
    outs = {}
    for r in range(args.rounds):
        for tc in (True, False):
            layer = build(args.tokens, tc, seed=1)
            state = layer.state()
            outs[tc] = spectral_attention(query, state)
            ms = time_call(lambda state=state: spectral_attention(query, state), args.repeats)
            rows.append(
                {
                    "round": r,
                    "tokens_contiguous": tc,
                    "ms": ms,
                    "value_strides": list(state.cold.value_coeffs.stride()),
                }
            )
            print(f"round {r}  {'tokens-contiguous' if tc else 'row-major        '}  {ms:8.1f} ms  "
                  f"value strides {tuple(state.cold.value_coeffs.stride())}")  # fmt: skip
    same = bool(torch.equal(outs[True], outs[False]))
    med = {
        tc: statistics.median(x["ms"] for x in rows if x["tokens_contiguous"] == tc) for tc in (True, False)
    }
    print(f"median: tokens-contiguous {med[True]:.1f} ms, row-major {med[False]:.1f} ms "
          f"({med[False] / med[True]:.2f}x); outputs identical: {same}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(), **vars(args)}
    result = {"meta": meta, "rows": rows, "median_ms": {"tokens_contiguous": med[True], "row_major": med[False]},
              "outputs_identical": same}  # fmt: skip
    (out / "value_layout_cpu.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
