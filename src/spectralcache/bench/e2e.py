"""End-to-end benchmark: a whole model, DynamicCache vs SpectralCache presets, side by side.

One process, one model, the same random prompt and the same teacher-forced decode tokens for
every cache. Per prompt length and cache:

* ``prefill_s``: one forward over the whole prompt (``logits_to_keep=1``), block compression
  included, device synchronized before and after;
* ``decode_ms_per_token``: median wall time of one-token forwards after warm-up steps
  (synchronized around each step, as ``generate`` effectively is: it reads every token back),
  measured on a second pass over the same lengths (the cache cropped back in between), so that
  one-off costs per new length (cuDNN SDPA plan builds) are not counted;
  ``decode_first_pass_ms_per_token`` is the first pass, where they are;
* graphed methods (``graphed:<preset>``, ``graphed:static``): the same prefill, then every
  decode step replayed from a CUDA graph of the one-token forward -- a SpectralCache through
  :class:`spectralcache.GraphedDecoder` (block compression and hot-window compaction run eagerly
  between replays; a step whose recorded buffers moved runs uncaptured and the next captures),
  or, as DynamicCache's graphable counterpart, transformers' ``StaticCache`` (capacity = prompt
  + decode steps, in-place ``index_copy_`` writes, attention over the whole capacity, masked)
  with the same capture / replay. Timed the same way (synchronized around each step); the rows
  also carry ``captures`` / ``replays`` / ``uncaptured_steps``;
* ``peak_bytes``: ``torch.cuda.max_memory_allocated`` over prefill + decode, reset between
  caches (``peak_above_weights_bytes`` subtracts what was allocated before the cache existed);
* ``kv_bytes``: bytes the cache's tensors hold, measured from storage
  (``spectralcache.eval.methods.measure_kv_bytes``: a SpectralCache's ``memory_report``).

Models (random weights, built in code, nothing downloaded):

* ``llama8b`` (default on CUDA): Llama-3.1-8B shapes — 32 layers (``--layers`` to change, e.g.
  8 for the issue's 8-layer table), hidden 4096, 32 query / 8 KV heads, head_dim 128,
  intermediate 14336 — with the vocabulary reduced to 32000 (``--vocab``) to save memory; bf16.
* ``tiny`` (default on CPU): 4 layers, hidden 512, 8 query / 2 KV heads, float32.
* ``gemma3-270m``: the real Gemma 3 270M (the package's embedded GGUF; 3 of 18 layers full
  attention, so only those are compressed).
* ``gemma3-270m-shape``: the same architecture with random weights -- the real model's text config
  (as transformers reads it from the GGUF: 18 layers, hidden 640, 4 query / 1 KV head, head_dim 256,
  sliding window 512 on 15 layers, vocabulary 262144), built in code, so a machine without the
  GGUF package (a GPU host) times Gemma's decode. Decode time does not depend on the weights'
  values for presets whose bytes do not (the default: int4 rows, fixed outlier and landmark counts);
  what it cannot give is answers.

A time budget (``--time-budget-s``) skips a (length, cache) whose prefill + decode, estimated
from the same cache at the previous length (prefill as length^1.5, decode linear), would not fit;
skipped and out-of-memory cases are recorded with the reason. The JSON is rewritten after every
case, so a run stopped from outside keeps what it measured. Output: ``bench_e2e_<tag>.json`` / ``.png``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from spectralcache.bench.common import (
    device_from_name,
    dtype_from_name,
    parse_int_list,
    progress,
    render_saved_results,
    run_metadata,
    sync,
)

__all__ = [
    "build_model",
    "cache_argument",
    "configure",
    "main",
    "markdown",
    "measure_method",
    "run",
]

CUDA_LENGTHS = "8192,32768,131072"
CPU_LENGTHS = "2048,8192"
MODELS = ("llama8b", "tiny", "gemma3-270m", "gemma3-270m-shape")


# Gemma 3 270M's text config as transformers 5.24 reads it from the embedded GGUF (checked against
# `load_model("gemma3-270m").config` on the CPU box; tests/unit/test_bench_e2e.py compares them
# where the package is installed).
GEMMA3_270M_TEXT = dict(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    rms_norm_eps=1e-6,
    sliding_window=512,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    rope_parameters={
        "full_attention": {"rope_theta": 1_000_000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"},
    },
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)


def _random_model(config: Any, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A causal LM of ``config`` with seeded random weights, built on ``device`` in ``dtype`` (eval
    mode, SDPA attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # weights initialized on the device, in the target dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _gemma3_270m_shape(
    device: torch.device,
    dtype: torch.dtype,
    *,
    layers: int | None,
    vocab: int | None,
    max_positions: int,
    seed: int,
) -> tuple[Any, dict[str, Any]]:
    from transformers import Gemma3TextConfig

    fields = dict(GEMMA3_270M_TEXT, max_position_embeddings=max_positions)
    if layers:
        fields.update(num_hidden_layers=layers, layer_types=fields["layer_types"][:layers])
    if vocab:
        fields["vocab_size"] = vocab
    config = Gemma3TextConfig(**fields)
    model = _random_model(config, device, dtype, seed)
    return model, {
        "name": "random-weight Gemma3ForCausalLM (Gemma 3 270M's text config)",
        "layers": config.num_hidden_layers,
        "layer_types": sorted(set(config.layer_types)),
        "vocab": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "note": "the real model's architecture and sizes, random weights: times, not answers",
    }


def build_model(
    kind: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    layers: int | None = None,
    vocab: int | None = None,
    max_positions: int = 131072 + 1024,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """The benchmark model (eval mode, SDPA attention) and a description for the JSON."""
    from transformers import LlamaConfig

    if kind == "gemma3-270m":
        from spectralcache.eval.model import load_model

        model = load_model("gemma3-270m", device=device, dtype=dtype)[0]
        cfg = model.config.get_text_config(decoder=True)
        return model, {
            "name": "gemma3-270m (real weights)",
            "layers": cfg.num_hidden_layers,
            "layer_types": sorted(set(getattr(cfg, "layer_types", []) or [])),
            "vocab": cfg.vocab_size,
        }
    if kind == "gemma3-270m-shape":
        return _gemma3_270m_shape(
            device, dtype, layers=layers, vocab=vocab, max_positions=max_positions, seed=seed
        )
    shapes = {
        "llama8b": dict(layers=32, hidden=4096, q=32, kv=8, head_dim=128, inter=14336, vocab=32000),
        "tiny": dict(layers=4, hidden=512, q=8, kv=2, head_dim=64, inter=1536, vocab=32000),
    }
    if kind not in shapes:
        raise SystemExit(f"unknown --model {kind!r}; choose from {', '.join(MODELS)}")
    s = dict(shapes[kind])
    if layers:
        s["layers"] = layers
    if vocab:
        s["vocab"] = vocab
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["q"],
        num_key_value_heads=s["kv"],
        head_dim=s["head_dim"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    model = _random_model(config, device, dtype, seed)
    params = sum(p.numel() for p in model.parameters())
    desc = {
        "name": f"random-weight LlamaForCausalLM ({kind} shape)",
        "layers": s["layers"],
        "hidden": s["hidden"],
        "q_heads": s["q"],
        "kv_heads": s["kv"],
        "head_dim": s["head_dim"],
        "intermediate": s["inter"],
        "vocab": s["vocab"],
        "parameters": params,
    }
    if kind == "llama8b":
        desc["note"] = (
            f"Llama-3.1-8B layer shapes; vocabulary {s['vocab']} instead of 128256 to save memory "
            "(affects only the embedding and the one-token LM head)"
        )
    return model, desc


def cache_argument(model: Any) -> str:
    """The keyword the installed transformers' forward takes the cache by (``cache`` from 5.24 on,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


