"""``spectralcache demo``: one ~4K-token needle question, plain cache vs SpectralCache.

Loads the embedded Gemma 3 270M (dequantized once and cached, see
:mod:`spectralcache.eval.model`), builds a RULER ``niah_single_1`` prompt with the task
generator (the template the uncompressed model answers correctly at 4K; seed 0, sample
0), and answers it twice with the runner's question protocol -- context prefilled into
the cache (and compressed there), then the question, then greedy decoding -- once with
transformers' ``DynamicCache`` and once with ``SpectralCache`` (preset ``default``).
Prints, per cache: the answer, whether it is correct, the KV bytes the cache holds
(measured from tensor storage), the compression ratio, and prefill / decode time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    parser.add_argument("--preset", default="default", help="SpectralConfig preset (default: default)")
    parser.add_argument("--task", default="niah_single_1", help="needle task (default niah_single_1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=0, help="which generated sample to ask (default 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--threads", default="auto", help="torch threads, or 'auto' (1 when the CPU is oversubscribed)"
    )


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f} MiB"


def demo(
    *,
    length: int = 4096,
    preset: str = "default",
    task: str = "niah_single_1",
    seed: int = 0,
    sample: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    threads: str | int = "auto",
    console: Any = None,
) -> list[dict]:
    """Run the demo and print its table; returns one dict per cache (for tests)."""
    from rich.console import Console
    from rich.table import Table

    from spectralcache.eval.methods import parse_methods
    from spectralcache.eval.model import choose_threads, load_model
    from spectralcache.eval.runner import answer
    from spectralcache.eval.scoring import score
    from spectralcache.eval.tasks import generate_samples

    if length < 256:
        raise ValueError(f"--length must be at least 256 tokens, got {length}")
    if sample < 0:
        raise ValueError(f"--sample must be >= 0, got {sample}")
    console = console or Console()
    t_start = time.perf_counter()
    n_threads = choose_threads(threads)
    methods = parse_methods(f"baseline,spectral:{preset}")  # validates the preset before any loading
    with console.status("loading Gemma 3 270M (first start: dequantizing the GGUF and caching it, ~1 min)"):
        model, tok, info = load_model(device=device, dtype=dtype, return_info=True)
    console.print(
        f"model from {info.source} in {info.seconds:.1f} s  ({info.cache_dir}); torch threads {n_threads}"
    )
    with console.status(f"building a {length}-token {task} prompt"):
        s = generate_samples(task, tokenizer=tok, length=length, num_samples=sample + 1, seed=seed)[sample]
    console.print(
        f"prompt: {s['context_tokens']} context tokens, needle at depth {s['depth']:.2f}; "
        f"question: {s['question'].strip()[:90]!r}"
    )
    rows = []
    base_bytes = base_full = None
    from spectralcache.eval.methods import full_attention_layers

    n_full = len(full_attention_layers(model.config))
    for m in methods:
        label = "DynamicCache (plain)" if m.is_baseline else f"SpectralCache ({preset})"
        with console.status(f"{label}: prefill {s['context_tokens']} tokens, then answer"):
            cache = m.make_cache(model)
            a = answer(model, tok, cache, s["context"], s["question"] + s["answer_prefix"],
                       max_new_tokens=s["max_new_tokens"])  # fmt: skip
        ok = bool(score(s["metric"], a.text, s["answers"]) == 1.0)
        if m.is_baseline:
            base_bytes, base_full = a.kv_bytes, a.kv_bytes_full
        rows.append(
            {
                "cache": label,
                "method": m.name,
                "answer": a.text,
                "correct": ok,
                "kv_bytes": a.kv_bytes,
                "kv_bytes_full": a.kv_bytes_full,
                "ratio": base_bytes / a.kv_bytes if base_bytes else None,
                "ratio_full": base_full / a.kv_bytes_full if base_full else None,
                "prefill_s": a.prefill_s,
                "decode_s": a.question_s + a.decode_s,
                "new_tokens": a.new_tokens,
            }
        )
        console.print(f"{label}: {a.text!r} ({'correct' if ok else 'wrong'})")
    table = Table(title=f"Needle in a {s['context_tokens']}-token haystack — expected {s['answers'][0]}")
    for col in ("cache", "answer", "ok", "KV all layers", f"KV {n_full} full-attn", "prefill s", "decode s"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["cache"],
            r["answer"],
            "yes" if r["correct"] else "no",
            f"{_mib(r['kv_bytes'])} {r['ratio']:.2f}x" if r["ratio"] else _mib(r["kv_bytes"]),
            f"{_mib(r['kv_bytes_full'])} {r['ratio_full']:.2f}x"
            if r["ratio_full"]
            else _mib(r["kv_bytes_full"]),
            f"{r['prefill_s']:.1f}",
            f"{r['decode_s']:.1f} ({r['new_tokens']} tok)",
        )
    console.print(table)
    console.print(
        f"KV: bytes held by all layers / by the {n_full} full-attention layers (the ones SpectralCache "
        "compresses) and the ratio against DynamicCache, measured from tensor storage when decoding starts; the "
        f"{model.config.num_hidden_layers - n_full} sliding-window layers are transformers' own in both caches. "
        f"Total demo time {time.perf_counter() - t_start:.0f} s."
    )
    return rows


def run(args: argparse.Namespace) -> int:
    demo(length=args.length, preset=args.preset, task=args.task, seed=args.seed, sample=args.sample,
         device=args.device, dtype=args.dtype, threads=args.threads)  # fmt: skip
    return 0
