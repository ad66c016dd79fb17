"""Block lengths and launch plans of the decode kernel on the state a real cache builds (CUDA).

Stop 22 found that the dev script's synthetic states (whole 512-token blocks, graph replays back to
back) do not time what the library runs: ``compress_tail`` (the default preset) re-blocks a prefill
into ``T' = n // k`` tokens (511 at 128K, 501 at 4K), and with such a ``T'`` every token mask of the
kernel is constant over one token. This script times, side by side in one process and the way
``spectralcache bench attention`` does (``kernel_graph``: the call captured in a CUDA graph, the L2
cleared before every replay, beside SDPA timed the same way on the dense K/V):

* **layouts** -- the block length a layer gets: ``tail`` (the rule as committed), ``stop22`` (the rule
  before stop 23, which re-blocked long prompts too: ``--matrix verify``), ``plain``
  (``compress_tail=False``: whole ``block_size`` blocks, up to ``block_size - 1`` more exact tokens),
  ``tail16`` (``T'`` rounded down to a multiple of 16: whole 16-token mask groups, 16-byte aligned
  value rows and scales, up to ``15 k`` more exact tokens), ``tail64`` (to a multiple of the 64-token
  tile: no partial tile), each with its held bytes;
* **plans** -- ``decode_attention`` launch arguments on one layout: ``bp4`` / ``bp2`` / ``bp1``
  (``block_parts``: fewer, longer programs at short contexts, whose automatic plan may overflow the
  resident slots by a few programs), ``pdl`` (programmatic dependent launch), ``r168`` (3 programs per
  SM with 168 registers), ``noosplit`` (outlier rows read by the cold programs: one wave at 128K batch
  1), ``st2`` / ``st3`` / ``st4`` (pipeline depth), ``short0`` (no short second-wave programs).

Every output is compared with the torch reference. Prints a table and writes JSON:

    python benchmarks/decode_plan_scan_gpu.py --out benchmarks/results/lead_stop23/scan
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

# cells: (context, batch) -> (layouts timed with the automatic plan, {layout: plan variants})
CELLS: dict[tuple[int, int], tuple[list[str], dict[str, list[str]]]] = {
    (4096, 1): (
        ["tail", "tail16", "plain"],
        {"tail": ["bp4", "bp2", "bp1", "pdl", "st3"], "tail16": ["bp4"]},
    ),
    (4096, 8): (["tail", "tail16", "plain"], {}),
    (32768, 1): (["tail", "tail16", "tail64", "plain"], {"plain": ["pdl", "r168", "noosplit", "st2"]}),
    (32768, 8): (["tail", "tail16", "plain"], {"plain": ["noosplit"]}),
    (131072, 1): (
        ["tail", "tail16", "tail64", "plain"],
        {"plain": ["pdl", "r168", "noosplit", "st2", "st4", "short0"], "tail16": ["noosplit", "r168"]},
    ),
    (131072, 8): (["tail", "tail16", "plain"], {"plain": ["noosplit", "pdl"]}),
}

# stop 23's check of what it changed: the block length rule before it (``stop22``) against the committed
# one (``tail``: whole blocks once they leave <= n/64 over) and the automatic plan (one-tile block parts
# no longer overflow the slots), side by side
VERIFY: dict[tuple[int, int], tuple[list[str], dict[str, list[str]]]] = {
    (4096, 1): (["stop22", "tail"], {"stop22": ["bp8"]}),
    (16384, 1): (["stop22", "tail"], {}),
    (32768, 1): (["stop22", "tail"], {}),
    (65536, 1): (["stop22", "tail"], {}),
    (131072, 1): (["stop22", "tail"], {}),
    (32768, 8): (["stop22", "tail"], {}),
    (131072, 8): (["stop22", "tail"], {}),
}

# the aggressive preset (whole 512-token blocks, low-rank int4) at batch 1: 3 programs per SM with 168
# registers (the kernel engineer's stop-22 lead: 32K 0.0167 against 0.0189 ms, dev script); and the
# default preset's second-wave program length at 128K
EXTRA_CELLS: dict[tuple[int, int], tuple[list[str], dict[str, list[str]]]] = {
    (4096, 1): (["plain"], {"plain": ["r168"]}),
    (16384, 1): (["plain"], {"plain": ["r168"]}),
    (32768, 1): (["plain"], {"plain": ["r168"]}),
    (65536, 1): (["plain"], {"plain": ["r168"]}),
    (131072, 1): (["plain"], {"plain": ["r168", "short64", "short256"]}),
}

# kernel variants of the default preset's layout at batch 1 (each an option of ``decode_attention``, off
# by default after earlier stops' measurements on synthetic row-major states): do any win on the cache's
# own state (tokens-contiguous value rows, 512-token blocks)?
KNOB_CELLS: dict[tuple[int, int], tuple[list[str], dict[str, list[str]]]] = {
    (131072, 1): (["tail"], {"tail": ["bt128", "ocols", "keyraw", "i4asm1", "nodefer", "ft3", "w8"]}),
    (32768, 1): (["tail"], {"tail": ["bt128", "ocols", "keyraw"]}),
}

# second round: the outlier mask per tile column with PDL, and fewer warps with more programs per SM
# (more independent tile chains per SM at batch 1)
KNOB2_CELLS: dict[tuple[int, int], tuple[list[str], dict[str, list[str]]]] = {
    (131072, 1): (["tail"], {"tail": ["ocols", "ocolspdl", "w2p8", "w2p8oc", "w2p6"]}),
    (32768, 1): (["tail"], {"tail": ["ocols", "w2p8"]}),
}

# third round: 128-token tiles (two tiles' chains in one) where 3 programs per SM leave 168 registers
KNOB3_CELLS: dict[tuple[int, int], tuple[list[str], dict[str, list[str]]]] = {
    (131072, 1): (["tail"], {"tail": ["bt128r168", "bt128"]}),
    (32768, 1): (["tail"], {"tail": ["bt128r168"]}),
}

# a57db0e (not timed in stop 23): the value scales of re-blocked layouts padded to 16 tokens and read with the
# value tile's mask (VS_PAD) against the same state read with the mask t < T (``novspad``), side by side --
# the 4K-16K prompts, where compress_tail still re-blocks
VSPAD_CELLS: dict[tuple[int, int], tuple[list[str], dict[str, list[str]]]] = {
    (4096, 1): (["tail"], {"tail": ["novspad"]}),
    (8192, 1): (["tail"], {"tail": ["novspad"]}),
    (16384, 1): (["tail"], {"tail": ["novspad"]}),
    (16384, 8): (["tail"], {"tail": ["novspad"]}),
}

PLANS: dict[str, dict[str, Any]] = {
    "base": {},
    "bp8": {"block_parts": 8},
    "bp4": {"block_parts": 4},
    "bp2": {"block_parts": 2},
    "bp1": {"block_parts": 1},
    "pdl": {"pdl": True},
    "r168": {"programs_per_sm": 3, "maxnreg": 168},
    "noosplit": {"outlier_split": False},
    "st2": {"num_stages": 2},
    "st3": {"num_stages": 3},
    "st4": {"num_stages": 4},
    "short0": {"short_rows": 0},
    "short64": {"short_rows": 64},
    "bt128": {"block_t": 128},
    "bt128r168": {"block_t": 128, "programs_per_sm": 3, "maxnreg": 168},
    # not a decode_attention argument: the scan turns decode._value_scales_padded off for this row
    "novspad": {"_vs_pad": False},
    "ocols": {"outlier_cols": True},
    "keyraw": {"key_raw": True},
    "i4asm1": {"int4_asm": 1},
    "nodefer": {"defer_den": False},
    "ft3": {"flat_tiles": 3},
    "w8": {"num_warps": 8},
    "ocolspdl": {"outlier_cols": True, "pdl": True},
    "w2p8": {"num_warps": 2, "programs_per_sm": 8},
    "w2p8oc": {"num_warps": 2, "programs_per_sm": 8, "outlier_cols": True},
    "w2p6": {"num_warps": 2, "programs_per_sm": 6},
    "short256": {"short_rows": 256},
}


def _rounded_tail(multiple: int):
    """A ``SpectralLayer._tail_block_size`` whose ``T'`` is rounded down to ``multiple`` (not below the
    rule's own floor: then the committed ``T'``)."""
    from spectralcache.cache.layer import SpectralLayer

    committed = SpectralLayer._tail_block_size

    def tail_block_size(self, n: int) -> int:
        t = committed(self, n)
        if t == self.config.block_size:
            return t
        down = t // multiple * multiple
        return down if down >= -(-self.config.block_size // 2) else t

    return tail_block_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--matrix",
        choices=("scan", "verify", "extra", "knobs", "knobs2", "knobs3", "vspad"),
        default="scan",
        help="CELLS, VERIFY, EXTRA_CELLS, KNOB_CELLS, KNOB2_CELLS, KNOB3_CELLS or VSPAD_CELLS",
    )
    ap.add_argument("--cells", default="all", help="'all' or a comma list of CONTEXTxBATCH, e.g. 4096x1")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--extra-presets", default="aggressive", help="presets timed at 128K x 1 (--extra-plans)")
    ap.add_argument("--extra-plans", default="base,r168,pdl")
    ap.add_argument("--out", default="benchmarks/results/lead_stop23/scan")
    args = ap.parse_args(argv)

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import spectralcache.attention.triton.decode as dec
    import spectralcache.cache.layer as layer_mod
    from spectralcache.attention.reference import spectral_attention
    from spectralcache.attention.triton import decode_attention
    from spectralcache.bench.attention import (
        _AttentionModule,
        build_case,
        graph_replayer,
        random_kv,
        state_bytes,
    )
    from spectralcache.bench.common import measure_copy_bandwidth, run_metadata, time_fn
    from spectralcache.cache.layer import SpectralLayer
    from spectralcache.config import SpectralConfig

    dev, dtype = torch.device("cuda"), torch.bfloat16
    copy_info = measure_copy_bandwidth(dev)
    copy = float(copy_info["gbps"])
    meta = run_metadata("benchmarks/decode_plan_scan_gpu.py", dev, copy_bandwidth=copy_info)
    committed_tail = SpectralLayer._tail_block_size
    plain_fraction = layer_mod.TAIL_PLAIN_FRACTION
    tails = {"tail": committed_tail, "tail16": _rounded_tail(16), "tail64": _rounded_tail(64)}
    matrix = {
        "scan": CELLS,
        "verify": VERIFY,
        "extra": EXTRA_CELLS,
        "knobs": KNOB_CELLS,
        "knobs2": KNOB2_CELLS,
        "knobs3": KNOB3_CELLS,
        "vspad": VSPAD_CELLS,
    }[args.matrix]
    cells = matrix if args.cells == "all" else {
        k: matrix[k] for k in (tuple(int(x) for x in c.split("x")) for c in args.cells.split(","))
    }  # fmt: skip
    extra = [p for p in args.extra_presets.split(",") if p]
    rows: list[dict[str, Any]] = []
    module = _AttentionModule(4)
    t_start = time.perf_counter()
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    print(
        f"{'ctx':>7} {'B':>2} {'layout':>18} {'plan':>8} {'T':>4} {'ms':>8} {'xSDPA':>6} {'MB':>8} {'%copy':>6} {'err':>8}"
    )
    for (tokens, batch), (layouts, variants) in cells.items():
        keys, values = random_kv(batch, 8, tokens, 128, dtype, dev, 0)
        query = torch.randn(batch, 32, 1, 128, device=dev, dtype=dtype)
        sdpa = graph_replayer(
            [
                lambda q=query, k=keys, v=values: sdpa_attention_forward(
                    module, q, k, v, None, scaling=128**-0.5
                )[0]
            ],
            dev,
        )[0]
        sdpa_ms = time_fn(sdpa, dev)["median_ms"]
        print(f"{tokens:>7} {batch:>2} {'sdpa (dense)':>18} {'':>8} {'':>4} {sdpa_ms:8.4f}", flush=True)
        rows.append({"context": tokens, "batch": batch, "layout": "sdpa", "plan": None, "graph_ms": sdpa_ms})
        todo = [(f"{args.preset}:{lay}", lay, "base") for lay in layouts]
        todo += [(f"{args.preset}:{lay}", lay, v) for lay, vs in variants.items() for v in vs]
        if (tokens, batch) == (131072, 1):
            todo += [(f"{p}", None, v) for p in extra for v in args.extra_plans.split(",")]
        cases: dict[str, Any] = {}
        for name, layout, plan in todo:
            try:
                if name not in cases:
                    preset = name.split(":")[0]
                    cfg = SpectralConfig.from_preset(preset)
                    if layout == "plain":
                        cfg = cfg.replace(compress_tail=False)
                    SpectralLayer._tail_block_size = tails.get(layout or "tail", committed_tail)
                    # stop22: the rule before stop 23 (whole blocks only where they waste no more)
                    layer_mod.TAIL_PLAIN_FRACTION = 1 << 62 if layout == "stop22" else plain_fraction
                    try:
                        cases = {
                            name: build_case(cfg, batch, tokens, 32, 8, 128, dtype, dev, 0, (keys, values))
                        }
                    finally:
                        SpectralLayer._tail_block_size = committed_tail
                        layer_mod.TAIL_PLAIN_FRACTION = plain_fraction
                case = cases[name]
                st, kw = case.state, dict(PLANS[plan])
                vs_rule = dec._value_scales_padded
                if not kw.pop("_vs_pad", True):
                    dec._value_scales_padded = lambda *a: False
                dec._COLD_ARGS.clear()  # the launch facts (VS_PAD among them) are cached per cold view

                def call(st=st, q=case.query, kw=kw):
                    return decode_attention(q, st, None, 128**-0.5, None, **kw)

                try:
                    replay, outs = graph_replayer([call], dev)
                finally:
                    dec._value_scales_padded = vs_rule
                replay()
                torch.cuda.synchronize()
                ref = spectral_attention(case.query, st, None, scaling=128**-0.5)
                err = float((outs[0].float() - ref.float()).norm() / ref.float().norm())
                ms = time_fn(replay, dev)["median_ms"]
                read = state_bytes(st)["total"]
                layer = case.cache.layers[0]
                row = {
                    "context": tokens, "batch": batch, "preset": name.split(":")[0], "layout": layout or "preset",
                    "plan": plan, "plan_kwargs": kw, "block_tokens": layer.block_size, "num_blocks": layer.num_blocks,
                    "hot_len": layer.hot_len, "bytes_read": read, "graph_ms": ms, "x_sdpa": sdpa_ms / ms,
                    "frac_copy_bw": read / (ms * 1e-3) / 1e9 / copy, "rel_err": err,
                }  # fmt: skip
                del replay, outs
            except Exception as err:  # a plan that does not fit is a result, not the end of the scan
                row = {"context": tokens, "batch": batch, "preset": name, "layout": layout, "plan": plan,
                       "error": f"{type(err).__name__}: {str(err)[:300]}"}  # fmt: skip
                print(f"{tokens:>7} {batch:>2} {name:>18} {plan:>8} ERROR {row['error'][:120]}", flush=True)
                rows.append(row)
                continue
            rows.append(row)
            print(
                f"{tokens:>7} {batch:>2} {name:>18} {plan:>8} {row['block_tokens']:>4} {ms:8.4f} {row['x_sdpa']:6.2f} "
                f"{read / 1e6:8.1f} {100 * row['frac_copy_bw']:6.1f} {err:8.1e}",
                flush=True,
            )
        del cases, sdpa
        torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_plan_scan.json").write_text(
        json.dumps({"meta": meta, "results": rows}, indent=1, default=str)
    )
    print(f"wrote {out / 'decode_plan_scan.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