GRAPHED = "graphed:"


def _make_cache(model: Any, method: str, max_cache_len: int = 0) -> Any:
    """``dynamic``, ``static`` (``max_cache_len`` tokens) or a SpectralConfig preset name
    (optionally ``preset,key=value,...``); a ``graphed:`` prefix is ignored here."""
    import spectralcache

    method = method.split("#")[0]  # "dynamic#again": a second measurement of the same cache
    method = method.removeprefix(GRAPHED)
    if method == "static":
        from transformers import StaticCache

        if spectralcache.is_enabled(model):
            spectralcache.disable(model)
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    if method == "dynamic":
        from transformers import DynamicCache

        if spectralcache.is_enabled(model):
            spectralcache.disable(model)
        return DynamicCache(config=model.config)
    from spectralcache.cache.cache import SpectralCache
    from spectralcache.config import SpectralConfig

    preset, *overrides = method.split(",")
    kwargs: dict[str, Any] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        kwargs[key] = _parse_value(raw)
    config = SpectralConfig.from_preset(preset, **kwargs)
    spectralcache.enable(model)  # explicit: the cache may not switch the model itself
    return SpectralCache(model, config)


def _parse_value(raw: str) -> Any:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(raw.lower(), raw)


def _kv_bytes(cache: Any) -> int:
    from spectralcache.eval.methods import measure_kv_bytes

    return int(measure_kv_bytes(cache))


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _is_static(cache: Any) -> bool:
    from transformers import StaticCache

    return isinstance(cache, StaticCache)


