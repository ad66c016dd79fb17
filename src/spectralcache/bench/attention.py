"""Decode-attention benchmark: one layer, one query token, dense SDPA vs the compressed cache.

One attention layer at the Llama-3.1-8B attention shape (32 query heads, 8 KV heads,
head_dim 128; bf16 on CUDA), one query token, for each context ``T``, batch and preset:

* ``sdpa``: transformers' SDPA attention (what a ``DynamicCache`` model runs) over the dense
  K/V; it must read ``K + V`` bytes.
* ``sdpa_graph``: the same call captured in a CUDA graph and timed as graph replays (CUDA only;
  "n/a" elsewhere).
* ``kernel``: ``spectralcache.attention.triton.decode_attention`` over the layer's
  ``SpectralLayerState`` (imported lazily; "n/a (reason)" when it is missing or raises).
* ``kernel_graph``: the kernel call captured in a CUDA graph, timed as replays -- how a model
  decodes under :class:`spectralcache.GraphedDecoder`, without the host's per-call launch cost,
  which at one layer and one token is longer than the kernel itself (CUDA only).
* ``torch``: the torch reference ``spectral_attention`` over the same state.
* ``dispatch``: ``spectralcache.attention.interface.attend`` (the entry point that picks the
  kernel or the reference) over the same state, where it exists.
* ``step``: one decode step of the layer as a model runs it: ``SpectralCache.update`` of one
  token, then the registered ``"spectral"`` attention function. The cache grows by one token
  per timed call, so this row includes the update and is timed over a fixed number of steps.

The state is built by a real :class:`SpectralCache` (one compressed layer) filled through its
public ``update`` with random K/V of a decaying spectrum (like real keys), so the tiers,
block counts and byte sizes are the ones the cache produces. Bytes read by a spectral method
are summed over the tensors of ``layer.state()`` (what a kernel must read: coefficients,
scales, bases, outliers and indices, landmarks, hot buffer, the current token); bytes held are
the layer's storage (``memory_report``). Achieved GB/s = bytes read / median time, compared
with a device-to-device copy measured in the same run (bytes read + written).

Timing: see :mod:`spectralcache.bench.common` (median of ``triton.testing.do_bench`` on CUDA,
L2 cleared before every call; inputs additionally rotate among copies while one copy's working
set would fit in L2; a graphed method captures one graph per copy and replays them in turn).
``speedup_vs_sdpa`` of a spectral row divides the **faster** of the two SDPA rows (eager and
graphed) by that row's time, so a graphed kernel is never compared with an eager SDPA that pays
the launch cost the graph avoids. Output: ``bench_attention_<tag>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from spectralcache.config import SpectralConfig

from spectralcache.bench.common import (
    device_from_name,
    dtype_from_name,
    measure_copy_bandwidth,
    parse_int_list,
    progress,
    render_saved_results,
    run_metadata,
    sync,
    time_fn,
)

__all__ = [
    "METHODS",
    "build_case",
    "clone_state",
    "configure",
    "load_kernel",
    "main",
    "markdown",
    "random_kv",
    "run",
    "state_bytes",
]

METHODS = ("sdpa", "sdpa_graph", "kernel", "kernel_graph", "torch", "dispatch", "step")
GRAPHED = ("sdpa_graph", "kernel_graph")
NO_GRAPH = "CUDA graphs need a CUDA device"
CUDA_CONTEXTS = "4096,16384,65536,131072"
CPU_CONTEXTS = "1024,4096"


# ----------------------------------------------------------------------------- inputs


def random_kv(
    batch: int,
    kv_heads: int,
    tokens: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys / values ``[B, H, T, D]`` with a decaying spectrum (keys faster than values).

    Real keys are far from white noise (a few directions dominate); a flat spectrum would make
    every block look incompressible and the outlier tier meaningless. Built one batch row at a
    time so the float32 temporaries stay small at 128K x batch 8.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    mix_k = torch.randn(head_dim, head_dim, generator=g) * torch.logspace(0, -2, head_dim)[:, None]
    mix_v = torch.randn(head_dim, head_dim, generator=g) * torch.logspace(0, -1, head_dim)[:, None]
    mix_k, mix_v = mix_k.to(device), mix_v.to(device)
    keys = torch.empty(batch, kv_heads, tokens, head_dim, dtype=dtype, device=device)
    values = torch.empty_like(keys)
    dg = torch.Generator(device=device).manual_seed(seed + 1)
    for b in range(batch):
        for out, mix in ((keys, mix_k), (values, mix_v)):
            x = torch.randn(kv_heads, tokens, head_dim, generator=dg, device=device)
            out[b] = (x @ mix).to(dtype)
    return keys, values


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor field of a (nested) dataclass, with dotted names."""
    found: list[tuple[str, torch.Tensor]] = []
    if not dataclasses.is_dataclass(obj):
        return found
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            found.append((prefix + f.name, value))
        elif dataclasses.is_dataclass(value):
            found.extend(_tensors(value, prefix + f.name + "."))
    return found


