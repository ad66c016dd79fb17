"""Decode-step benchmark: SpectralCache vs DynamicCache, measured side by side in one run.

Two measurements at a given context length (default 4096 tokens):

* ``model``: one full decode step (forward of one token with the cache) of a Gemma-3-like
  model with Gemma 3 270M's attention geometry (head_dim 256, 4 query heads, 1 KV head) but
  a small MLP / vocabulary, so attention is a large share of the step. Steps alternate
  between the two caches (same weights, same teacher-forced tokens) and the medians are
  compared, so load from other processes hits both alike.
* ``attention``: the attention call alone on one layer — ``spectral_attention`` over a state
  built by the real cache (compressed blocks, outliers, landmarks, hot buffer) against
  transformers' SDPA path over the full K/V a DynamicCache would hold.

Block compression is not part of a decode step: it happens once per ``block_size`` tokens.
It is reported separately (seconds per block, and amortized per generated token).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["configure", "main", "measure_attention", "measure_model_step", "run", "tiny_decode_model"]


def tiny_decode_model(
    head_dim: int = 256,
    q_heads: int = 4,
    kv_heads: int = 1,
    hidden: int = 256,
    layers: int = 2,
    vocab: int = 512,
    seed: int = 0,
) -> Any:
    """Gemma-3-like decoder, every layer full attention, random weights (built in code)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        layer_types=["full_attention"] * layers,
        max_position_embeddings=32768,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def measure_model_step(
    model: Any, tokens: int = 4096, steps: int = 30, warmup: int = 3, config: Any = None, seed: int = 0
) -> dict[str, Any]:
    """Median decode-step time with each cache after a ``tokens``-token prefill."""
    from transformers import DynamicCache

    from spectralcache.cache.cache import SpectralCache
    from spectralcache.config import SpectralConfig

    config = config or SpectralConfig()
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, tokens), generator=g)
    follow = torch.randint(3, vocab, (1, warmup + steps), generator=g)
    dynamic = DynamicCache(config=model.config)
    import spectralcache

    spectralcache.enable(model)  # explicit: the cache need not switch the model itself
    spectral = SpectralCache(model, config)
    times: dict[str, list[float]] = {"dynamic": [], "spectral": []}
    with torch.no_grad():
        t0 = time.perf_counter()
        model(prompt, past_key_values=dynamic, use_cache=True)
        prefill_dynamic = time.perf_counter() - t0
        t0 = time.perf_counter()
        model(prompt, past_key_values=spectral, use_cache=True)
        prefill_spectral = time.perf_counter() - t0
        for i in range(warmup + steps):
            tok = follow[:, i : i + 1]
            order = (("dynamic", dynamic), ("spectral", spectral))
            for name, cache in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                model(tok, past_key_values=cache, use_cache=True)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    report = spectral.memory_report()
    comp = report["compression"]
    block = config.block_size
    dyn_ms, spec_ms = _median_ms(times["dynamic"]), _median_ms(times["spectral"])
    return {
        "what": "model decode step",
        "tokens": tokens,
        "steps": steps,
        "key_space": config.key_space,
        "dynamic_ms": dyn_ms,
        "spectral_ms": spec_ms,
        "ratio": spec_ms / dyn_ms,
        "prefill_dynamic_s": prefill_dynamic,
        "prefill_spectral_s": prefill_spectral,
        "compression_blocks": comp["blocks"],
        "compression_s_per_block": comp["seconds_per_block"],
        "compression_ms_per_token_amortized": (
            comp["seconds_per_block"] * 1e3 / block if comp["seconds_per_block"] else None
        ),
        "memory_ratio_compressed_layers": report["compressed_layers"]["ratio"],
    }


