"""Fused Triton decode kernel: CUDA correctness + timing + launch-plan variants, in one run.

Usage (on a CUDA machine)::

    python benchmarks/attention_kernel_dev.py --out DIR [--sections copy,check,time,variants]

* ``copy``: the card's device-to-device copy bandwidth (bytes read + written), the ceiling
  the kernel's achieved bandwidth is compared to;
* ``check`` / ``quickcheck`` (9 modes; ``--check-modes`` names a subset, ``--check-block-size`` sets the
  states' block size): kernel vs torch reference (``spectral_attention``) on fresh random states for
  every mode (key space, codec per side, 4/8/16-bit, outliers, GQA 1/4/8, batch, padding,
  q_len > 1, softcap), float32 (< 1e-5) and bfloat16 (< 1e-2), output poisoned with NaN first;
* ``time``: Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16), one
  query token, contexts 4K..128K, batch 1 and 8, presets (``--time-presets``; ``PRESETS``: default,
  aggressive, channel, channel_zp = channel with key zero points): SDPA on the dense
  K/V vs the kernel (eager and CUDA-graph replay) vs the torch reference; median ms, GB/s on the
  bytes the kernel must read, fraction of the copy bandwidth, byte ratio vs dense;
* ``variants``: graph-replay time of launch configs at batch 1 (``--variant-contexts``; or the
  ``--variant-cells`` context x batch pairs, e.g. ``4096x1,4096x8``), each cell beside SDPA: the product
  of the ``--v-*`` lists (block_t, num_warps, maxnreg, programs_per_sm, block_stages,
  outlier_split, dequant_asm, min_rows, num_stages, exact_spread, ..., blocks_per_split, block_parts,
  block_parts_min_tiles) plus ``--v-extra`` configs; the ``time`` section then uses each preset's fastest;
* ``sass`` (CPU only, no GPU needed): compile the split kernel of each ``--sass-configs`` launch for
  sm_90a and report registers, spills, shared memory and SASS instruction counts.

``--check-configs`` lists launch options the check runs (default: the defaults). Prints a short table
last and writes ``kernel_dev.json`` under ``--out`` (after every section, and after every variant /
time row). The v6 runs and their exact commands: ``benchmarks/results/attention_kernel_dev/RUN.md``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from spectralcache.attention.reference import spectral_attention
from spectralcache.attention.triton import decode_attention
from spectralcache.attention.triton.synthetic import random_state
from spectralcache.cache.layer import tokens_contiguous

PRESETS = {
    # name: (rank_keys, rank_values, outliers, bits). "default" / "aggressive": the low-rank layouts of
    # those presets up to stop 16 ("default" is the "lowrank" preset since stop 17); "channel": the
    # default preset since stop 17 (keys int4 per channel, values int4 per token, 8 outliers);
    # "channel_zp": the same with a float32 zero point per key channel and block (key_zero_point)
    "default": (32, 64, 32, 8),
    "aggressive": (16, 32, 16, 4),
    "channel": (128, 128, 8, 4),
    "channel_zp": (128, 128, 8, 4),
    # the default's codecs in 128-token blocks with 2 outliers each (block_size=128, outliers_per_block=2:
    # the same outlier share, the candidate next default)
    "channel_zp_b128": (128, 128, 2, 4),
    # channel_zp with the value coefficient bytes stored tokens-contiguous ([.., nb, D/2, T] memory, seen
    # through a transposed view as the [.., nb, T, D/2] tensor): how the cache stores the default preset's
    # values since stop 21 (cache.layer.stores_values_tokens_contiguous); channel_zp is the row-major
    # layout before it
    "channel_zp_vt": (128, 128, 8, 4),
    # the aggressive layout with its low-rank value coefficient bytes stored tokens-contiguous (stop 22: a
    # candidate storage, not what the cache stores)
    "aggressive_vt": (16, 32, 16, 4),
    # the state a real SpectralCache builds for that preset (bench.attention.build_case: a prefill through
    # update, one decode token) -- its block length, tiers and storage as the library runs them (stop 22:
    # the default preset's compressed tail makes 511-token blocks at 128K, which the synthetic states above
    # never had; benchmarks/results/lead_stop22/)
    "cache:default": (128, 128, 8, 4),
    "cache:aggressive": (16, 32, 16, 4),
}
# random_state options beyond the ranks (identity / per-channel codecs, zero points)
STATE_OPTIONS = {
    "channel": {"channel_keys": True, "identity_values": True},
    "channel_zp": {"channel_keys": True, "identity_values": True, "key_zero_point": True},
    "channel_zp_b128": {"channel_keys": True, "identity_values": True, "key_zero_point": True},
    "channel_zp_vt": {"channel_keys": True, "identity_values": True, "key_zero_point": True},
}
# presets whose value coefficient bytes are stored tokens-contiguous (value_tokens_contiguous)
VALUE_T = {"channel_zp_vt", "aggressive_vt"}


def value_tokens_contiguous(state):
    """``state`` with its cold value coefficients stored tokens-contiguous: the same [B, H, nb, T, w]
    tensor (same values), its memory ordered [B, H, nb, w, T] (``cache.layer.tokens_contiguous``, the
    default preset's values since stop 21: the kernel's value tile then reaches the mma B operand without
    single-byte shared-memory loads)."""
    c = state.cold
    if c is not None and c.value_coeffs is not None and c.value_coeffs.numel():
        c.value_coeffs = tokens_contiguous(c.value_coeffs)
    return state


# timing-only ablations (decode_splits._cold_tile ABLATE): bits of the tile work left out -- results wrong
ABLATE_BITS = {"values": 1, "keys": 2, "outliers": 4, "softmax": 8}


class ablate:
    """Context manager: every split launch made inside runs with ``ABLATE = bits`` (timing only, the
    results are wrong; decode_attention itself always launches with 0). Works by wrapping
    ``decode._launch_split``, the one place the launch's constexprs pass through."""

    def __init__(self, bits: int) -> None:
        self.bits = int(bits)

    def __enter__(self):
        import spectralcache.attention.triton.decode as dec

        self._dec, self._saved = dec, dec._launch_split
        if self.bits:
            saved = self._saved

            def launch(grid, args, constexprs, options, device, bits=self.bits):
                return saved(grid, args, {**constexprs, "ABLATE": bits}, options, device)

            dec._launch_split = launch
        return self

    def __exit__(self, *exc) -> None:
        self._dec._launch_split = self._saved