def _prefill_static(model: Any, prompt: torch.Tensor, cache: Any, kw: str) -> Any:
    """Fill ``cache`` (a StaticCache) with the prompt: a DynamicCache forward, then every layer's
    K/V through ``StaticCache.update`` (in-place writes at cache positions 0..T-1)."""
    from transformers import DynamicCache

    dynamic = DynamicCache(config=model.config)
    out = model(prompt, use_cache=True, logits_to_keep=1, **{kw: dynamic})
    positions = torch.arange(prompt.shape[-1], device=prompt.device)
    for i, layer in enumerate(dynamic.layers):
        cache.update(layer.keys, layer.values, i, {"cache_position": positions})
    return out


class StaticCacheGraph:
    """transformers' ``StaticCache`` decoded one token per step from a captured CUDA graph (what
    transformers' own static-cache + CUDA-graph generation does, written out): static
    ``input_ids`` / ``position_ids`` (/ ``cache_position`` where the model takes it), the first
    step eager (warm-up), the second captured, every later one replayed. ``rewind(n)`` moves the
    write position back ``n`` tokens (the next steps overwrite them in place)."""

    def __init__(self, model: Any, cache: Any, batch: int, start: int, device: torch.device) -> None:
        self.model, self.cache, self.next = model, cache, int(start)
        self.capture = device.type == "cuda"  # CPU (tests): the same static step, never captured
        self.kw = cache_argument(model)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.pass_cache_position = "cache_position" in inspect.signature(type(model).forward).parameters
        self.graph: Any = None
        self.out: torch.Tensor | None = None
        self.warm = False
        self.captures = self.replays = self.uncaptured_steps = 0

    def _forward(self) -> torch.Tensor:
        kw = {"input_ids": self.ids, "position_ids": self.pos.view(1, 1).expand(self.ids.shape[0], 1),
              "use_cache": True, self.kw: self.cache}  # fmt: skip
        if self.pass_cache_position:
            kw["cache_position"] = self.pos
        return self.model.forward(**kw).logits[:, -1]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tok)
        self.pos.fill_(self.next)
        self.next += 1
        if self.graph is None and (not self.warm or not self.capture):
            self.warm = True
            self.uncaptured_steps += 1
            return self._forward()
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._forward()
            self.captures += 1
        self.graph.replay()
        self.replays += 1
        return self.out

    def rewind(self, n: int) -> None:
        self.next -= n
        for layer in getattr(self.cache, "layers", []):
            length = getattr(layer, "cumulative_length", None)  # transformers >= 5.2x keeps it on the device
            if isinstance(length, torch.Tensor):
                length.sub_(n)