def measure_attention(
    tokens: int = 4096,
    head_dim: int = 256,
    q_heads: int = 4,
    kv_heads: int = 1,
    steps: int = 50,
    config: Any = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One layer's decode attention: spectral over the compressed state vs SDPA over full K/V."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from spectralcache.attention.reference import spectral_attention
    from spectralcache.cache.layer import SpectralLayer
    from spectralcache.config import SpectralConfig

    config = config or SpectralConfig()
    if config.key_space != "post_rope":
        raise ValueError(
            "measure_attention builds post-RoPE states only; use measure_model_step for pre_rope"
        )
    g = torch.Generator().manual_seed(seed)
    # keys with a decaying spectrum (like real keys), values less so
    mix_k = torch.randn(head_dim, head_dim, generator=g) * torch.logspace(0, -2, head_dim)[:, None]
    mix_v = torch.randn(head_dim, head_dim, generator=g) * torch.logspace(0, -1, head_dim)[:, None]
    keys = torch.randn(1, kv_heads, tokens, head_dim, generator=g) @ mix_k
    values = torch.randn(1, kv_heads, tokens, head_dim, generator=g) @ mix_v
    layer = SpectralLayer(config, 0, head_dim=head_dim, num_kv_heads=kv_heads)
    t0 = time.perf_counter()
    layer.update(keys, values)
    compress_s = time.perf_counter() - t0
    layer.release_chunk()
    state = layer.state()
    query = torch.randn(1, q_heads, 1, head_dim, generator=g)

    class _Module(torch.nn.Module):
        num_key_value_groups = q_heads // kv_heads
        is_causal = True

    module = _Module()
    times: dict[str, list[float]] = {"dynamic": [], "spectral": []}
    with torch.no_grad():
        for i in range(steps + 5):
            fns = (
                ("dynamic", lambda: sdpa_attention_forward(module, query, keys, values, None)),
                ("spectral", lambda: spectral_attention(query, state, None)),
            )
            for name, fn in fns if i % 2 == 0 else fns[::-1]:
                t0 = time.perf_counter()
                fn()
                if i >= 5:
                    times[name].append(time.perf_counter() - t0)
    dyn_ms, spec_ms = _median_ms(times["dynamic"]), _median_ms(times["spectral"])
    return {
        "what": "attention call (one layer)",
        "tokens": tokens,
        "steps": steps,
        "key_space": config.key_space,
        "dynamic_ms": dyn_ms,
        "spectral_ms": spec_ms,
        "ratio": spec_ms / dyn_ms,
        "compression_blocks": layer.num_blocks,
        "compression_s_per_block": compress_s / max(layer.num_blocks, 1),
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="context length before the measured steps")
    parser.add_argument("--steps", type=int, default=30, help="measured decode steps per cache")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    parser.add_argument(
        "--key-space",
        choices=["post_rope", "pre_rope", "both"],
        default="both",
        help="SpectralConfig.key_space",
    )
    parser.add_argument(
        "--model",
        choices=["tiny", "gemma3-270m"],
        default="tiny",
        help="tiny: Gemma-3-like random model, every layer compressed; gemma3-270m: the real model "
        "(3 of 18 layers full attention, large vocabulary)",
    )
    parser.add_argument(
        "--out", default="benchmarks/results/decode_step.json", help="JSON file for the results ('' to skip)"
    )


def run(args: argparse.Namespace) -> int:
    from spectralcache.config import SpectralConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    spaces = ["post_rope", "pre_rope"] if args.key_space == "both" else [args.key_space]
    rows = []
    if args.model == "tiny":
        model = tiny_decode_model()
    else:
        from spectralcache.eval.model import load_model

        model = load_model(args.model, dtype=torch.float32)[0]
    for space in spaces:
        rows.append(
            measure_model_step(model, args.tokens, args.steps, config=SpectralConfig(key_space=space))
        )
    for row in rows:
        row["model"] = args.model
    rows.append(measure_attention(args.tokens, steps=max(args.steps, 30)))
    header = f"{'measurement':<28}{'key space':<11}{'tokens':>7}{'dynamic ms':>12}{'spectral ms':>13}{'ratio':>7}{'compress s/block':>18}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['what']:<28}{r['key_space']:<11}{r['tokens']:>7}{r['dynamic_ms']:>12.3f}"
            f"{r['spectral_ms']:>13.3f}{r['ratio']:>7.2f}{r['compression_s_per_block'] or 0:>18.4f}"
        )
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "command": "spectralcache bench decode "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k in ("tokens", "steps", "threads", "key_space")
        ),
        "results": rows,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))