# block size of a preset's states (default 512, the presets' block_size)
BLOCK_SIZES = {"channel_zp_b128": 128}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def state_bytes(state) -> int:
    """Bytes the kernel must read: every tensor of the state once (logical size, not capacity)."""
    tensors = [state.landmark_keys, state.landmark_values, state.hot_keys, state.hot_values]
    if state.chunk_keys is not None:
        tensors += [state.chunk_keys, state.chunk_values]
    c = state.cold
    if c is not None:
        tensors += [
            c.key_coeffs, c.key_scales, c.key_offsets, c.key_basis, c.value_coeffs, c.value_scales,
            c.value_basis, c.outlier_keys, c.outlier_values, c.outlier_index, c.block_starts,
        ]  # fmt: skip
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bench(fn, graph: bool = False) -> float:
    import triton.testing as tt

    if graph:
        return float(tt.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def section_copy(res: dict) -> None:
    n = 1 << 28  # 1 GiB of float32
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda x=x, y=y: y.copy_(x))
    res["copy"] = {"bytes": 2 * x.numel() * 4, "ms": ms, "GBps": 2 * x.numel() * 4 / ms / 1e6}
    print(f"copy bandwidth: {res['copy']['GBps']:.0f} GB/s ({ms:.3f} ms for 2 GiB moved)", flush=True)
    del x, y


def check_modes(block_size: int = 128):
    base = dict(batch=2, kv_heads=4, head_dim=128, landmarks=16, block_size=block_size, blocks=5, outliers=8,
                hot=70, chunk=1, rank_keys=32, rank_values=64)  # fmt: skip
    modes = []
    for ks in ("post_rope", "pre_rope"):
        for kb in (8, 4, 16):
            modes.append((f"{ks} k{kb}", dict(key_space=ks, key_bits=kb), 4, 1, None, None))
        modes.append((f"{ks} idK", dict(key_space=ks, identity_keys=True), 4, 1, None, None))
        modes.append((f"{ks} idK4 idV", dict(key_space=ks, identity_keys=True, identity_values=True,
                                             key_bits=4), 4, 1, None, None))  # fmt: skip
        for kb in (4, 8):  # per-channel key scales (key_codec="channel"), without / with zero points
            for zp in (False, True):
                modes.append((f"{ks} chK{kb}{'zp' if zp else ''} idV4",
                              dict(key_space=ks, channel_keys=True, key_zero_point=zp, key_bits=kb,
                                   identity_values=True, value_bits=4), 4, 1, None, None))  # fmt: skip
    modes += [
        ("idV v4", dict(identity_values=True, value_bits=4), 4, 1, None, None),
        ("G1 b1", dict(batch=1), 1, 1, None, None),
        ("G8 b4", dict(batch=4), 8, 1, None, None),
        ("pad mask", dict(), 4, 1, "pad", None),
        ("float mask", dict(), 4, 1, "float", None),
        ("q4 spec", dict(chunk=4), 4, 4, None, None),
        ("q4 pad", dict(chunk=4), 4, 4, "pad", None),
        ("softcap", dict(), 4, 1, None, 30.0),
        ("no outliers", dict(outliers=0), 4, 1, None, None),
        ("no cold", dict(blocks=0), 4, 1, None, None),
        ("odd T=100 rk=20", dict(block_size=100, rank_keys=20, rank_values=36), 4, 1, None, None),
        ("prerope half rot", dict(key_space="pre_rope", rot_dim=64), 4, 1, None, None),
        # the aggressive preset's ranks: 16-column int4 key tiles (8-byte rows; stop 22: read byte-once
        # with int4_bytes 16, the tile width Triton 3.6 compiled wrong on the H100 at stop 16)
        ("post_rope k4 rk16", dict(key_bits=4, rank_keys=16, rank_values=32), 4, 1, None, None),
    ]
    return base, modes


