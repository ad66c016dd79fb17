"""Where a decode step's time goes: the split kernel, the combine kernel and the gaps (CUDA).

Stop 24. `spectralcache bench attention` times a whole graph replay of ``decode_attention`` (two kernels)
against SDPA's; this script opens the replay up, on the state a real ``SpectralCache`` builds
(``bench.attention.build_case``) at the Llama-3.1-8B attention shape (bf16, one query token):

* **kernels** -- ``torch.profiler`` (CUPTI) records every kernel of ``--profile-replays`` graph replays,
  each after the L2 is cleared (as ``time_fn`` does): per replay the split kernel's and the combine
  kernel's device time, the gap between them and the span from the first kernel's start to the last
  one's end; SDPA's kernels the same way;
* **variants** -- the same call on a state with parts of its work removed (timing only, the output is
  not the layer's attention; each row says so): ``coldonly`` (no exact tiers, no outlier rows: the cold
  programs alone), ``noexact`` (the outlier rows kept, no landmarks / hot window), and launch options of
  ``decode_attention`` (``pdl``, ``pdl2``); each timed as ``bench attention`` does (graph replay, L2
  cleared before every replay) beside the state's own call.

Prints tables and writes JSON:

    python benchmarks/decode_breakdown_gpu.py --out benchmarks/results/lead_stop24/breakdown
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

CELLS = ((131072, 1), (32768, 1), (4096, 1), (131072, 8))

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "coldonly": {"_state": "coldonly"},
    "noexact": {"_state": "noexact"},
    "pdl": {"pdl": True},
    "pdl2": {"pdl": 2},
    # programmatic dependent launch off (the default is form 2 on Hopper since stop 24)
    "pdl0": {"pdl": False},
    # the flat loop's tiles turned over (tile_transposed, stop 24: off, untimed), also at 5 programs an SM
    "tilet": {"tile_transposed": True},
    "tilet5": {"tile_transposed": True, "programs_per_sm": 5, "maxnreg": 96},
    # the per-block outlier bit mask instead of the value scales' flags (OUT_FLAG, the default since stop 24)
    "noflag": {"outlier_flags": False},
    # the combine kernel's columns per program / partials per load round (stop 24)
    "cd32s128": {"combine_block_d": 32, "combine_block_s": 128},
    "cd64s128": {"combine_block_d": 64, "combine_block_s": 128},
    "cd32s64": {"combine_block_d": 32, "combine_block_s": 64},
    "cd16s128": {"combine_block_d": 16, "combine_block_s": 128},
    "c0s128": {"combine_block_d": 0, "combine_block_s": 128},
    # the combine plan before stop 24 (one program per row, 64 partials a round)
    "oldcomb": {"combine_block_d": 0, "combine_block_s": 64},
    # 64-row exact / outlier tiles; outlier / exact programs of 256 rows
    "be64": {"block_e": 64},
    # timing only, results wrong: the cold tiles' outlier mask left out (ABLATE 4)
    "nomask": {"_ablate": 4},
    "short256": {"short_rows": 256},
    # the outlier / exact rows in the resident slots the cold programs leave free (one wave): SPARE
    "spare2": {"_plan": (1, 1)},
    "spare3": {"_plan": (2, 1)},
    "spare2cd": {"_plan": (1, 1), "combine_block_d": 32, "combine_block_s": 128},
}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def spare_plan(orig: Any, out_programs: int, exact_programs: int) -> Any:
    """``decode._split_plan`` with the outlier rows in ``out_programs`` programs and the exact tiers in
    ``exact_programs`` per (batch row, KV head), whatever the slots (timing of the one-wave idea)."""

    def plan(plan_blocks: int, plan_exact: int, blocks_per_split: int, **kw: Any) -> tuple:
        kw["short_rows"] = 0
        n_cold, exact_per, out_per, n_out_splits, n_exact = orig(
            plan_blocks, plan_exact, blocks_per_split, **kw
        )
        block_e = kw["block_e"]
        if n_out_splits:
            rows = plan_blocks * kw["n_out"]
            out_per = _ceil(_ceil(rows, out_programs), block_e) * block_e
            n_out_splits = -(-rows // out_per)
        if plan_exact:
            exact_per = _ceil(_ceil(plan_exact, exact_programs), block_e) * block_e
            n_exact = -(-plan_exact // exact_per)
        return n_cold, exact_per, out_per, n_out_splits, n_exact

    return plan


def strip_state(state: Any, how: str) -> Any:
    """``state`` without parts of its work (timing only): ``noexact`` -- empty landmarks and hot window
    (the decode token stays in the chunk); ``coldonly`` -- that, and no outlier rows either."""
    empty = {
        "landmark_keys": state.landmark_keys[:, :, :0],
        "landmark_values": state.landmark_values[:, :, :0],
        "hot_keys": state.hot_keys[:, :, :0],
        "hot_values": state.hot_values[:, :, :0],
    }
    out = dataclasses.replace(state, **empty)
    if how == "coldonly" and state.cold is not None:
        cold = state.cold
        out = dataclasses.replace(
            out,
            cold=dataclasses.replace(
                cold,
                outlier_keys=cold.outlier_keys[..., :0, :],
                outlier_values=cold.outlier_values[..., :0, :],
                outlier_index=cold.outlier_index[..., :0],
            ),
        )
    return out


def _kind(name: str) -> str:
    if "spectral_decode_split" in name:
        return "split"
    if "combine_splits" in name:
        return "combine"
    if "flash" in name.lower() or "fmha" in name.lower() or "attention" in name.lower():
        return "sdpa"
    return "other"


def profile_replays(replay: Any, dev: torch.device, n: int) -> dict[str, Any]:
    """Kernel times of ``n`` replays of ``replay``, each after the L2 is cleared: per kind (split /
    combine / sdpa / other) the median device time per replay, the median span (first kernel's start
    to the last one's end, the L2-clearing fill excluded) and the gaps between consecutive kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    marker = torch.zeros(1, device=dev)
    for _ in range(3):
        replay()
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            flush.zero_()
            marker.add_(1.0)  # a tiny kernel that marks where a replay starts
            replay()
        torch.cuda.synchronize(dev)
    kernels = sorted(
        (e for e in prof.events() if e.device_type == DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    replays: list[list[Any]] = []
    for e in kernels:
        name = e.name
        if "elementwise" in name and "add" in name.lower():
            replays.append([])
        elif "fill" in name.lower():
            continue
        elif replays:
            replays[-1].append(e)
    per_kind: dict[str, list[float]] = {}
    spans: list[float] = []
    gaps: list[list[float]] = []
    names: dict[str, str] = {}
    for evs in replays:
        if not evs:
            continue
        spans.append(evs[-1].time_range.end - evs[0].time_range.start)
        gaps.append([b.time_range.start - a.time_range.end for a, b in itertools.pairwise(evs)])
        acc: dict[str, float] = {}
        for e in evs:
            k = _kind(e.name)
            names.setdefault(k, e.name[:120])
            acc[k] = acc.get(k, 0.0) + (e.time_range.end - e.time_range.start)
        for k, v in acc.items():
            per_kind.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in per_kind.items()}
    gap_med = [statistics.median(g) for g in zip(*gaps)] if gaps else []
    return {
        "replays": len(spans),
        "kernel_us": med,
        "span_us": statistics.median(spans) if spans else None,
        "gaps_us": gap_med,
        "kernel_names": names,
        "kernels_per_replay": statistics.median(len(r) for r in replays) if replays else 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--cells", default="all", help="'all' or a comma list of CONTEXTxBATCH, e.g. 131072x1")
    ap.add_argument("--presets", default="default,aggressive")
    ap.add_argument("--variants", default="base,coldonly,noexact,pdl,pdl2")
    ap.add_argument("--profile-replays", type=int, default=30)
    ap.add_argument(
        "--all-presets", action="store_true", help="every preset at every cell (else 128K x 1 only)"
    )
    ap.add_argument("--out", default="benchmarks/results/lead_stop24/breakdown")
    args = ap.parse_args(argv)

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import spectralcache.attention.triton.decode as dec
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

    dev, dtype = torch.device("cuda"), torch.bfloat16
    copy_info = measure_copy_bandwidth(dev)
    meta = run_metadata("benchmarks/decode_breakdown_gpu.py", dev, copy_bandwidth=copy_info)
    cells = (
        CELLS
        if args.cells == "all"
        else tuple(tuple(int(x) for x in c.split("x")) for c in args.cells.split(","))
    )
    presets = [p for p in args.presets.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    module = _AttentionModule(4)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    print(f"copy bandwidth {copy_info['gbps']:.0f} GB/s", flush=True)
    print(
        f"{'ctx':>7} {'B':>2} {'preset':>10} {'variant':>9} {'ms':>8} {'xSDPA':>6} {'split us':>9} {'comb us':>8} "
        f"{'gap us':>7} {'span us':>8} {'err':>8}"
    )
    for tokens, batch in cells:
        keys, values = random_kv(batch, 8, tokens, 128, dtype, dev, 0)
        query = torch.randn(batch, 32, 1, 128, device=dev, dtype=dtype)
        sdpa, _ = graph_replayer(
            [
                lambda q=query, k=keys, v=values: sdpa_attention_forward(
                    module, q, k, v, None, scaling=128**-0.5
                )[0]
            ],
            dev,
        )
        sdpa_ms = time_fn(sdpa, dev)["median_ms"]
        prof = profile_replays(sdpa, dev, args.profile_replays)
        rows.append(
            {"context": tokens, "batch": batch, "preset": "sdpa", "graph_ms": sdpa_ms, "profile": prof}
        )
        print(
            f"{tokens:>7} {batch:>2} {'sdpa':>10} {'':>9} {sdpa_ms:8.4f} {'':>6} {prof['kernel_us'].get('sdpa', 0):9.2f} "
            f"{'':>8} {[round(g, 2) for g in prof['gaps_us']]!s:>7} {prof['span_us'] or 0:8.2f}",
            flush=True,
        )
        for preset in presets if (tokens, batch) == (131072, 1) or args.all_presets else presets[:1]:
            case = build_case(preset, batch, tokens, 32, 8, 128, dtype, dev, 0, (keys, values))
            for variant in variants:
                kw = dict(VARIANTS[variant])
                how = kw.pop("_state", None)
                spare = kw.pop("_plan", None)
                ablate = kw.pop("_ablate", 0)
                st = strip_state(case.state, how) if how else case.state
                committed_plan, committed_launch = dec._split_plan, dec._launch_split
                if spare:
                    dec._split_plan = spare_plan(committed_plan, *spare)
                if ablate:

                    def launch(grid, args, constexprs, options, device, bits=ablate, go=committed_launch):
                        return go(grid, args, {**constexprs, "ABLATE": bits}, options, device)

                    dec._launch_split = launch
                try:
                    replay, outs = graph_replayer(
                        [
                            lambda st=st, kw=kw, q=case.query: decode_attention(
                                q, st, None, 128**-0.5, None, **kw
                            )
                        ],
                        dev,
                    )
                    replay()
                    torch.cuda.synchronize(dev)
                    ref = spectral_attention(case.query, st, None, scaling=128**-0.5)
                    err = float((outs[0].float() - ref.float()).norm() / ref.float().norm())
                    ms = time_fn(replay, dev)["median_ms"]
                    prof = profile_replays(replay, dev, args.profile_replays)
                except Exception as exc:  # a variant that fails is a result, not the end of the run
                    print(
                        f"{tokens:>7} {batch:>2} {preset:>10} {variant:>9} ERROR {type(exc).__name__}: {exc}"[
                            :300
                        ]
                    )
                    rows.append({"context": tokens, "batch": batch, "preset": preset, "variant": variant,
                                 "error": f"{type(exc).__name__}: {str(exc)[:300]}"})  # fmt: skip
                    continue
                finally:
                    dec._split_plan, dec._launch_split = committed_plan, committed_launch
                k = prof["kernel_us"]
                row = {
                    "context": tokens, "batch": batch, "preset": preset, "variant": variant,
                    "timing_only": how is not None or bool(ablate), "graph_ms": ms, "x_sdpa": sdpa_ms / ms, "rel_err_vs_own_state": err,
                    "bytes_read": state_bytes(st)["total"], "profile": prof,
                }  # fmt: skip
                rows.append(row)
                gaps = prof["gaps_us"]
                print(
                    f"{tokens:>7} {batch:>2} {preset:>10} {variant:>9} {ms:8.4f} {sdpa_ms / ms:6.2f} "
                    f"{k.get('split', 0):9.2f} {k.get('combine', 0):8.2f} {gaps[0] if gaps else 0:7.2f} "
                    f"{prof['span_us'] or 0:8.2f} {err:8.1e}",
                    flush=True,
                )
                del replay, outs
            del case
            torch.cuda.empty_cache()
        del sdpa
        print(f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_breakdown.json").write_text(
        json.dumps({"meta": meta, "results": rows}, indent=1, default=str)
    )
    print(f"wrote {out / 'decode_breakdown.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
