"""Host cost of one decode attention call (update + attend), and CUDA-graph replay across steps.

Usage (CUDA)::

    python benchmarks/decode_host_overhead.py --out DIR [--sections launch,layer,graph]

* ``launch``: Llama-3.1-8B attention shape (32 q / 8 KV heads, head_dim 128, bf16), one query
  token, a random 4K-token state (default preset): host microseconds per ``decode_attention``
  call (N calls without synchronization / N; the kernel takes ~15 us, so the host is the
  bottleneck), through the FastLauncher and through Triton's own launch path, split into Python
  preparation (launches replaced by no-ops), the split-kernel launch, the combine launch, and
  one ``torch.empty``;
* ``layer``: a real ``SpectralLayer`` (default preset, 4K-token prefill, bf16) decoding token by
  token: median host microseconds per step of ``layer.update``, ``layer.state()``, ``attend`` and
  the whole layer call (update + state + attend + transformers' ``transpose(1, 2).contiguous()``
  + ``release_chunk``), next to a ``DynamicLayer`` update + SDPA on the same shapes;
* ``prep_cpu`` (no GPU; ``TRITON_INTERPRET=1``): Python preparation per call on CPU tensors;
* ``graph``: the same at 32K: the attention launch captured once in a CUDA graph
  (``DecodeGraphSizes``) and replayed step after step (re-captured when a buffer moves), checked
  against the eager kernel at every step; per-step host and wall time eager vs replay.

Prints a short table last and writes ``decode_host_overhead.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_kernel_dev import llama_state
from spectralcache.attention.reference import spectral_attention
from spectralcache.attention.triton import decode as dec
from spectralcache.attention.triton.dispatch import attend


def per_call_us(fn, n: int = 400) -> float:
    """Host microseconds per call: n calls without synchronization (after a synchronized warm-up)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def section_launch(res: dict) -> None:
    st = llama_state(4096, 1, "default")
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    ref = spectral_attention(q, st)
    r: dict = {"state": "4K tokens, batch 1, default preset, Llama-8B attention shape, bf16"}
    r["err_vs_ref"] = rel(decode_attention_once(q, st), ref)
    r["fast_us"] = per_call_us(lambda: dec.decode_attention(q, st, out=out))
    r["fast_alloc_out_us"] = per_call_us(lambda: dec.decode_attention(q, st))
    saved = dec._SPLIT.enabled, dec._COMBINE.enabled
    dec._SPLIT.enabled = dec._COMBINE.enabled = False
    try:
        r["triton_path_us"] = per_call_us(lambda: dec.decode_attention(q, st, out=out))
    finally:
        dec._SPLIT.enabled, dec._COMBINE.enabled = saved
    # Python preparation alone, and the recorded launches alone
    real_split, real_combine = dec._SPLIT, dec._COMBINE
    rec: dict = {}

    def recorder(name):
        def call(grid, args, constexprs, options):
            rec[name] = (grid, list(args), dict(constexprs), dict(options))

        return call

    dec._SPLIT, dec._COMBINE = recorder("split"), recorder("combine")
    try:
        r["prep_us"] = per_call_us(lambda: dec.decode_attention(q, st, out=out))
    finally:
        dec._SPLIT, dec._COMBINE = real_split, real_combine
    for name, launcher in (("split", real_split), ("combine", real_combine)):
        grid, args, cx, opts = rec[name]
        r[f"{name}_fast_launch_us"] = per_call_us(
            lambda g=grid, a=args, c=cx, o=opts, f=launcher: f(g, list(a), c, o)
        )
        kernel = launcher.kernel
        r[f"{name}_triton_launch_us"] = per_call_us(
            lambda g=grid, a=args, c=cx, o=opts, k=kernel: k[g](*a, **c, **o)
        )
        r[f"{name}_params"] = len(args) + len(cx)
    r["torch_empty_us"] = per_call_us(lambda: torch.empty(1024, device="cuda"))
    torch.cuda.synchronize()
    r["fast_calls"] = dec._SPLIT.fast_calls
    res["launch"] = r
    print(
        f"launch 4K B1 default: fast {r['fast_us']:.1f} us/call (alloc out {r['fast_alloc_out_us']:.1f}) | "
        f"Triton path {r['triton_path_us']:.1f} | prep {r['prep_us']:.1f} | split launch fast "
        f"{r['split_fast_launch_us']:.1f} vs Triton {r['split_triton_launch_us']:.1f} ({r['split_params']} params) | "
        f"combine fast {r['combine_fast_launch_us']:.1f} vs Triton {r['combine_triton_launch_us']:.1f} | "
        f"torch.empty {r['torch_empty_us']:.1f} | err {r['err_vs_ref']:.1e}",
        flush=True,
    )


def decode_attention_once(q, st):
    out = dec.decode_attention(q, st)
    torch.cuda.synchronize()
    return out


