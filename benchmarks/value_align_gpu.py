"""The default preset's value rows, aligned or not, read by the decode kernel from a real cache (CUDA).

``compress_tail`` (on in the default preset) gives a layer blocks of ``T'`` tokens, e.g. 511 at
128K: with the value coefficient bytes stored tokens-contiguous, each channel row then started at
an odd byte until stop 22, and ``spectralcache bench attention`` measured the kernel at 0.126 ms
against the dev script's 0.066 ms (synthetic 512-token blocks). Since stop 22 the rows are padded to
a multiple of 16 tokens (``cache.layer.VALUE_ROW_ALIGN``). Side by side in one process, for the
state ``bench attention`` builds (``build_case``: a one-layer SpectralCache filled by a prefill, one
decode token):

* ``aligned``: the cache as committed (rows padded to 16, the value tile masked by 16-token groups:
  ``decode._value_tokens_padded``);
* ``aligned_mask_T``: the same rows read with the mask ``t < T'`` (``_value_tokens_padded`` off);
* ``unaligned``: the same cache built with ``VALUE_ROW_ALIGN = 1`` (rows ``T'`` bytes apart, stop 21);
* ``blocks512``: ``compress_tail=False`` (whole 512-token blocks, what the dev script's state has);

each timed as CUDA-graph replays with the L2 cleared before every replay (``bench attention``'s
``kernel_graph``) and back to back (``triton.testing.do_bench_cudagraph``, the dev script's method),
beside SDPA on the dense K/V. Outputs are checked against the torch reference.

    python benchmarks/value_align_gpu.py --out benchmarks/results/lead_stop22/align
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import spectralcache.cache.layer as layer_mod
from spectralcache.attention.reference import spectral_attention
from spectralcache.attention.triton import decode_attention
from spectralcache.bench.attention import _AttentionModule, build_case, graph_replayer, random_kv
from spectralcache.bench.common import measure_copy_bandwidth, run_metadata, time_fn
from spectralcache.config import SpectralConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default="benchmarks/results/lead_stop22/align")
    args = ap.parse_args(argv)
    import triton.testing as tt

    import spectralcache.attention.triton.decode as dec

    value_tokens_padded = dec._value_tokens_padded
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dev, dtype = torch.device("cuda"), torch.bfloat16
    copy = measure_copy_bandwidth(dev)
    meta = run_metadata("benchmarks/value_align_gpu.py", dev, copy_bandwidth=copy)
    rows = []

    module = _AttentionModule(4)
    for batch in [int(b) for b in args.batches.split(",")]:
        for tokens in [int(t) for t in args.contexts.split(",")]:
            keys, values = random_kv(batch, 8, tokens, 128, dtype, dev, 0)
            query = torch.randn(batch, 32, 1, 128, device=dev, dtype=dtype)

            def dense(q=query, k=keys, v=values):
                return sdpa_attention_forward(module, q, k, v, None, scaling=128**-0.5)[0]

            sdpa = graph_replayer([dense], dev)[0]
            sdpa_ms = time_fn(sdpa, dev)["median_ms"]
            sdpa_b2b = float(tt.do_bench_cudagraph(dense, rep=100, return_mode="median"))
            print(
                f"T={tokens} B={batch} sdpa graph {sdpa_ms:.4f} ms (back to back {sdpa_b2b:.4f})", flush=True
            )
            for name, align, tail in (
                ("aligned", 16, True),
                ("aligned_mask_T", 16, True),
                ("unaligned", 1, True),
                ("blocks512", 16, False),
            ):
                # aligned_mask_T: the aligned rows read with the value mask t < T (the kernel's T_V off)
                dec._value_tokens_padded = (lambda *a: 0) if name == "aligned_mask_T" else value_tokens_padded
                saved = layer_mod.VALUE_ROW_ALIGN
                layer_mod.VALUE_ROW_ALIGN = align
                try:
                    cfg = SpectralConfig.from_preset("default", compress_tail=tail)
                    case = build_case(cfg, batch, tokens, 32, 8, 128, dtype, dev, 0, (keys, values))
                finally:
                    layer_mod.VALUE_ROW_ALIGN = saved
                vc = case.state.cold.value_coeffs
                st = case.state

                def call(st=st, q=case.query):
                    return decode_attention(q, st, None, 128**-0.5, None)

                replay, outs = graph_replayer([call], dev)
                replay()
                torch.cuda.synchronize()
                ref = spectral_attention(case.query, st, None, scaling=128**-0.5)
                err = float((outs[0].float() - ref.float()).norm() / ref.float().norm())
                ms = time_fn(replay, dev)["median_ms"]
                b2b = float(tt.do_bench_cudagraph(call, rep=100, return_mode="median"))
                row = {
                    "context": tokens, "batch": batch, "layout": name, "block_tokens": int(vc.shape[-2]),
                    "value_row_stride": int(vc.stride(-1)), "graph_ms": ms, "graph_back_to_back_ms": b2b,
                    "sdpa_graph_ms": sdpa_ms, "sdpa_back_to_back_ms": sdpa_b2b, "x_sdpa": sdpa_ms / ms,
                    "x_sdpa_back_to_back": sdpa_b2b / b2b, "rel_err": err,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"  {name:10s} T'={row['block_tokens']} row stride {row['value_row_stride']}: graph {ms:.4f} ms "
                    f"(x{row['x_sdpa']:.2f} SDPA), back to back {b2b:.4f} (x{row['x_sdpa_back_to_back']:.2f}), "
                    f"rel err {err:.1e}",
                    flush=True,
                )
                del case, st, replay, outs
                torch.cuda.empty_cache()
            del keys, values, sdpa, dense
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "value_align.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
    print(f"wrote {out / 'value_align.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
