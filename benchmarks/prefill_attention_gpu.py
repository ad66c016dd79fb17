"""One attention layer at Llama-3.1-8B shape on CUDA: SDPA vs spectral prefill, side by side.

    python benchmarks/prefill_attention_gpu.py [--tokens 32768] [--chunk 8192] [--preset default]

Shape: 32 query heads, 8 KV heads, head_dim 128, bf16, batch 1, random q/k/v. Rows (median of
``--repeats`` after a warm-up, CUDA events):

* ``sdpa_prefill``: what a DynamicCache layer runs for a one-call prefill: SDPA, causal, GQA;
* ``spectral_attention_prefill``: ``spectral_attention`` over the layer's state after that
  prefill (nothing precedes the chunk: plain SDPA) -- attention only;
* ``spectral_update_prefill``: ``SpectralLayer.update`` of the whole prompt (validation + block
  compression), reported so that update + attention compares with ``sdpa_prefill``;
* chunked prefill in ``--chunk``-token calls, each with the bool mask transformers passes once
  there is a past: ``sdpa_chunked`` (K/V repeated per query head, masked SDPA, as transformers'
  SDPA path does) vs ``spectral_chunked_attention`` (compressed tiers + SDPA chunk, merged by
  LSE), ``spectral_chunked_attention_dense_tiers`` (``tier_backend="dense_sdpa"``: the tiers
  rebuilt densely for the call and attended by SDPA too), ``spectral_chunked_attention_2e28``
  (compressed tiers in 4x larger query tiles) and ``spectral_chunked_update``;
* decode, one token over the full context: ``sdpa_decode`` vs ``spectral_decode_torch`` (the
  torch reference path; the fused Triton decode kernel is measured elsewhere).

Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _time(fn, repeats: int, cuda: bool) -> tuple[float, list[float]]:
    fn()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:  # CPU smoke runs of this script
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run(tokens: int, chunk: int, preset: str, repeats: int, device: str = "cuda") -> dict[str, Any]:
    from spectralcache import SpectralConfig
    from spectralcache.attention.reference import spectral_attention
    from spectralcache.cache.layer import SpectralLayer

    dev, dt = torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32
    hq, hkv, d = 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, hq, tokens, d, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, hkv, tokens, d, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, hkv, tokens, d, device=dev, dtype=dt, generator=g)
    cfg = SpectralConfig.from_preset(preset)

    def new_layer() -> SpectralLayer:
        return SpectralLayer(cfg, 0, head_dim=d, num_kv_heads=hkv)

    res: dict[str, Any] = {"tokens": tokens, "chunk": chunk, "preset": preset, "repeats": repeats}
    times: dict[str, float] = {}
    raw: dict[str, list[float]] = {}

    def record(name: str, fn) -> None:
        times[name], raw[name] = _time(fn, repeats, dev.type == "cuda")

    # ---- one-call prefill
    record("sdpa_prefill", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    layer = new_layer()
    layer.update(k, v)
    state = layer.state()
    record("spectral_attention_prefill", lambda: spectral_attention(q, state, None))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    res["prefill_max_abs_diff"] = float(
        (spectral_attention(q, state, None).float() - want.float()).abs().max()
    )
    layer.release_chunk()

    def update_all() -> None:
        new_layer().update(k, v)

    record("spectral_update_prefill", update_all)

    # ---- chunked prefill
    ends = list(range(chunk, tokens + 1, chunk))

    def chunk_mask(lo: int, hi: int) -> torch.Tensor:
        q_pos = torch.arange(lo, hi, device=dev)
        return (torch.arange(hi, device=dev)[None, :] <= q_pos[:, None])[None, None]

    masks = [None if e == chunk else chunk_mask(e - chunk, e) for e in ends]

    def sdpa_chunked() -> None:
        for e, m in zip(ends, masks, strict=True):
            qc = q[:, :, e - chunk : e]
            if m is None:
                F.scaled_dot_product_attention(qc, k[:, :, :e], v[:, :, :e], is_causal=True, enable_gqa=True)
            else:
                kr = k[:, :, :e].repeat_interleave(hq // hkv, dim=1)
                vr = v[:, :, :e].repeat_interleave(hq // hkv, dim=1)
                F.scaled_dot_product_attention(qc, kr, vr, attn_mask=m)

    record("sdpa_chunked", sdpa_chunked)
    # states after each chunk's update, built once: attention is timed on its own
    chunk_layer = new_layer()
    states = []
    for e in ends:
        chunk_layer.update(k[:, :, e - chunk : e], v[:, :, e - chunk : e])
        states.append(chunk_layer.state())
        chunk_layer.release_chunk()

    def spectral_chunked_attention() -> None:
        for e, m, st in zip(ends, masks, states, strict=True):
            spectral_attention(q[:, :, e - chunk : e], st, m)

    record("spectral_chunked_attention", spectral_chunked_attention)

    def spectral_chunked_dense_tiers() -> None:
        for e, m, st in zip(ends, masks, states, strict=True):
            spectral_attention(q[:, :, e - chunk : e], st, m, tier_backend="dense_sdpa")

    record("spectral_chunked_attention_dense_tiers", spectral_chunked_dense_tiers)

    def spectral_chunked_big_tiles() -> None:  # query tiles 4x the CUDA default (2**28 score floats)
        for e, m, st in zip(ends, masks, states, strict=True):
            spectral_attention(q[:, :, e - chunk : e], st, m, max_score_elements=1 << 28)

    record("spectral_chunked_attention_2e28", spectral_chunked_big_tiles)

    def spectral_chunked_update() -> None:
        lay = new_layer()
        for e in ends:
            lay.update(k[:, :, e - chunk : e], v[:, :, e - chunk : e])
            lay.release_chunk()

    record("spectral_chunked_update", spectral_chunked_update)

    # ---- decode over the full context
    dec_layer = new_layer()
    dec_layer.update(k[:, :, :-1], v[:, :, :-1])
    dec_layer.release_chunk()
    dec_layer.update(k[:, :, -1:], v[:, :, -1:])
    dec_state = dec_layer.state()
    q1 = q[:, :, -1:]
    record("sdpa_decode", lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True))
    record("spectral_decode_torch", lambda: spectral_attention(q1, dec_state, None))

    res["seconds"] = times
    res["raw_seconds"] = raw
    res["ratios"] = {
        "spectral_attention_prefill/sdpa_prefill": times["spectral_attention_prefill"]
        / times["sdpa_prefill"],
        "(spectral_update+attention)/sdpa_prefill": (
            times["spectral_update_prefill"] + times["spectral_attention_prefill"]
        )
        / times["sdpa_prefill"],
        "spectral_chunked_attention/sdpa_chunked": times["spectral_chunked_attention"]
        / times["sdpa_chunked"],
        "spectral_chunked_attention_dense_tiers/sdpa_chunked": times["spectral_chunked_attention_dense_tiers"]
        / times["sdpa_chunked"],
        "spectral_chunked_attention_2e28/sdpa_chunked": times["spectral_chunked_attention_2e28"]
        / times["sdpa_chunked"],
        "(spectral_chunked update+attention)/sdpa_chunked": (
            times["spectral_chunked_update"] + times["spectral_chunked_attention"]
        )
        / times["sdpa_chunked"],
        "spectral_decode_torch/sdpa_decode": times["spectral_decode_torch"] / times["sdpa_decode"],
    }
    res["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    res["torch"] = torch.__version__
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill_attention_gpu.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu for a smoke run)")
    res = run(args.tokens, args.chunk, args.preset, args.repeats, args.device)
    print(
        f"{res['device']}, torch {res['torch']}, {args.tokens} tokens, chunk {args.chunk}, preset {args.preset}"
    )
    for name, sec in res["seconds"].items():
        print(f"{name:<40}{sec * 1e3:>12.2f} ms")
    for name, r in res["ratios"].items():
        print(f"{name:<52}{r:>8.2f}x")
    print(f"one-call prefill: max |spectral - sdpa| = {res['prefill_max_abs_diff']:.3g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