def section_check(
    res: dict, quick: bool = False, configs=({},), only=None, block_size: int = 128, value_t: bool = False
) -> None:
    base, modes = check_modes(block_size)
    if only:  # --check-modes: these modes, quick or not
        unknown = set(only) - {m[0] for m in modes}
        if unknown:
            raise ValueError(f"--check-modes: no such modes {sorted(unknown)}")
        modes = [m for m in modes if m[0] in only]
    elif quick:  # one mode per kernel specialisation that timing uses, plus pre-RoPE and masks
        keep = {
            "post_rope k8",
            "post_rope k4",
            "pre_rope k8",
            "q4 pad",
            "G8 b4",
            "post_rope chK4 idV4",
            "pre_rope chK8 idV4",
            "post_rope chK4zp idV4",
            "pre_rope chK4zp idV4",
        }
        modes = [m for m in modes if m[0] in keep]
    rows = []
    seed = 100
    # cfg: launch options on top of decode_attention's defaults
    for (name, over, groups, q_len, mask_kind, softcap), cfg in itertools.product(modes, configs):
        for dtype, bar in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            seed += 1
            kw = {**base, **over, "dtype": dtype, "device": "cuda", "seed": seed}
            try:
                st = random_state(**kw)
                if value_t:  # --check-value-t: value bytes stored tokens-contiguous
                    st = value_tokens_contiguous(st)
                b, h = kw["batch"], kw["kv_heads"]
                g = torch.Generator().manual_seed(seed)
                q = torch.randn(b, h * groups, q_len, kw["head_dim"], generator=g).to(dtype).cuda()
                mask = None
                if mask_kind is not None:
                    pads = torch.randint(0, st.seq_len // 2, (b,), generator=g)
                    qpos = torch.arange(st.seq_len - q_len, st.seq_len)
                    kv = torch.arange(st.seq_len)
                    keep = (kv[None, :] <= qpos[:, None])[None] & (kv[None, None, :] >= pads[:, None, None])
                    mask = keep[:, None].cuda()
                    if mask_kind == "float":
                        mask = torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)
                out = torch.full_like(q, float("nan"))
                decode_attention(q, st, mask, None, softcap, out=out, **cfg)
                torch.cuda.synchronize()
                ref = spectral_attention(q, st, mask, softcap=softcap)
                err = rel(out, ref)
                ok = bool(torch.isfinite(out).all()) and err < bar
                rows.append({"mode": name, "config": cfg, "dtype": str(dtype), "rel_err": err, "ok": ok,
                             "value_t": value_t})  # fmt: skip
            except Exception as exc:  # report and go on: one failing mode must not hide the others
                rows.append({"mode": name, "config": cfg, "dtype": str(dtype), "error": repr(exc)[:500],
                             "ok": False})  # fmt: skip
                traceback.print_exc()
            r = rows[-1]
            print(f"check {name:22s} {cfg} {dtype!s:15s} {r.get('rel_err', float('nan')):.2e} "
                  f"{'ok' if r['ok'] else 'FAIL ' + r.get('error', '')[:200]}", flush=True)  # fmt: skip
    res["check"] = rows


def llama_state(ctx: int, batch: int, preset: str, device: str = "cuda", seed: int = 0):
    if preset.startswith("cache:"):
        from spectralcache.bench.attention import build_case

        case = build_case(preset.removeprefix("cache:"), batch, ctx, 32, 8, 128, torch.bfloat16,
                          torch.device(device), seed)  # fmt: skip
        return case.state
    rk, rv, o, bits = PRESETS[preset]
    t, lm = BLOCK_SIZES.get(preset, 512), 16
    nb = (ctx - lm - 64) // t
    hot = ctx - lm - nb * t
    st = random_state(batch=batch, kv_heads=8, head_dim=128, landmarks=lm, block_size=t, blocks=nb,
                        outliers=o, hot=hot, chunk=1, rank_keys=rk, rank_values=rv, key_bits=bits,
                        dtype=torch.bfloat16, basis_dtype=torch.bfloat16, spare_capacity=0,
                        device=device, seed=seed, **STATE_OPTIONS.get(preset, {}))  # fmt: skip
    return value_tokens_contiguous(st) if preset in VALUE_T else st


CONFIG_KEYS = (
    "block_t", "num_warps", "maxnreg", "programs_per_sm", "block_stages", "outlier_split", "dequant_asm",
    "min_rows", "num_stages", "exact_spread", "int4_bytes", "int4_row_stride", "int4_pad",
    "blocks_per_split", "block_parts", "block_parts_min_tiles", "nibble_split", "int4_asm", "defer_den",
    "flat_tiles", "key_raw", "outlier_cols", "pdl", "short_rows", "ablate",
)  # fmt: skip


def best_configs(res: dict) -> dict:
    """Per preset, the launch config with the lowest summed time over the variant contexts."""
    by: dict = {}
    for r in res.get("variants", []):
        if r.get("ablate"):  # timing-only rows (results wrong) never choose a config
            continue
        cfg = tuple(r[k] for k in CONFIG_KEYS)
        by.setdefault(r["preset"], {}).setdefault(cfg, []).append(r["ms_graph"])
    best = {}
    for preset, cfgs in by.items():
        n = max(len(v) for v in cfgs.values())
        cfg = min((c for c, v in cfgs.items() if len(v) == n), key=lambda c: sum(cfgs[c]))
        best[preset] = dict(zip(CONFIG_KEYS, cfg))
    return best