def state_bytes(state: Any) -> dict[str, int]:
    """Bytes of each tensor of a ``SpectralLayerState`` (logical size of the view, i.e. what a
    kernel must read, not the capacity behind it) and their ``total``."""
    out = {name: t.numel() * t.element_size() for name, t in _tensors(state)}
    out["total"] = sum(out.values())
    return out


def _clone_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` copied into its own storage with the same strides -- also where ``x`` is a view that
    skips memory (a capacity's first rows, value rows padded to 16 tokens), which ``Tensor.clone``
    would make contiguous: the decode kernel's speed depends on the layout (stop 23: cloned 501-token
    blocks lost their tokens-contiguous value rows, and the bench timed 4K batch 1 at 0.0254 ms where
    the cache's own state takes 0.0157)."""
    if x.numel() == 0 or any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape)):
        return x.clone()  # broadcast views (stride 0) cannot be written through
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return out.copy_(x)


def clone_state(state: Any) -> Any:
    """A deep copy of a (nested) state dataclass with every tensor copied (own storage, the same
    strides: :func:`_clone_layout`)."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = _clone_layout(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = clone_state(value)
    return dataclasses.replace(state, **changes)


def _held_bytes(cache: Any) -> int:
    """Bytes the compressed layer holds (its storage, capacity included), from the cache's report."""
    return int(cache.memory_report()["compressed_layers"]["held_bytes"])


def _llama_attention_config(q_heads: int, kv_heads: int, head_dim: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=16,
        hidden_size=q_heads * head_dim,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )


class _AttentionModule(torch.nn.Module):
    """What transformers' attention functions read from the calling module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.layer_idx = 0
        self.training = False


@dataclasses.dataclass
class Case:
    """One (context, batch, preset): the filled cache, its state with the decode token as the
    current chunk, the dense K/V a DynamicCache would hold, and the query."""

    cache: Any
    state: Any
    keys: torch.Tensor
    values: torch.Tensor
    query: torch.Tensor
    fill_s: float
    compress_s: float


def build_case(
    preset: str | SpectralConfig,
    batch: int,
    tokens: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Case:
    """Fill a one-layer SpectralCache with ``tokens - 1`` tokens (a prefill), then add the decode
    token, so ``state()`` is exactly what attention reads at a decode step. ``preset``: a preset
    name, or the config itself."""
    from spectralcache.cache.cache import SpectralCache
    from spectralcache.config import SpectralConfig

    keys, values = keys_values or random_kv(batch, kv_heads, tokens, head_dim, dtype, device, seed)
    cfg = preset if isinstance(preset, SpectralConfig) else SpectralConfig.from_preset(preset)
    cache = SpectralCache(_llama_attention_config(q_heads, kv_heads, head_dim), cfg)
    layer = cache.layers[0]
    sync(device)
    t0 = time.perf_counter()
    cache.update(keys[:, :, : tokens - 1], values[:, :, : tokens - 1], 0)
    sync(device)
    fill_s = time.perf_counter() - t0
    layer.release_chunk()  # the prefill's attention would have read it
    # The decode token's K/V as a model makes them: fresh tensors. (A view into the dense K/V would
    # pin their whole storage in the state's chunk, and the held bytes would count it.)
    cache.update(keys[:, :, tokens - 1 :].clone(), values[:, :, tokens - 1 :].clone(), 0)
    state = layer.state()
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    query = torch.randn(batch, q_heads, 1, head_dim, generator=g).to(device=device, dtype=dtype)
    compress_s = sum(float(s) for _, s in layer.compression_calls)
    return Case(cache, state, keys, values, query, fill_s, compress_s)


def load_kernel() -> tuple[Callable[..., torch.Tensor] | None, str]:
    """The Triton decode kernel, or (None, reason) when it cannot be imported."""
    try:
        from spectralcache.attention.triton import decode_attention  # type: ignore[attr-defined]
    except Exception as err:  # any import failure makes the column n/a
        return None, f"{type(err).__name__}: {err}"
    return decode_attention, ""


def load_dispatch() -> tuple[Callable[..., torch.Tensor] | None, str]:
    """The attention entry point that chooses kernel or reference (``attention.interface.attend``),
    called as ``attend(query, state, mask, scaling, softcap)``; (None, reason) where it is missing."""
    try:
        from spectralcache.attention import interface
    except Exception as err:  # any import failure makes the column n/a
        return None, f"{type(err).__name__}: {err}"
    fn = getattr(interface, "attend", None)
    if fn is None:
        return None, "spectralcache.attention.interface has no 'attend' dispatch function"

    def call(query, state, mask, scaling, softcap):
        return fn(query, state, mask, scaling=scaling, softcap=softcap)

    return call, ""


# ----------------------------------------------------------------------------- measuring


def _rotation(working_set: int, l2_bytes: int | None, device: torch.device, limit: int = 8) -> int:
    """How many input copies to rotate among so the set of copies exceeds twice the L2."""
    if device.type != "cuda" or not l2_bytes or working_set <= 0:
        return 1
    return int(min(limit, max(1, math.ceil(2 * l2_bytes / working_set))))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64, out64 = ref.double(), out.double()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-30))


def _cycle(items: list[Any]) -> Callable[[], Any]:
    state = {"i": 0}

    def nxt() -> Any:
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return nxt


def graph_replayer(calls: list[Callable[[], Any]], dev: torch.device) -> tuple[Callable[[], None], list[Any]]:
    """One CUDA graph per call (each bound to its own input copy), replayed in turn, and the
    graphs' outputs (tensors in the graphs' memory pool, rewritten by every replay).

    Each call runs twice on a side stream first (Triton compiles, the allocator settles), as
    ``torch.cuda.graphs`` requires before capture; a call that cannot be captured raises here."""
    if dev.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), torch.no_grad():
        for call in calls:
            call()
            call()
    torch.cuda.current_stream(dev).wait_stream(side)
    graphs, outputs = [], []
    for call in calls:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            outputs.append(call())
        graphs.append(graph)
    nxt = _cycle(graphs)
    return (lambda: nxt().replay()), outputs


def _cycle_calls(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    nxt = _cycle(calls)
    return lambda: nxt()()


def _short(err: BaseException, limit: int = 600) -> str:
    """One line; a long message (a Triton CompilationError quotes source first) keeps its start and
    its end, where the actual error is."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit // 3] + " ... " + text[-(2 * limit) // 3 :]


def measure_case(
    args: argparse.Namespace,
    dev: torch.device,
    dtype: torch.dtype,
    tokens: int,
    batch: int,
    presets: list[str],
    methods: list[str],
    kernel: Callable[..., torch.Tensor] | None,
    kernel_reason: str,
    l2_bytes: int | None,
    copy_gbps: float | None,
    bar: Any,
) -> list[dict[str, Any]]:
    """Every method at one (context, batch); dense K/V shared by all presets."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from spectralcache.attention.reference import spectral_attention

    rows: list[dict[str, Any]] = []
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    scaling = d**-0.5
    module = _AttentionModule(hq // hkv)
    base = {"context": tokens, "batch": batch}
    keys, values = random_kv(batch, hkv, tokens, d, dtype, dev, args.seed)
    dense_bytes = 2 * keys.numel() * keys.element_size()
    timing_kw = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "cpu_repeats": args.repeats}

    def finish(row: dict[str, Any], t: dict[str, Any] | None, read: int | None) -> dict[str, Any]:
        row = {**base, **row}
        if t is not None:
            row.update(median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], calls=t["calls"])
            if read:
                row["bytes_read"] = read
                row["gbps"] = read / (t["median_ms"] * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbps"] / copy_gbps if copy_gbps else None
        rows.append(row)
        bar.update(1)
        bar.set_postfix_str(
            f"T={tokens} b={batch} {row.get('preset') or ''} {row['method']}: "
            + (f"{row['median_ms']:.3f} ms" if "median_ms" in row else row.get("status", ""))
        )
        return row

    sdpa_times: list[float] = []  # eager and graphed: spectral rows compare with the faster
    sdpa_query = torch.randn(batch, hq, 1, d, device=dev, dtype=dtype)
    for method in [m for m in ("sdpa", "sdpa_graph") if m in methods]:
        if method in GRAPHED and dev.type != "cuda":
            finish({"preset": None, "method": method, "status": "n/a", "reason": NO_GRAPH}, None, None)
            continue
        try:
            copies = _rotation(dense_bytes, l2_bytes, dev)
            kv = [(keys, values)] + [(keys.clone(), values.clone()) for _ in range(copies - 1)]
            calls = [
                lambda k=k, v=v: sdpa_attention_forward(module, sdpa_query, k, v, None, scaling=scaling)[0]
                for k, v in kv
            ]
            fn = graph_replayer(calls, dev)[0] if method in GRAPHED else _cycle_calls(calls)
            t = time_fn(fn, dev, **timing_kw)
            sdpa_times.append(t["median_ms"])
            finish({"preset": None, "method": method, "status": "ok", "copies": copies}, t, dense_bytes)
            del kv, calls, fn
        except Exception as err:  # reported in its column (a graph that cannot be captured, OOM), not fatal
            if args.verbose:
                traceback.print_exc()
            status = "oom" if isinstance(err, torch.cuda.OutOfMemoryError) else "n/a"
            finish({"preset": None, "method": method, "status": status, "reason": _short(err)}, None, None)
        _free(dev)
    sdpa_ms = min(sdpa_times) if sdpa_times else None

    spectral_methods = [m for m in methods if m not in ("sdpa", "sdpa_graph")]
    for preset in presets if spectral_methods else []:
        try:
            case = build_case(preset, batch, tokens, hq, hkv, d, dtype, dev, args.seed, (keys, values))
        except torch.cuda.OutOfMemoryError as err:
            for m in spectral_methods:
                finish({"preset": preset, "method": m, "status": "oom", "reason": _short(err)}, None, None)
            _free(dev)
            continue
        read = state_bytes(case.state)
        held = _held_bytes(case.cache)
        info = {
            "preset": preset,
            "bytes_read_by_tensor": read,
            "held_bytes": held,
            "dense_bytes": dense_bytes,
            "byte_ratio": dense_bytes / read["total"],
            "held_ratio": dense_bytes / held if held else None,
            "num_blocks": case.cache.layers[0].num_blocks,
            "fill_s": case.fill_s,
            "compress_s": case.compress_s,
        }
        copies = _rotation(read["total"], l2_bytes, dev)
        states = [case.state] + [clone_state(case.state) for _ in range(copies - 1)]
        ref_out = None
        if "torch" in spectral_methods:
            try:
                with torch.no_grad():
                    ref_out = spectral_attention(case.query, case.state, None, scaling=scaling)
                nxt = _cycle(states)
                t = time_fn(
                    lambda c=case, n=nxt: spectral_attention(c.query, n(), None, scaling=scaling),
                    dev,
                    **timing_kw,
                )
                row = finish({**info, "method": "torch", "status": "ok", "copies": copies}, t, read["total"])
                row["speedup_vs_sdpa"] = sdpa_ms / t["median_ms"] if sdpa_ms else None
            except torch.cuda.OutOfMemoryError as err:
                finish({**info, "method": "torch", "status": "oom", "reason": _short(err)}, None, None)
            _free(dev)
        callables: list[tuple[str, Callable[..., torch.Tensor] | None, str]] = []
        for name in [m for m in ("kernel", "kernel_graph") if m in spectral_methods]:
            if name in GRAPHED and dev.type != "cuda":
                callables.append((name, None, NO_GRAPH))
            elif kernel is not None and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                callables.append(
                    (name, None, "Triton kernels need CUDA (TRITON_INTERPRET=1 runs them on CPU, for tests)")
                )
            else:
                callables.append((name, kernel, kernel_reason))
        if "dispatch" in spectral_methods:
            callables.append(("dispatch", *load_dispatch()))
        for name, fn, why in callables:
            if fn is None:
                finish({**info, "method": name, "status": "n/a", "reason": why}, None, None)
                continue
            try:
                calls = [lambda c=case, st=st, f=fn: f(c.query, st, None, scaling, None) for st in states]
                if name in GRAPHED:  # the error is the graph's own output (states[0] is case.state)
                    timed, outputs = graph_replayer(calls, dev)
                    timed()
                    out = outputs[0]
                else:
                    timed = _cycle_calls(calls)
                    with torch.no_grad():
                        out = calls[0]()
                sync(dev)
                err = None if ref_out is None else _rel_err(out, ref_out)
                t = time_fn(timed, dev, **timing_kw)
                del calls, timed, out
                row = finish({**info, "method": name, "status": "ok", "copies": copies}, t, read["total"])
                row["rel_err_vs_torch"] = err
                row["speedup_vs_sdpa"] = sdpa_ms / t["median_ms"] if sdpa_ms else None
                if err is not None and not err < args.max_rel_err:
                    row["status"] = "wrong"
                    row["reason"] = f"relative error vs torch reference {err:.3g} >= {args.max_rel_err}"
            except Exception as err:  # a failing kernel is reported in its column, not fatal
                if args.verbose:
                    traceback.print_exc()
                finish({**info, "method": name, "status": "n/a", "reason": _short(err)}, None, None)
            _free(dev)
        states = []
        if "step" in spectral_methods:
            try:
                row = _measure_step(case, module, scaling, dev, args.step_repeats)
                t = {k: row.pop(k) for k in ("median_ms", "p20_ms", "p80_ms", "calls")}
                row = finish({**info, **row}, t, read["total"])
                row["speedup_vs_sdpa"] = sdpa_ms / t["median_ms"] if sdpa_ms else None
            except Exception as err:
                if args.verbose:
                    traceback.print_exc()
                status = "oom" if isinstance(err, torch.cuda.OutOfMemoryError) else "error"
                finish({**info, "method": "step", "status": status, "reason": _short(err)}, None, None)
        case = None
        _free(dev)
    keys = values = None
    _free(dev)
    return rows


def _measure_step(case: Case, module: Any, scaling: float, dev: torch.device, steps: int) -> dict[str, Any]:
    """Median of ``steps`` decode steps: cache.update(1 token) + the registered attention function."""
    from spectralcache.attention.interface import spectral_attention_forward

    cache, layer = case.cache, case.cache.layers[0]
    layer.release_chunk()  # the chunk of the state measured above was read
    b, hkv, _, d = case.keys.shape
    g = torch.Generator(device="cpu").manual_seed(11)
    new_k = (
        torch.randn(steps + 5, b, hkv, 1, d, generator=g) * case.keys[..., :1, :].float().std().cpu()
    ).to(dev, case.keys.dtype)
    new_v = torch.randn_like(new_k)
    times: list[float] = []
    with torch.no_grad():
        for i in range(steps + 5):
            sync(dev)
            t0 = time.perf_counter()
            k, v = cache.update(new_k[i], new_v[i], 0)
            out, _ = spectral_attention_forward(module, case.query, k, v, None, scaling=scaling)
            sync(dev)
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1e3)
            if layer.has_pending_chunk:
                raise RuntimeError("the 'spectral' attention function did not read the compressed layer")
    times.sort()
    q = _quantiles(times)
    return {
        "method": "step",
        "status": "ok",
        "median_ms": q[1],
        "p20_ms": q[0],
        "p80_ms": q[2],
        "calls": len(times),
        "timer": "host clock around update + attention, synchronized (the cache grows one token per step)",
        "out_finite": bool(torch.isfinite(out).all()),
    }


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    import statistics

    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=5)
    return q[0], statistics.median(times), q[3]


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- reporting


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    bw = meta.get("copy_bandwidth", {}).get("gbps")
    print(
        f"\ndecode attention, one layer {meta['shape']} {meta['dtype']} on {meta['device_name']}; "
        f"measured copy bandwidth {bw:.0f} GB/s"
        if bw
        else ""
    )
    header = (
        f"{'T':>7} {'B':>2} {'preset':<10} {'method':<12} {'median ms':>10} {'GB/s':>7} {'%copy':>6} "
        f"{'x SDPA':>7} {'bytes ratio':>11} {'rel err':>8}  status"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = f"{r['median_ms']:.4f}" if "median_ms" in r else "-"
        gbps = f"{r['gbps']:.0f}" if r.get("gbps") else "-"
        frac = f"{100 * r['frac_copy_bw']:.0f}%" if r.get("frac_copy_bw") else "-"
        sp = f"{r['speedup_vs_sdpa']:.2f}" if r.get("speedup_vs_sdpa") else "-"
        ratio = f"{r['byte_ratio']:.2f}x" if r.get("byte_ratio") else "-"
        err = f"{r['rel_err_vs_torch']:.1e}" if r.get("rel_err_vs_torch") is not None else "-"
        status = r.get("status", "")
        if status != "ok":
            status += f" ({r.get('reason', '')})"
        print(
            f"{r['context']:>7} {r['batch']:>2} {r.get('preset') or '-':<10} {r['method']:<12} {ms:>10} "
            f"{gbps:>7} {frac:>6} {sp:>7} {ratio:>11} {err:>8}  {status}"
        )


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written")
        return False
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), 2, figsize=(12, 4.2 * len(batches)), squeeze=False)
    series: dict[tuple[str, str | None], str] = {}
    styles = {"sdpa": "k-o", "sdpa_graph": "k:o", "kernel": "-s", "kernel_graph": ":s", "torch": "--^",
              "dispatch": "-.x", "step": ":d"}  # fmt: skip
    bw = meta.get("copy_bandwidth", {}).get("gbps")
    for i, b in enumerate(batches):
        for r in rows:
            if r["batch"] == b and r.get("status") == "ok" and "median_ms" in r:
                series.setdefault((r["method"], r.get("preset")), styles.get(r["method"], "-"))
        for (method, preset), style in sorted(series.items(), key=lambda x: (x[0][0], x[0][1] or "")):
            pts = sorted(
                (r["context"], r["median_ms"], r.get("gbps"))
                for r in rows
                if r["batch"] == b
                and r["method"] == method
                and r.get("preset") == preset
                and "median_ms" in r
                and r.get("status") == "ok"
            )
            if not pts:
                continue
            label = method if preset is None else f"{method} ({preset})"
            xs = [p[0] for p in pts]
            axes[i, 0].plot(xs, [p[1] for p in pts], style, label=label)
            axes[i, 1].plot(xs, [p[2] or float("nan") for p in pts], style, label=label)
        for j, ylabel in enumerate(("median ms (one layer, one token)", "achieved GB/s on bytes read")):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ctx = sorted({r["context"] for r in rows})
            ax.set_xticks(ctx, [f"{c / 1024:g}K" for c in ctx])
            ax.minorticks_off()
            ax.set_xlabel("context tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {b}")
            ax.grid(True, which="both", alpha=0.3)
        axes[i, 0].set_yscale("log")
        if bw:
            axes[i, 1].axhline(bw, color="gray", ls="--", label=f"measured copy {bw:.0f} GB/s")
        axes[i, 1].legend(fontsize=7)
        axes[i, 0].legend(fontsize=7)
    fig.suptitle(
        f"decode attention {meta['shape']} {meta['dtype']} on {meta['device_name']} "
        f"(commit {str(meta.get('git_commit'))[:8]})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument(
        "--contexts",
        default=None,
        help=f"context lengths, comma separated, k = 1024 (default: {CUDA_CONTEXTS} on cuda, {CPU_CONTEXTS} on cpu)",
    )
    parser.add_argument(
        "--batches", default="1,8", help="batch sizes (default 1,8; skipped cases are reported)"
    )
    parser.add_argument("--presets", default="default,aggressive", help="SpectralConfig presets (post-RoPE)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 on cuda, float32 on cpu), bfloat16, float16, float32"
    )
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA warm-up per measurement (ms)")
    parser.add_argument(
        "--rep-ms", type=float, default=100.0, help="CUDA timed repetition per measurement (ms)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="CPU timed calls per measurement")
    parser.add_argument("--step-repeats", type=int, default=30, help="timed decode steps for 'dispatch'")
    parser.add_argument("--max-rel-err", type=float, default=2e-2, help="kernel vs torch reference bound")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="output directory")
    parser.add_argument("--tag", default=None, help="file tag (default: cuda_<gpu> or cpu)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--replot", default=None, help="only redraw the PNG of this results JSON")
    parser.add_argument("--markdown", default=None, help="only print the README table of this results JSON")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")


def _tag(dev: torch.device) -> str:
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower()
    for short in ("h100", "h200", "a100", "l4", "a10"):
        if short in name:
            return f"cuda_{short}"
    return "cuda"


def markdown(data: dict[str, Any]) -> str:
    """The README table of a results JSON (``--markdown FILE``): one row per (context, batch)."""
    rows, meta = data["results"], data["meta"]
    by = {(r["context"], r["batch"], r.get("preset"), r["method"]): r for r in rows}

    def cell(r: dict[str, Any] | None, gbps: bool = False) -> str:
        if r is None:
            return "—"
        if r.get("status") != "ok" or "median_ms" not in r:
            return f"{r.get('status', 'n/a')}"
        text = f"{r['median_ms']:.3f}"
        extra = []
        if gbps and r.get("gbps"):
            extra.append(f"{r['gbps']:.0f} GB/s")
        if r.get("speedup_vs_sdpa"):
            extra.append(f"{r['speedup_vs_sdpa']:.2f}× SDPA")
        return text + (f" ({', '.join(extra)})" if extra else "")

    presets = meta.get("presets", [])
    graphed = [m for m in GRAPHED if m in meta.get("methods", ())]  # absent from older results
    head = ["context, batch", "SDPA dense ms (GB/s)"] + ["SDPA graph ms (GB/s)"] * ("sdpa_graph" in graphed)
    for p in presets:
        head += (
            [f"kernel {p} ms"]
            + [f"kernel graph {p} ms"] * ("kernel_graph" in graphed)
            + [f"torch ref {p} ms"]
        )
    head.append("bytes read, dense / " + " / ".join(presets))
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in meta["contexts"]:
        for b in meta["batches"]:
            sd = by.get((t, b, None, "sdpa"))
            cells = [f"{t // 1024}K, {b}" if t % 1024 == 0 else f"{t}, {b}", cell(sd, gbps=True)]
            if "sdpa_graph" in graphed:
                cells.append(cell(by.get((t, b, None, "sdpa_graph")), gbps=True))
            ratios = []
            for p in presets:
                cells.append(cell(by.get((t, b, p, "kernel")), gbps=True))
                if "kernel_graph" in graphed:
                    cells.append(cell(by.get((t, b, p, "kernel_graph")), gbps=True))
                cells.append(cell(by.get((t, b, p, "torch"))))
                tr = by.get((t, b, p, "torch")) or by.get((t, b, p, "kernel"))
                ratios.append(f"{tr['byte_ratio']:.2f}×" if tr and tr.get("byte_ratio") else "—")
            cells.append(" / ".join(ratios))
            out.append("| " + " | ".join(cells) + " |")
    # block compression while filling the layer (one cache.update of the whole prefill)
    fills = []
    for t in meta["contexts"]:
        for p in presets:
            r = next((x for x in rows if x["context"] == t and x["batch"] == 1 and x.get("preset") == p
                      and x.get("compress_s") is not None), None)  # fmt: skip
            if r is not None:
                fills.append(f"{t // 1024}K {p} {1e3 * r['compress_s']:.0f} ms ({r['num_blocks']} blocks)")
    if fills:
        out.append("")
        out.append("Compressing one layer (batch 1, 8 KV heads, in one `update`): " + "; ".join(fills) + ".")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if render_saved_results(args.replot, args.markdown, plot, markdown):
        return 0
    dev = device_from_name(args.device)
    dtype = dtype_from_name(args.dtype, dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = parse_int_list(
        args.contexts or (CUDA_CONTEXTS if dev.type == "cuda" else CPU_CONTEXTS), "context"
    )
    batches = parse_int_list(args.batches, "batch")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    from spectralcache.config import SpectralConfig

    for p in presets:
        cfg = SpectralConfig.from_preset(p)  # unknown preset: clear ValueError
        if cfg.key_space != "post_rope":
            raise SystemExit(
                f"preset {p!r} uses key_space={cfg.key_space!r}; this benchmark builds post-RoPE states"
            )
    if args.q_heads % args.kv_heads:
        raise SystemExit(f"--q-heads {args.q_heads} is not a multiple of --kv-heads {args.kv_heads}")
    if min(contexts) < 2:
        raise SystemExit("contexts must be at least 2 tokens")

    wants_kernel = "kernel" in methods or "kernel_graph" in methods
    kernel, kernel_reason = load_kernel() if wants_kernel else (None, "not requested")
    copy = measure_copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (1 << 26))
    meta = run_metadata(
        "spectralcache bench attention",
        dev,
        shape=f"{args.q_heads}q/{args.kv_heads}kv heads x head_dim {args.head_dim}, 1 query token",
        dtype=str(dtype).replace("torch.", ""),
        contexts=contexts,
        batches=batches,
        presets=presets,
        methods=methods,
        copy_bandwidth=copy,
        kernel_available=kernel is not None,
        kernel_import_error=kernel_reason or None,
        bytes_read_definition=(
            "sdpa: K + V of the dense cache; spectral methods: sum of the tensors of layer.state() "
            "(logical view sizes), including landmarks, hot buffer and the current token"
        ),
    )
    print(
        f"copy bandwidth: {copy['gbps']:.0f} GB/s (read + write) on {meta['device_name']}; kernel: "
        + ("available" if kernel is not None else f"n/a ({kernel_reason})"),
        flush=True,
    )
    n_spectral = len([m for m in methods if m != "sdpa"])
    total = len(contexts) * len(batches) * (("sdpa" in methods) + n_spectral * len(presets))
    bar = progress(total, "bench attention")
    rows: list[dict[str, Any]] = []
    l2 = meta.get("l2_cache_bytes")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or _tag(dev)
    json_path = out_dir / f"bench_attention_{tag}.json"

    def save() -> None:  # after every case, so a run stopped from outside keeps what it measured
        json_path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))

    # batch outer: a run stopped by a time limit keeps every context at the first batch size
    for batch in batches:
        for tokens in contexts:
            try:
                rows.extend(
                    measure_case(args, dev, dtype, tokens, batch, presets, methods, kernel, kernel_reason, l2,
                                 copy["gbps"], bar)
                )  # fmt: skip
            except torch.cuda.OutOfMemoryError as err:  # dense K/V did not fit
                rows.append({"context": tokens, "batch": batch, "preset": None, "method": "all",
                             "status": "oom", "reason": _short(err)})  # fmt: skip
                _free(dev)
            save()
    bar.close()
    print_table(rows, meta)
    save()
    print(f"wrote {json_path}")
    if not args.no_plot and plot(rows, meta, out_dir / f"bench_attention_{tag}.png"):
        print(f"wrote {out_dir / f'bench_attention_{tag}.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