def _graphed_decoder(model: Any, cache: Any, prompt: torch.Tensor, steps: int, dev: torch.device) -> Any:
    """The per-step decoder of a ``graphed:`` method (``step(tok) -> logits``, ``rewind(n)``).
    Without CUDA (CPU tests of this bench) the same static steps run uncaptured: the SpectralCache
    through ``GraphedDecoder(mode="static")`` (Triton's interpreter), which needs
    ``TRITON_INTERPRET=1``."""
    from spectralcache.cache.cache import SpectralCache

    if not isinstance(cache, SpectralCache):
        return StaticCacheGraph(model, cache, int(prompt.shape[0]), int(prompt.shape[-1]), dev)
    from spectralcache.integrations.graphed import GraphedDecoder

    mode = "graph" if dev.type == "cuda" else "static"
    decoder = GraphedDecoder(model, cache, max_new_tokens=steps, mode=mode)
    decoder.rewind = lambda n: cache.crop(-n)  # negative: remove the decoded tokens
    return decoder


def measure_method(
    model: Any,
    method: str,
    prompt: torch.Tensor,
    follow: torch.Tensor,
    dev: torch.device,
    warmup_steps: int,
    profile: bool = False,
    decode_passes: int = 2,
) -> dict[str, Any]:
    """Prefill ``prompt`` then decode ``follow`` token by token with a fresh cache (and, with
    ``profile``, one more step under the profiler: where a decode step's GPU time goes)."""
    kw = cache_argument(model)
    row: dict[str, Any] = {"method": method, "length": int(prompt.shape[-1]), "batch": int(prompt.shape[0])}
    _free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    graphed = method.split("#")[0].startswith(GRAPHED)
    cache = _make_cache(model, method, int(prompt.shape[-1]) + decode_passes * int(follow.shape[-1]) + 1)
    with torch.no_grad():
        sync(dev)
        t0 = time.perf_counter()
        if _is_static(cache):
            out = _prefill_static(model, prompt, cache, kw)
            row["prefill_note"] = (
                "DynamicCache prefill, its K/V then written into the StaticCache by StaticCache.update "
                "(a StaticCache prefill builds a [T, capacity] mask: 16 GiB at 128K)"
            )
        else:
            out = model(prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
        sync(dev)
        row["prefill_s"] = time.perf_counter() - t0
        row["prefill_tokens_per_s"] = prompt.numel() / row["prefill_s"]
        finite = bool(torch.isfinite(out.logits).all())
        del out
        decoder = (
            _graphed_decoder(model, cache, prompt, decode_passes * follow.shape[-1], dev) if graphed else None
        )

        def decode_pass() -> list[float]:
            nonlocal finite
            times: list[float] = []
            for i in range(follow.shape[-1]):
                tok = follow[:, i : i + 1]
                sync(dev)
                t0 = time.perf_counter()
                logits = decoder.step(tok) if graphed else model(tok, use_cache=True, **{kw: cache}).logits
                sync(dev)
                if i >= warmup_steps:
                    times.append((time.perf_counter() - t0) * 1e3)
                finite = finite and bool(torch.isfinite(logits).all())
                del logits
            return times

        # Pass 1 meets every cache length for the first time; pass 2 crops the cache back and decodes
        # the same tokens at the same lengths again. They differ where a per-shape cost is paid once
        # per length (seen on the H100: cuDNN SDPA builds an execution plan for every new key length,
        # ~7 ms per layer, so DynamicCache's first pass there is several times its second).
        passes = [decode_pass()]
        for _ in range(decode_passes - 1):
            try:
                if graphed:
                    decoder.rewind(follow.shape[-1])
                else:
                    cache.crop(-follow.shape[-1])  # negative: remove the decoded tokens (every layer type)
            except Exception as err:
                row["decode_repeat_error"] = f"{type(err).__name__}: {err}"[:300]
                break
            passes.append(decode_pass())
        steps = passes[-1]
        if profile and dev.type == "cuda" and not graphed:
            row["profile_step"] = _profile_step(model, cache, follow[:, -1:], kw)
        if graphed:
            row["graph_captured"] = dev.type == "cuda"
            row["captures"] = decoder.captures
            row["replays"] = decoder.replays
            row["uncaptured_steps"] = (
                getattr(decoder, "static_steps", 0)
                + getattr(decoder, "uncaptured_steps", 0)
                + getattr(decoder, "eager_steps", 0)
            )
    if dev.type == "cuda":
        row["peak_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        row["peak_above_weights_bytes"] = row["peak_bytes"] - int(before)
    row["decode_steps"] = len(steps)
    row["decode_passes"] = len(passes)
    row["decode_ms_per_token"] = statistics.median(steps)
    row["decode_first_pass_ms_per_token"] = statistics.median(passes[0])
    if len(steps) >= 2:
        q = statistics.quantiles(steps, n=5)
        row["decode_p20_ms"], row["decode_p80_ms"] = q[0], q[3]
    row["decode_tokens_per_s"] = 1e3 / row["decode_ms_per_token"] * prompt.shape[0]
    row["kv_bytes"] = _kv_bytes(cache)
    row["cached_tokens"] = int(cache.get_seq_length())
    row["logits_finite"] = finite
    report = getattr(cache, "memory_report", None)
    if callable(report):
        rep = report()
        comp = rep.get("compression", {})
        row["compression_s"] = comp.get("seconds")
        row["compression_blocks"] = comp.get("blocks")
        row["compressed_layers_ratio"] = rep.get("compressed_layers", {}).get("ratio")
    row["status"] = "ok"
    return row


def _profile_step(model: Any, cache: Any, tok: torch.Tensor, kw: str, top: int = 12) -> dict[str, Any]:
    """One extra decode step under ``torch.profiler``: GPU time, kernel launches, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(tok, use_cache=True, **{kw: cache})
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in events)
    return {
        "device_ms": total_us / 1e3,
        "kernels": sum(e.count for e in events),
        "top": [
            {"name": e.key[:120], "device_ms": e.self_device_time_total / 1e3, "count": e.count}
            for e in events[:top]
        ],
    }


def _estimate_s(done: list[dict[str, Any]], method: str, length: int, decode_steps: int) -> float | None:
    """Seconds a (method, length) should take, from the same method at its longest shorter length."""
    prev = [r for r in done if r["method"] == method and r.get("status") == "ok" and r["length"] < length]
    if not prev:
        return None
    p = max(prev, key=lambda r: r["length"])
    f = length / p["length"]
    # prefill: between linear (projections, MLP, block compression) and quadratic (attention);
    # decode: linear in the context; two passes
    passes = p.get("decode_passes", 1)
    return p["prefill_s"] * f**1.5 + passes * decode_steps * p["decode_ms_per_token"] * 1e-3 * f


# ----------------------------------------------------------------------------- reporting


def _gib(x: Any) -> str:
    return f"{x / 2**30:.2f}" if isinstance(x, (int, float)) else "-"


def _mib(x: Any) -> str:
    return f"{x / 2**20:.1f}" if isinstance(x, (int, float)) else "-"


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    m = meta["model"]
    print(f"\n{m['name']}, {m['layers']} layers, {meta['dtype']}, {meta['device_name']}")
    header = (
        f"{'length':>7} {'cache':<16} {'prefill s':>10} {'x dyn':>6} {'decode ms':>10} {'x dyn':>6} {'1st pass':>9} "
        f"{'peak GiB':>9} {'KV MiB':>8} {'KV ratio':>8} {'compress s':>10}  status"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = r.get("status") == "ok"
        print(
            f"{r['length']:>7} {r['method']:<16} "
            + (
                f"{r['prefill_s']:>10.3f} {r.get('prefill_x_dynamic') or 0:>6.2f} "
                f"{r['decode_ms_per_token']:>10.2f} {r.get('decode_x_dynamic') or 0:>6.2f} "
                f"{r.get('decode_first_pass_ms_per_token') or 0:>9.2f} "
                f"{_gib(r.get('peak_bytes')):>9} {_mib(r.get('kv_bytes')):>8} "
                f"{r.get('kv_ratio_vs_dynamic') or 0:>8.2f} "
                f"{r['compression_s'] if r.get('compression_s') is not None else 0:>10.3f}  ok"
                if ok
                else f"{'':>88}  {r.get('status')} ({r.get('reason', '')})"
            )
        )


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """x dynamic (time ratios; >1 = slower than DynamicCache) and DynamicCache KV bytes / ours."""
    dyn = {r["length"]: r for r in rows if r["method"] == "dynamic" and r.get("status") == "ok"}
    for r in rows:
        d = dyn.get(r["length"])
        if d is None or r.get("status") != "ok":
            continue
        r["prefill_x_dynamic"] = r["prefill_s"] / d["prefill_s"]
        r["decode_x_dynamic"] = r["decode_ms_per_token"] / d["decode_ms_per_token"]
        r["decode_speedup_vs_dynamic"] = d["decode_ms_per_token"] / r["decode_ms_per_token"]
        r["kv_ratio_vs_dynamic"] = d["kv_bytes"] / r["kv_bytes"] if r["kv_bytes"] else None
        if r.get("peak_bytes") and d.get("peak_bytes"):
            r["peak_x_dynamic"] = r["peak_bytes"] / d["peak_bytes"]
    # graphed methods also against the graphed DynamicCache-family baseline (StaticCache + graph)
    static = {r["length"]: r for r in rows if r["method"] == GRAPHED + "static" and r.get("status") == "ok"}
    for r in rows:
        st = static.get(r["length"])
        if st is not None and r.get("status") == "ok" and r["method"].startswith(GRAPHED):
            r["decode_speedup_vs_graphed_static"] = st["decode_ms_per_token"] / r["decode_ms_per_token"]


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written")
        return False
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return False
    lengths = sorted({r["length"] for r in ok})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = [
        ("prefill_s", "prefill s (compression included)", 1.0),
        ("decode_ms_per_token", "decode ms / token (median; ▼ first pass)", 1.0),
        ("peak_bytes", "peak GPU memory GiB", 2**-30),
        ("kv_bytes", "KV cache GiB (measured)", 2**-30),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0))
    width = 0.8 / max(len(methods), 1)
    for ax, (key, label, scale) in zip(axes, panels):
        for j, m in enumerate(methods):
            ys = []
            for length in lengths:
                r = next((x for x in ok if x["method"] == m and x["length"] == length), None)
                ys.append(r[key] * scale if r is not None and r.get(key) is not None else float("nan"))
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(lengths))]
            bars = ax.bar(xs, ys, width, label=m)
            if key == "decode_ms_per_token":  # first pass (new lengths) as a marker over the bar
                first = []
                for length in lengths:
                    r = next((x for x in ok if x["method"] == m and x["length"] == length), None)
                    first.append(r.get("decode_first_pass_ms_per_token", float("nan")) if r else float("nan"))
                ax.plot(xs, first, "v", color=bars.patches[0].get_facecolor(), markeredgecolor="k", ms=6)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_title(label, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if key == "prefill_s":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    m = meta["model"]
    fig.suptitle(
        f"{m['name']}, {m['layers']} layers, {meta['dtype']}, {meta['device_name']} "
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
        "--model", default="auto", help=f"auto (llama8b on cuda, tiny on cpu), {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="override the layer count (8: issue 7's table)"
    )
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary (default 32000)")
    parser.add_argument(
        "--lengths",
        default=None,
        help=f"prompt lengths, k = 1024 (default: {CUDA_LENGTHS} on cuda, {CPU_LENGTHS} on cpu)",
    )
    parser.add_argument(
        "--methods",
        default="dynamic,default,aggressive",
        help="'dynamic' and SpectralConfig presets, ';'-separated when a preset carries overrides "
        "(e.g. 'dynamic;default;default,value_codec=identity'); ',' also separates plain names; "
        "a '#label' suffix measures the same cache again under another name (e.g. 'dynamic#again'); "
        "CUDA: a 'graphed:' prefix decodes from a captured CUDA graph ('graphed:default' through "
        "spectralcache.GraphedDecoder, 'graphed:static' with transformers' StaticCache)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (cuda 32, cpu 8)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed decode steps first (cuda 4, cpu 2)"
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 on cuda, float32 on cpu), bfloat16, float16, float32"
    )
    parser.add_argument(
        "--warmup-tokens", type=int, default=1024, help="untimed warm-up prompt per cache first (0: none)"
    )
    parser.add_argument(
        "--time-budget-s", type=float, default=0.0, help="skip cases estimated past it (0: none)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="output directory")
    parser.add_argument("--tag", default=None, help="file tag (default: <device>_<model>_<layers>l)")
    parser.add_argument(
        "--decode-passes",
        type=int,
        default=2,
        help="decode the same tokens at the same lengths this many times (cropping back in between); "
        "decode_ms_per_token is the last pass, decode_first_pass_ms_per_token the first",
    )
    parser.add_argument(
        "--profile", action="store_true", help="CUDA: profile one extra decode step per case (top kernels)"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--replot", default=None, help="only redraw the PNG of this results JSON")
    parser.add_argument("--markdown", default=None, help="only print the README table of this results JSON")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")


def _split_methods(text: str) -> list[str]:
    if ";" in text:
        return [m.strip() for m in text.split(";") if m.strip()]
    return [m.strip() for m in text.split(",") if m.strip()]


def markdown(data: dict[str, Any]) -> str:
    """The README table of a results JSON (``--markdown FILE``): one row per (length, cache)."""
    head = [
        "prompt",
        "cache",
        "prefill s (× dynamic)",
        "decode ms/token (× dynamic)",
        "first pass ms/token",
        "peak GiB",
        "KV MiB (ratio)",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["results"]:
        first = f"{r['length'] // 1024}K" if r["length"] % 1024 == 0 else str(r["length"])
        if r.get("status") != "ok":
            out.append(f"| {first} | {r['method']} | {r.get('status')}: {r.get('reason', '')} | | | | |")
            continue
        px, dx, kr = r.get("prefill_x_dynamic"), r.get("decode_x_dynamic"), r.get("kv_ratio_vs_dynamic")
        out.append(
            f"| {first} | {r['method']} | {r['prefill_s']:.3f}" + (f" ({px:.2f}×)" if px else "")
            + f" | {r['decode_ms_per_token']:.2f}" + (f" ({dx:.2f}×)" if dx else "")
            + f" | {r.get('decode_first_pass_ms_per_token', float('nan')):.2f}"
            + f" | {_gib(r.get('peak_bytes'))} | {_mib(r['kv_bytes'])}" + (f" ({kr:.2f}×)" if kr else "") + " |"
        )  # fmt: skip
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if render_saved_results(args.replot, args.markdown, plot, markdown):
        return 0
    dev = device_from_name(args.device)
    dtype = dtype_from_name(args.dtype, dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.model if args.model != "auto" else ("llama8b" if dev.type == "cuda" else "tiny")
    if kind not in MODELS:
        raise SystemExit(f"unknown --model {kind!r}; choose from auto, {', '.join(MODELS)}")
    lengths = parse_int_list(args.lengths or (CUDA_LENGTHS if dev.type == "cuda" else CPU_LENGTHS), "length")
    methods = _split_methods(args.methods)
    from spectralcache.config import SpectralConfig

    for m in methods:  # fail before building an 8B model on a typo
        m = m.split("#")[0].removeprefix(GRAPHED)
        if m not in ("dynamic", "static"):
            preset, *overrides = m.split(",")
            SpectralConfig.from_preset(
                preset, **{k: _parse_value(v) for k, _, v in (o.partition("=") for o in overrides)}
            )
    steps = args.decode_steps if args.decode_steps is not None else (32 if dev.type == "cuda" else 8)
    warm = args.warmup_steps if args.warmup_steps is not None else (4 if dev.type == "cuda" else 2)
    if steps < 1:
        raise SystemExit("--decode-steps must be >= 1")
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    model, desc = build_model(kind, dev, dtype, layers=args.layers, vocab=args.vocab, seed=args.seed,
                              max_positions=max(lengths) + warm + steps + 16)  # fmt: skip
    sync(dev)
    desc["build_s"] = time.perf_counter() - t0
    meta = run_metadata(
        "spectralcache bench e2e",
        dev,
        model=desc,
        dtype=str(dtype).replace("torch.", ""),
        lengths=lengths,
        methods=methods,
        batch=args.batch,
        decode_steps=steps,
        warmup_steps=warm,
        cache_argument=cache_argument(model),
        weights_bytes=int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else None,
        timing=(
            "prefill: one synchronized forward over the prompt (logits_to_keep=1); decode: median of "
            "synchronized one-token forwards after warm-up steps, same tokens for every cache"
        ),
    )
    print(f"built {desc['name']} ({desc['layers']} layers) in {desc['build_s']:.1f} s", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{'cuda' if dev.type == 'cuda' else 'cpu'}_{kind}_{desc['layers']}l"
    json_path = out_dir / f"bench_e2e_{tag}.json"
    rows: list[dict[str, Any]] = []

    def save() -> None:
        _add_ratios(rows)
        json_path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))

    vocab = model.config.get_text_config(decoder=True).vocab_size
    if args.warmup_tokens:
        # Untimed: the first forward of each cache pays one-off costs (CUDA context and cuBLAS
        # handles, kernel autotuning / compilation, lazy imports) that are not prefill or decode.
        g = torch.Generator().manual_seed(args.seed)
        n = min(args.warmup_tokens, min(lengths))
        w_prompt = torch.randint(3, vocab, (args.batch, n), generator=g).to(dev)
        w_follow = torch.randint(3, vocab, (args.batch, 2), generator=g).to(dev)
        t0 = time.perf_counter()
        for method in methods:
            try:
                measure_method(model, method, w_prompt, w_follow, dev, 1)
            except Exception as err:  # reported again (and recorded) by the measured run
                print(f"warm-up {method}: {type(err).__name__}: {err}", file=sys.stderr)
        _free(dev)
        meta["warmup"] = {"tokens": n, "seconds": time.perf_counter() - t0}
    bar = progress(len(lengths) * len(methods), "bench e2e")
    for length in lengths:
        g = torch.Generator().manual_seed(args.seed + length)
        prompt = torch.randint(3, vocab, (args.batch, length), generator=g).to(dev)
        follow = torch.randint(3, vocab, (args.batch, warm + steps), generator=g).to(dev)
        for method in methods:
            bar.set_postfix_str(f"{length} tokens, {method}")
            est = _estimate_s(rows, method, length, warm + steps)
            left = args.time_budget_s - (time.perf_counter() - t_start) if args.time_budget_s else None
            if est is not None and left is not None and est > left:
                rows.append({"method": method, "length": length, "batch": args.batch, "status": "skipped",
                             "reason": f"estimated {est:.0f} s > {left:.0f} s left of --time-budget-s"})  # fmt: skip
            else:
                try:
                    rows.append(
                        measure_method(
                            model, method, prompt, follow, dev, warm, args.profile, args.decode_passes
                        )
                    )
                except torch.cuda.OutOfMemoryError as err:
                    rows.append({"method": method, "length": length, "batch": args.batch, "status": "oom",
                                 "reason": str(err).splitlines()[0][:300]})  # fmt: skip
                except Exception as err:  # a failing cache is reported; the others still run
                    if args.verbose:
                        traceback.print_exc()
                    rows.append({"method": method, "length": length, "batch": args.batch, "status": "error",
                                 "reason": f"{type(err).__name__}: {err}"[:300]})  # fmt: skip
            _free(dev)
            save()
            bar.update(1)
            r = rows[-1]
            print(
                f"  {length:>7} {method:<14} "
                + (
                    f"prefill {r['prefill_s']:.3f} s, decode {r['decode_ms_per_token']:.2f} ms/token, "
                    f"KV {_mib(r['kv_bytes'])} MiB"
                    + (f", peak {_gib(r['peak_bytes'])} GiB" if "peak_bytes" in r else "")
                    if r["status"] == "ok"
                    else f"{r['status']}: {r.get('reason')}"
                ),
                file=sys.stderr,
                flush=True,
            )
    bar.close()
    save()
    print_table(rows, meta)
    print(f"wrote {json_path}")
    if not args.no_plot and plot(rows, meta, out_dir / f"bench_e2e_{tag}.png"):
        print(f"wrote {out_dir / f'bench_e2e_{tag}.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