def section_time(
    res: dict, contexts, batches, with_ref: bool, save=lambda: None, presets=None, configs=None
) -> None:
    import torch.nn.functional as F

    rows = res.setdefault("time", [])  # filled row by row, saved after each (a run cut short keeps them)
    copy_bw = res.get("copy", {}).get("GBps")
    # launch configs per preset: --time-configs, else the fastest of this run's variants, else defaults
    configs = configs or best_configs(res)
    res["time_configs"] = configs
    print("time section launch configs:", configs or "defaults", flush=True)
    for ctx in contexts:
        for batch in batches:
            q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            dense_bytes = 2 * k.numel() * 2
            sdpa_ms = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            del k, v
            for preset in presets or PRESETS:
                t0 = time.time()
                st = llama_state(ctx, batch, preset)
                build_s = time.time() - t0
                nbytes = state_bytes(st)
                out = torch.empty_like(q)
                cfg = {k: v for k, v in configs.get(preset, {}).items() if k != "ablate"}
                ms = bench(lambda st=st, out=out, q=q, cfg=cfg: decode_attention(q, st, out=out, **cfg))
                try:
                    ms_graph = bench(
                        lambda st=st, out=out, q=q, cfg=cfg: decode_attention(q, st, out=out, **cfg),
                        graph=True,
                    )
                except Exception as exc:
                    ms_graph = float("nan")
                    print("graph capture failed:", repr(exc)[:300])
                torch.cuda.synchronize()
                t_host = time.perf_counter()
                for _ in range(200):
                    decode_attention(q, st, out=out, **cfg)
                host_us = (time.perf_counter() - t_host) / 200 * 1e6
                # one caching-allocator round trip, for scale
                t_host = time.perf_counter()
                for _ in range(200):
                    torch.empty(1, device="cuda")
                alloc_us = (time.perf_counter() - t_host) / 200 * 1e6
                torch.cuda.synchronize()
                ref_ms = float("nan")
                err = float("nan")
                if with_ref and ctx <= 32768:
                    ref = spectral_attention(q, st)
                    err = rel(decode_attention(q, st), ref)
                    ref_ms = bench(lambda st=st, q=q: spectral_attention(q, st))
                best = min(ms, ms_graph) if not math.isnan(ms_graph) else ms
                row = {
                    "ctx": ctx, "batch": batch, "preset": preset, "sdpa_ms": sdpa_ms, "kernel_ms": ms,
                    "kernel_graph_ms": ms_graph, "torch_ref_ms": ref_ms, "bytes": nbytes,
                    "dense_bytes": dense_bytes, "byte_ratio": dense_bytes / nbytes,
                    "GBps": nbytes / best / 1e6, "GBps_eager": nbytes / ms / 1e6,
                    "frac_copy": (nbytes / best / 1e6) / copy_bw if copy_bw else None,
                    "speedup_vs_sdpa": sdpa_ms / best, "host_us_per_call": host_us, "alloc_us": alloc_us, "config": cfg, "rel_err_vs_ref": err, "build_s": build_s,
                }  # fmt: skip
                rows.append(row)
                save()
                print(
                    f"time ctx={ctx:6d} B={batch} {preset:10s} sdpa {sdpa_ms:.4f} ms | kernel {ms:.4f} ms "
                    f"(graph {ms_graph:.4f}) {row['GBps']:.0f} GB/s = {row['frac_copy'] or 0:.0%} copy | "
                    f"x{row['speedup_vs_sdpa']:.2f} vs sdpa | host {host_us:.0f} us/call | ref {ref_ms:.3f} ms err {err:.1e}",
                    flush=True,
                )
                del st
                torch.cuda.empty_cache()


def section_variants(res: dict, cells, grid: dict, extra: list, save=lambda: None, presets=None) -> None:
    """Graph-replay time of every launch config in ``grid`` (lists per CONFIG_KEYS entry) and of
    each dict in ``extra`` (CONFIG_KEYS entries it leaves out: the grid's first value) at each
    ``(context, batch)`` cell, beside SDPA on the dense K/V of that cell (``sdpa_ms``, eager like the
    ``time`` section's); each config's output is compared with the default launch's (``rel_vs_default``)."""
    import torch.nn.functional as F

    grid = {**grid, "ablate": grid.get("ablate", [None])}
    configs = [dict(zip(CONFIG_KEYS, v)) for v in itertools.product(*(grid[k] for k in CONFIG_KEYS))]
    configs += [{k: e.get(k, grid[k][0]) for k in CONFIG_KEYS} for e in extra]
    rows = res["variants"] = []  # saved after each row: a run cut short keeps what it measured
    for ctx, batch in cells:
        q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        sdpa_ms = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        del k, v
        print(f"variant ctx={ctx} B={batch} sdpa {sdpa_ms:.4f} ms", flush=True)
        for preset in presets or PRESETS:
            st = llama_state(ctx, batch, preset)
            nbytes = state_bytes(st)
            out = torch.empty_like(q)
            ref = decode_attention(q, st).float()
            for cfg in configs:
                try:
                    # "ablate": timing-only bits of tile work left out (ABLATE_BITS; results wrong)
                    bits = cfg.get("ablate") or 0
                    launch_cfg = {k: v for k, v in cfg.items() if k != "ablate"}
                    fn = functools.partial(decode_attention, q, st, out=out, **launch_cfg)
                    out.fill_(float("nan"))
                    with ablate(bits):
                        plan = launch_plan(fn)
                        err = rel(out, ref)
                        ms = bench(fn, graph=True)
                except Exception as exc:
                    print("variant failed", cfg, repr(exc)[:300], flush=True)
                    continue
                rows.append({"ctx": ctx, "batch": batch, "preset": preset, **cfg, "ms_graph": ms,
                             "sdpa_ms": sdpa_ms, "GBps": nbytes / ms / 1e6, "rel_vs_default": err,
                             "plan": plan})  # fmt: skip
                save()
                changed = {k: cfg[k] for k in CONFIG_KEYS if len(grid[k]) > 1 or cfg[k] != grid[k][0]}
                print(f"variant ctx={ctx} B={batch} {preset:10s} {changed or cfg} graph {ms:.4f} ms "
                      f"(sdpa {sdpa_ms:.4f}, x{sdpa_ms / ms:.2f}) {nbytes / ms / 1e6:.0f} GB/s err {err:.1e} "
                      f"plan {plan}", flush=True)  # fmt: skip
            best = sorted(
                [r for r in rows if r["ctx"] == ctx and r["batch"] == batch and r["preset"] == preset],
                key=lambda r: r["ms_graph"],
            )
            for r in best[:5]:
                print(f"best ctx={ctx} B={batch} {preset}: " + " ".join(f"{k}={r[k]}" for k in CONFIG_KEYS)
                      + f" {r['ms_graph']:.4f} ms (sdpa {r['sdpa_ms']:.4f}) {r['GBps']:.0f} GB/s "
                      f"err {r['rel_vs_default']:.1e}", flush=True)  # fmt: skip
            del st
            torch.cuda.empty_cache()