def _layer(prefill: int, preset: str = "default"):
    from spectralcache.cache.layer import SpectralLayer
    from spectralcache.config import SpectralConfig

    layer = SpectralLayer(SpectralConfig.from_preset(preset), 0, head_dim=128, num_kv_heads=8)
    g = torch.Generator(device="cuda").manual_seed(0)
    chunk = 8192
    for lo in range(0, prefill, chunk):
        n = min(chunk, prefill - lo)
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        layer.update(k, torch.randn_like(k))
        layer.release_chunk()
    torch.cuda.synchronize()
    return layer


def _median_host_us(step, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def section_layer(res: dict, n: int = 200) -> None:
    from transformers.cache_utils import DynamicLayer

    layer = _layer(4096)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    ks = [torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    it = iter(range(10**9))

    def kv():
        i = next(it) % 8
        return ks[i], ks[(i + 3) % 8]

    def update_only():
        layer.update(*kv())
        layer.release_chunk()

    def full_step():
        layer.update(*kv())
        state = layer.state()
        out = attend(q, state, None, None, None, "auto")
        out.transpose(1, 2).contiguous()
        layer.release_chunk()

    r: dict = {"prefill": 4096, "config": "default preset, 8 KV heads, head_dim 128, bf16, batch 1"}
    for _ in range(10):
        full_step()
    r["update_us"] = _median_host_us(update_only, n)

    def cache_style_update():  # what SpectralCache.update runs on the layer: one checkpoint + update
        layer.checkpoint()
        layer.update_checkpointed(*kv())
        layer.release_chunk()

    r["checkpoint_plus_update_checkpointed_us"] = _median_host_us(cache_style_update, n)
    layer.update(*kv())
    r["state_us"] = _median_host_us(layer.state, n)
    state = layer.state()
    r["attend_us"] = _median_host_us(lambda: attend(q, state, None, None, None, "auto"), n)
    layer.release_chunk()
    # pieces of update: checks (a decode token: one compare against cached facts), checkpoint, and
    # for reference the per-step NaN/inf folds the layer no longer runs (since fea7563 decode
    # tokens are checked at the next sync point): the 5-launch isnan(sum(x - x)) form it ran last
    # and the 8-launch ~isfinite(cat).all() form before that
    k1, v1 = kv()
    r["validate_us"] = _median_host_us(lambda: layer._validate(k1, v1), n)
    r["checkpoint_us"] = _median_host_us(layer.checkpoint, n)
    flag = torch.zeros((), dtype=torch.bool, device="cuda")

    def fold5():
        x = torch.cat((k1.reshape(-1), v1.reshape(-1)))
        return flag | torch.isnan((x - x).sum())

    r["removed_fold_5_launch_us"] = _median_host_us(fold5, n)
    r["removed_fold_8_launch_us"] = _median_host_us(
        lambda: flag | ~torch.isfinite(torch.cat((k1.reshape(-1), v1.reshape(-1)))).all(), n
    )
    r["layer_call_us"] = _median_host_us(full_step, n)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        full_step()
    torch.cuda.synchronize()
    r["layer_call_wall_us"] = (time.perf_counter() - t0) / n * 1e6
    # DynamicCache's layer on the same shapes: update (torch.cat) + SDPA with GQA
    dyn = DynamicLayer()
    k0 = torch.randn(1, 8, layer.get_seq_length(), 128, device="cuda", dtype=torch.bfloat16)
    dyn.update(k0, torch.randn_like(k0))

    def dyn_step():
        k, v = dyn.update(*kv())
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        o.transpose(1, 2).contiguous()

    r["dynamic_layer_call_us"] = _median_host_us(dyn_step, n)
    res["layer"] = r
    print(
        f"layer call (update+state+attend) {r['layer_call_us']:.1f} us host (median), wall {r['layer_call_wall_us']:.1f} us | "
        f"update {r['update_us']:.1f} (validate {r['validate_us']:.1f}, checkpoint {r['checkpoint_us']:.1f}; "
        f"removed NaN folds: 5-launch {r['removed_fold_5_launch_us']:.1f}, 8-launch {r['removed_fold_8_launch_us']:.1f}) | "
        f"state {r['state_us']:.1f} | "
        f"attend {r['attend_us']:.1f} | "
        f"DynamicLayer update+SDPA {r['dynamic_layer_call_us']:.1f}",
        flush=True,
    )


def section_graph(res: dict, prefill: int = 32768, steps: int = 160) -> None:
    from spectralcache.attention.triton.graph import DecodeGraphSizes, StaleDecodeGraph

    rows = {}
    for preset in ("default", "aggressive"):
        layer = _layer(prefill, preset)
        k_s = torch.zeros(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
        v_s = torch.zeros_like(k_s)
        q_s = torch.zeros(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros_like(q_s)
        graph = sizes = None
        replay_host, eager_host, errs = [], [], []
        captures = 0
        for _ in range(steps):
            k_s.normal_()
            v_s.normal_()
            q_s.normal_()
            layer.update(k_s, v_s)
            state = layer.state()
            t0 = time.perf_counter()
            try:
                if sizes is None:
                    raise StaleDecodeGraph("first")
                sizes.update(state)
                graph.replay()
                replay_host.append((time.perf_counter() - t0) * 1e6)
            except StaleDecodeGraph:
                sizes = DecodeGraphSizes(state, q_len=1)
                sizes.update(state)
                dec.decode_attention(q_s, state, out=out, **sizes.launch_kwargs())
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    dec.decode_attention(q_s, state, out=out, **sizes.launch_kwargs())
                graph.replay()
                captures += 1
            t0 = time.perf_counter()
            eager = dec.decode_attention(q_s, state)
            eager_host.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
            errs.append(rel(out, eager))
            layer.release_chunk()
        # GPU time per call: the graph replayed back to back vs the eager kernel, on one more step
        layer.update(k_s, v_s)
        state = layer.state()
        try:
            sizes.update(state)
        except StaleDecodeGraph:
            sizes = DecodeGraphSizes(state, q_len=1)
            sizes.update(state)
            dec.decode_attention(q_s, state, out=out, **sizes.launch_kwargs())
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dec.decode_attention(q_s, state, out=out, **sizes.launch_kwargs())
        n = 200
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
        replay_wall = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n):
            dec.decode_attention(q_s, state, out=out)
        torch.cuda.synchronize()
        eager_wall = (time.perf_counter() - t0) / n * 1e6
        rows[preset] = {
            "context": layer.get_seq_length(), "steps": steps, "captures": captures,
            "max_rel_err_replay_vs_eager": max(errs), "replay_host_us_median": statistics.median(replay_host),
            "sizes_update_plus_replay_host_us": statistics.median(replay_host),
            "eager_host_us_median": statistics.median(eager_host), "replay_back_to_back_us": replay_wall,
            "eager_back_to_back_us": eager_wall,
        }  # fmt: skip
        r = rows[preset]
        print(
            f"graph {preset} ctx {r['context']}: {steps} steps, {captures} captures, max err vs eager "
            f"{r['max_rel_err_replay_vs_eager']:.1e} | host per step: sizes.update+replay "
            f"{r['replay_host_us_median']:.1f} us vs eager launch {r['eager_host_us_median']:.1f} us | back to "
            f"back: replay {replay_wall:.1f} us vs eager {eager_wall:.1f} us",
            flush=True,
        )
        del layer, graph
        torch.cuda.empty_cache()
    res["graph"] = rows


def section_prep_cpu(res: dict, n: int = 5000) -> None:
    """CPU-only (no GPU needed; run with TRITON_INTERPRET=1): Python preparation of one
    decode_attention call on a real SpectralLayer's state (Llama-8B attention shape, default
    preset with 64-token blocks, 40 blocks), the two launches replaced by no-ops."""
    from spectralcache.cache.layer import SpectralLayer
    from spectralcache.config import SpectralConfig

    cfg = SpectralConfig.from_preset("default", block_size=64, hot_size=32)
    layer = SpectralLayer(cfg, 0, head_dim=128, num_kv_heads=8)
    k = torch.randn(1, 8, 64 * 40 + 50, 128, dtype=torch.bfloat16)
    layer.update(k, torch.randn_like(k))
    layer.release_chunk()
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    layer.update(k[:, :, :1], k[:, :, :1])
    st = layer.state()
    saved = dec._SPLIT, dec._COMBINE
    dec._SPLIT = dec._COMBINE = lambda *args: None
    try:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                dec.decode_attention(q, st)
            runs.append((time.perf_counter() - t0) / n * 1e6)
    finally:
        dec._SPLIT, dec._COMBINE = saved
    res["prep_cpu"] = {"prep_us_runs": runs, "prep_us_min": min(runs), "calls_per_run": n}
    print(f"prep (CPU tensors, launches stubbed): {min(runs):.1f} us per call (min of 3 x {n})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", default="launch,layer,graph")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    commit = os.environ.get("SPECTRALCACHE_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        except Exception:
            commit = ""
    res: dict = {
        "command": " ".join(["python", *sys.argv]), "commit": commit or "unknown (no .git here)",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "host": platform.node(), "cpu": platform.processor(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    print(res, flush=True)
    for name in args.sections.split(","):
        try:
            sections = {"launch": section_launch, "layer": section_layer, "graph": section_graph}
            sections["prep_cpu"] = section_prep_cpu
            sections[name](res)
        except Exception:
            traceback.print_exc()
            res.setdefault("errors", []).append(f"{name}: {traceback.format_exc()[-1500:]}")
        (args.out / "decode_host_overhead.json").write_text(json.dumps(res, indent=1))
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