def launch_plan(fn) -> dict:
    """Run ``fn`` (a decode_attention call) once and report the split launch it made: grid (programs
    per (batch row, KV head)), block parts and token tile actually used (the automatic choices)."""
    import spectralcache.attention.triton.decode as dec

    seen: dict = {}
    launch = dec._launch_split

    def record(grid, args, constexprs, options, device):
        seen.update(grid=list(grid), block_parts=constexprs["BLOCK_PARTS"], block_t=constexprs["BLOCK_T"])
        return launch(grid, args, constexprs, options, device)

    dec._launch_split = record
    try:
        fn()
    finally:
        dec._launch_split = launch
    return seen


def _json_arg(text: str):
    """A JSON command-line value, or ``@path``: the JSON in that file."""
    return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)


def _grid_values(text: str) -> list:
    """A comma list of option values: "none" (the option's default), integers, or words (e.g. "keys")."""
    return [None if v == "none" else int(v) if v.lstrip("-").isdigit() else v for v in text.split(",")]


def _compile_sm90(kernel, args: list, constexprs: dict, options: dict):
    """Compile ``kernel`` for sm_90a without a GPU (Triton's compiler and bundled ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = {**constexprs, **options, "debug": False}
    bound, spec, opts = binder(*args, **kw)
    opts, sig, cex, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
    return compile(ASTSource(kernel, sig, cex, attrs), target=target, options=opts.__dict__)


def _sass_facts(compiled, maxnreg) -> dict:
    """Registers / spills (``ptxas -v`` on the kernel's PTX), shared memory, SASS instruction counts,
    and the instruction count of each innermost loop (a backward branch to a label) with its
    tensor-core (HMMA) count -- the cold tile loop is the longest one with HMMAs."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        Path(ptx).write_text(compiled.asm["ptx"])
        Path(cubin).write_bytes(compiled.asm["cubin"])
        cap = [f"-maxrregcount={maxnreg}"] if maxnreg else []
        info = subprocess.run([f"{tools}/ptxas", "-arch=sm_90a", "-v", *cap, ptx, "-o", os.path.join(d, "k.o")],
                              capture_output=True, text=True)  # fmt: skip
        sass = subprocess.run([f"{tools}/nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    text = info.stdout + info.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    ops: collections.Counter = collections.Counter()
    labels: dict = {}
    loops = []
    full_ops: list = []  # (opcode with modifiers, branch target label or None) per instruction
    n = 0
    for line in sass.splitlines():
        if re.match(r"^\.L_x_\d+:", line):
            labels[line.rstrip(":")] = n
            continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op = m.group(1).split(".")[0]
        ops[op] += 1
        n += 1
        b = re.search(r"BRA\S* `\((\.L_x_\d+)\)", line)
        full_ops.append((m.group(1), b.group(1) if b else None))
        if b and b.group(1) in labels:
            loops.append((labels[b.group(1)], n))
    hmma = [i for i, line in enumerate(x for x in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/", x))
            if "HMMA" in line]  # fmt: skip
    inner = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops)]
    loop_facts = sorted(((b - a, sum(a <= i < b for i in hmma)) for a, b in inner), reverse=True)
    tile = _tile_loop_facts(full_ops, labels, inner, hmma)
    return {
        "registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None,
        "shared_bytes": compiled.metadata.shared, "sass_instructions": n,
        "innermost_loops": [{"instructions": a, "hmma": h} for a, h in loop_facts[:4]],
        "top_ops": dict(ops.most_common(12)), "tile_loop": tile,
    }  # fmt: skip


def _tile_loop_facts(full_ops: list, labels: dict, inner: list, hmma: list) -> dict:
    """The tile loop (the innermost loop with the most HMMAs) without its longest forward-skipped
    region (the flat loop's once-per-block setup branch): instructions a thread issues per steady-state
    tile, barriers (BAR), tensor-core ops (HMMA), single-byte shared-memory loads (LDS.U8, the value
    tile's B operand), register copies (IMAD.MOV: the padded query-row A operands)."""
    if not inner:
        return {}
    a, b = max(inner, key=lambda ab: sum(ab[0] <= i < ab[1] for i in hmma))
    skips = [(i + 1, labels[t]) for i in range(a, b) for t in [full_ops[i][1]]
             if t in labels and i < labels[t] <= b]  # fmt: skip
    lo, hi = max(skips, key=lambda s: s[1] - s[0]) if skips else (0, 0)
    steady = [full_ops[i][0] for i in range(a, b) if not lo <= i < hi]
    return {
        "instructions": b - a, "setup_branch": hi - lo, "steady": len(steady),
        "BAR": sum(o.startswith("BAR") for o in steady), "HMMA": sum(o.startswith("HMMA") for o in steady),
        "LDS.U8": sum(o.startswith("LDS.U8") for o in steady),
        "IMAD.MOV": sum(o.startswith("IMAD.MOV") for o in steady),
        "ops": dict(__import__("collections").Counter(o.split(".")[0] for o in steady).most_common(24)),
    }  # fmt: skip


def section_sass(res: dict, configs: list, ctx: int = 8192) -> None:
    """CPU only (no GPU): compile the split kernel of each launch config for sm_90a and read its
    registers, spills, shared memory and SASS (how the v6 changes were chosen before any GPU time).

    The launch's arguments and constexprs come from a real ``decode_attention`` call on CPU tensors
    at the Llama shape with the two launches replaced by a recorder. That call plans for 2 resident
    programs (no GPU to count SMs): one program reads the whole context, so the automatic choices that
    depend on the tiles per program (``num_stages``, ``outlier_cols``) are the long-program ones -- name
    them in the config to see a batch-1 plan of the card (2 stages, ``outlier_cols`` off).
    ``"ablate"`` in a config compiles those timing-only ABLATE bits."""
    import spectralcache.attention.triton.decode as dec

    rows = []
    for cfg in configs:
        preset = cfg.get("preset", "default")
        launch = {k: v for k, v in cfg.items() if k not in ("preset", "ablate")}
        st = llama_state(ctx, 1, preset, device="cpu")
        q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
        seen: dict = {}
        saved = dec._launch_split, dec._COMBINE, dec._INTERPRET
        dec._launch_split = lambda grid, args, constexprs, options, device, seen=seen: seen.update(
            args=list(args), constexprs=dict(constexprs), options=dict(options))  # fmt: skip
        dec._COMBINE = lambda *a, **k: None
        dec._INTERPRET = True  # let decode_attention take CPU tensors (nothing runs)
        try:
            dec.decode_attention(q, st, **launch)
        finally:
            dec._launch_split, dec._COMBINE, dec._INTERPRET = saved
        options = dict(seen["options"])
        maxnreg = launch.get("maxnreg", -1)
        if maxnreg == -1:
            maxnreg = 128 if PRESETS[preset][3] == 4 else None
        if maxnreg:
            options["maxnreg"] = maxnreg  # decode_attention leaves the cap out for CPU tensors
        constexprs = {**seen["constexprs"], **({"ABLATE": cfg["ablate"]} if cfg.get("ablate") else {})}
        compiled = _compile_sm90(dec.spectral_decode_split_kernel, seen["args"], constexprs, options)
        row = {"config": cfg, **_sass_facts(compiled, maxnreg)}
        rows.append(row)
        loops = ", ".join(f"{x['instructions']} ({x['hmma']} HMMA)" for x in row["innermost_loops"][:2])
        tl_ = row["tile_loop"]
        print(f"sass {cfg}: {row['registers']} registers, spills {row['spill_bytes']} B, shared "
              f"{row['shared_bytes']} B, {row['sass_instructions']} instructions; innermost loops {loops}; "
              f"tile loop steady state {tl_.get('steady')} instructions (setup branch {tl_.get('setup_branch')}), "
              f"BAR {tl_.get('BAR')} HMMA {tl_.get('HMMA')} LDS.U8 {tl_.get('LDS.U8')} IMAD.MOV {tl_.get('IMAD.MOV')}",
              flush=True)  # fmt: skip
    res["sass"] = rows


def _stream_read_kernel():
    """A Triton kernel that only reads: program (bh, s) XORs ``per`` int32 words of each of two
    flat arrays from word ``bh * stride + s * per`` on, ``BLOCK`` words a step (16-byte loads,
    pipelined), and stores one word. Built on first use (Triton is imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def stream_read(a_ptr, b_ptr, stride_a, stride_b, per_a, per_b, out_ptr, BLOCK: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        acc = tl.zeros((BLOCK,), dtype=tl.int32)
        offs = tl.arange(0, BLOCK)
        a0 = bh.to(tl.int64) * stride_a + sp * per_a
        for i in tl.range(0, per_a, BLOCK):
            acc ^= tl.load(
                a_ptr + a0 + i + offs, mask=(i + offs < per_a) & (sp * per_a + i + offs < stride_a), other=0
            )
        b0 = bh.to(tl.int64) * stride_b + sp * per_b
        for i in tl.range(0, per_b, BLOCK):
            acc ^= tl.load(
                b_ptr + b0 + i + offs, mask=(i + offs < per_b) & (sp * per_b + i + offs < stride_b), other=0
            )
        tl.store(out_ptr + bh * tl.num_programs(1) + sp, tl.xor_sum(acc, axis=0))

    return stream_read


def section_roofline(res: dict, cells, presets, save=lambda: None) -> None:
    """Where the bandwidth ceiling is for the kernel's grid: a read-only Triton kernel streams the
    cold tier's key and value coefficient bytes (the bulk of what the decode kernel reads) with the
    decode kernel's grid of (batch row x KV head, cold programs), and with 2x / 4x / 1/2x the
    programs; graph-replay ms and GB/s on those bytes, beside the decode kernel itself (same state).
    Says whether the grid itself (8 KV heads x ~66 programs at batch 1) can reach the copy rate."""
    kern = _stream_read_kernel()
    rows = res.setdefault("roofline", [])
    for ctx, batch in cells:
        for preset in presets:
            st = llama_state(ctx, batch, preset)
            c = st.cold
            q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            out = torch.empty_like(q)
            fn = functools.partial(decode_attention, q, st, out=out)
            plan = launch_plan(fn)
            kernel_ms = bench(fn, graph=True)
            nbytes = state_bytes(st)
            n_bh = batch * 8
            ka = c.key_coeffs.contiguous().view(torch.int32).reshape(n_bh, -1)
            va = c.value_coeffs.contiguous().view(torch.int32).reshape(n_bh, -1)
            coeff_bytes = (ka.numel() + va.numel()) * 4
            base_s = plan["grid"][1]  # the decode kernel's programs per (batch row, KV head)
            for mult in (0.5, 1, 2, 4):
                s_prog = max(1, int(base_s * mult))
                per_a = -(-ka.shape[1] // s_prog)
                per_b = -(-va.shape[1] // s_prog)
                o = torch.empty(n_bh * s_prog, dtype=torch.int32, device="cuda")
                for warps, block in ((4, 1024), (8, 2048)):

                    def run(o=o, s_prog=s_prog, per_a=per_a, per_b=per_b, warps=warps, block=block, ka=ka, va=va,
                            n_bh=n_bh):  # fmt: skip
                        kern[(n_bh, s_prog)](ka, va, ka.shape[1], va.shape[1], per_a, per_b, o,
                                             BLOCK=block, num_warps=warps)  # fmt: skip

                    ms = bench(run, graph=True)
                    row = {"ctx": ctx, "batch": batch, "preset": preset, "programs_per_bh": s_prog,
                           "num_warps": warps, "block": block, "stream_ms": ms,
                           "stream_GBps": coeff_bytes / ms / 1e6, "coeff_bytes": coeff_bytes,
                           "kernel_ms": kernel_ms, "kernel_plan": plan, "state_bytes": nbytes,
                           "kernel_GBps": nbytes / kernel_ms / 1e6}  # fmt: skip
                    rows.append(row)
                    save()  # after every row: a run cut short keeps what it measured
                    print(f"roofline ctx={ctx} B={batch} {preset} programs/bh {s_prog} warps {warps}: stream "
                          f"{ms:.4f} ms {row['stream_GBps']:.0f} GB/s on {coeff_bytes / 1e6:.1f} MB | kernel "
                          f"{kernel_ms:.4f} ms {row['kernel_GBps']:.0f} GB/s on {nbytes / 1e6:.1f} MB plan {plan}",
                          flush=True)  # fmt: skip
            del st
            torch.cuda.empty_cache()


def _cells(spec: str) -> list[tuple[int, int]]:
    """``--variant-cells`` ``"CTXxBATCH,..."`` -> ``[(ctx, batch), ...]``."""
    return [tuple(int(x) for x in c.split("x")) for c in spec.split(",")]


def section_host(res: dict) -> None:
    """Host cost of one eager call, split (prep / split launch / combine launch, fast launcher vs
    Triton's path): benchmarks/decode_host_overhead.py's ``launch`` section, stored under ``host``."""
    from decode_host_overhead import section_launch

    out: dict = {}
    section_launch(out)
    res["host"] = out["launch"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", default="copy,check,time,variants")
    p.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--variant-contexts", default="32768,131072")
    p.add_argument(
        "--variant-cells",
        default="",
        help="comma list of CONTEXTxBATCH cells the variants run (e.g. 4096x1,4096x8; default: "
        "--variant-contexts at batch 1)",
    )
    p.add_argument(
        "--variant-presets",
        default="default,aggressive,channel",
        help="comma list of PRESETS the variants run (channel_zp: name it)",
    )
    p.add_argument(
        "--time-presets", default=",".join(PRESETS), help="comma list of PRESETS the time section runs"
    )
    p.add_argument("--no-ref", action="store_true")
    p.add_argument(
        "--time-configs", default="{}", help="JSON {preset: launch options} (or @file) the time section uses"
    )
    # variant grid: comma lists ("none" = the option left to its default)
    p.add_argument("--v-block-t", default="128,256")
    p.add_argument("--v-num-warps", default="4")
    p.add_argument("--v-maxnreg", default="none,128,168")
    p.add_argument("--v-programs-per-sm", default="4,8")
    p.add_argument("--v-block-stages", default="0,2")
    p.add_argument("--v-outlier-split", default="0,1")
    p.add_argument("--v-dequant-asm", default="0,1")
    p.add_argument(
        "--sass-configs",
        default='[{"preset": "default"}, {"preset": "aggressive"}]',
        help="JSON list (or @file) of launch configs (plus 'preset') the CPU-only sass section compiles",
    )
    p.add_argument("--v-min-rows", default="16,1")
    p.add_argument("--v-num-stages", default="none")
    p.add_argument("--v-exact-spread", default="0")
    p.add_argument("--v-int4-bytes", default="32")
    p.add_argument("--v-int4-row-stride", default="0")
    p.add_argument("--v-int4-pad", default="1")
    p.add_argument("--v-blocks-per-split", default="none")
    # block parts: P programs per cold block (1: whole blocks, none: automatic) and the automatic
    # choice's cap (each part at least this many tiles; none: decode_attention's default, 2)
    p.add_argument("--v-block-parts", default="none")
    p.add_argument("--v-block-parts-min-tiles", default="none")
    # packed int4 identity rows: nibble-split dots (none: automatic), PTX widening, deferred softmax sums
    p.add_argument("--v-nibble-split", default="none")
    p.add_argument("--v-int4-asm", default="none")
    p.add_argument("--v-defer-den", default="1")
    p.add_argument("--v-flat-tiles", default="none")
    # stop 20: raw key nibbles (offset removed per block; off by default)
    p.add_argument("--v-key-raw", default="none")
    # stop 21: the flat loop's outlier mask per tile column (none: automatic)
    p.add_argument("--v-outlier-cols", default="none")
    # stop 21: timing-only ablations (a bit set, ABLATE_BITS; none / 0: off). Results are wrong.
    p.add_argument("--v-ablate", default="none")
    # stop 22: programmatic dependent launch (pdl), rows per outlier / exact program (short_rows)
    p.add_argument("--v-pdl", default="none")
    p.add_argument("--v-short-rows", default="none")
    p.add_argument("--v-extra", default="[]", help="JSON list (or @file) of extra variant configs")
    p.add_argument(
        "--check-configs", default="[{}]", help="JSON list (or @file) of launch options the check runs"
    )
    p.add_argument("--check-modes", default="", help="comma list of check mode names (default: all / quick)")
    p.add_argument("--check-block-size", type=int, default=128, help="block size of the check states")
    p.add_argument(
        "--check-value-t",
        action="store_true",
        help="check states with their value bytes stored tokens-contiguous (value_tokens_contiguous)",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    res: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (sass section only)",
        "torch": torch.__version__, "triton": triton.__version__,
    }  # fmt: skip
    print(res, flush=True)
    sections = args.sections.split(",")
    t0 = time.time()

    def save() -> None:
        (args.out / "kernel_dev.json").write_text(json.dumps(res, indent=1))

    for name in sections:
        try:
            if name == "copy":
                section_copy(res)
            elif name in ("check", "quickcheck"):
                section_check(res, quick=name == "quickcheck", configs=_json_arg(args.check_configs),
                              only=[m for m in args.check_modes.split(",") if m],
                              block_size=args.check_block_size, value_t=args.check_value_t)  # fmt: skip
            elif name == "time":
                section_time(res, [int(c) for c in args.contexts.split(",")],
                             [int(b) for b in args.batches.split(",")], not args.no_ref, save,
                             args.time_presets.split(","), _json_arg(args.time_configs))  # fmt: skip
            elif name == "host":
                section_host(res)
            elif name == "roofline":
                section_roofline(
                    res, _cells(args.variant_cells or "131072x1"), args.variant_presets.split(","), save
                )
            elif name == "sass":
                section_sass(res, _json_arg(args.sass_configs))
            elif name == "variants":
                grid = {k: _grid_values(getattr(args, "v_" + k)) for k in CONFIG_KEYS}
                res["variant_grid"] = grid
                if args.variant_cells:
                    cells = _cells(args.variant_cells)
                else:
                    cells = [(int(c), 1) for c in args.variant_contexts.split(",")]
                section_variants(
                    res,
                    cells,
                    grid,
                    _json_arg(args.v_extra),
                    save,
                    args.variant_presets.split(","),
                )
        except Exception:
            traceback.print_exc()
            res.setdefault("errors", []).append(f"{name}: {traceback.format_exc()[-800:]}")
        save()
        print(f"[{name} done at {time.time() - t0:.0f} s]", flush=True)
    checks = res.get("check", [])
    print(f"checks: {sum(r['ok'] for r in checks)}/{len(checks)} ok")
    for r in res.get("variants", []):
        pinned = res.get("variant_grid", {})
        cfg = (
            " ".join(f"{k}={r[k]}" for k in CONFIG_KEYS if k not in pinned or r[k] != pinned[k][0])
            or "pinned"
        )
        print(f"variant {r['ctx']:6d} B{r['batch']} {r['preset']:10s} {cfg} graph {r['ms_graph']:.4f} "
              f"sdpa {r['sdpa_ms']:.4f} x{r['sdpa_ms'] / r['ms_graph']:.2f} plan {r.get('plan')}")  # fmt: skip
    for r in res.get("time", []):
        print(f"{r['ctx']:6d} B{r['batch']} {r['preset']:10s} sdpa {r['sdpa_ms']:.4f} kernel {r['kernel_ms']:.4f} "
              f"graph {r['kernel_graph_ms']:.4f} ms {r['GBps']:5.0f} GB/s ({r['frac_copy'] or 0:.0%}) "
              f"x{r['speedup_vs_sdpa']:.2f} bytes/{r['byte_ratio']:.1f}")  # fmt: skip
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
