"""Prefill on CPU: DynamicCache vs SpectralCache side by side in one process, table + JSON.

    python benchmarks/prefill_cpu.py [--tokens 8192] [--repeats 3] [--threads 1] [--chunk 2048]

Model: a random-weight Llama (4 layers, hidden 512, 8 query / 2 KV heads, head_dim 64), built
in code. Rows (same weights, same random prompt; variants alternate inside every repeat so
load from other processes hits them alike):

* ``dynamic``: transformers' DynamicCache, one forward over the whole prompt (SDPA);
* ``spectral``: SpectralCache (preset ``--preset``), one forward: the chunk goes through SDPA,
  block compression included;
* ``spectral_torch_chunk``: the same, but the chunk attended by the float32 torch tier path
  (``chunk_backend="torch"``: what every prefill did before the SDPA route);
* ``dynamic_chunked`` / ``spectral_chunked``: the prompt fed in ``--chunk``-token forward
  calls, so later chunks attend an already compressed cache (tiers + SDPA chunk, merged by LSE);
  ``spectral_chunked_dense_tiers`` with ``tier_backend="dense_sdpa"`` (tiers rebuilt densely per
  call and attended by SDPA too).

Each time is the median over repeats of the process CPU time (``time.process_time``, one
thread: insensitive to other processes stealing the core) and of wall time; the load average
is recorded. ``logits_to_keep=1`` as in ``generate``'s prefill.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def tiny_llama(seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=65536,
        initializer_range=0.02,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def _prefill(model: Any, ids: torch.Tensor, make_cache, chunk: int | None) -> None:
    cache = make_cache()
    step = ids.shape[1] if chunk is None else chunk
    with torch.inference_mode():
        for lo in range(0, ids.shape[1], step):
            model(input_ids=ids[:, lo : lo + step], past_key_values=cache, use_cache=True, logits_to_keep=1)


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(tokens: int, repeats: int, chunk: int, preset: str) -> dict[str, Any]:
    from transformers import DynamicCache

    import spectralcache
    import spectralcache.attention.reference as ref
    from spectralcache import SpectralCache, SpectralConfig

    model = tiny_llama()
    # the "spectral" attention reads compressed layers; for any other cache it is transformers' SDPA
    spectralcache.enable(model)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    spectral = functools.partial(SpectralCache, model, SpectralConfig.from_preset(preset))
    dynamic = functools.partial(DynamicCache, config=model.config)

    def with_defaults(fn, **defaults):
        """Run ``fn`` with ``spectral_attention``'s keyword defaults changed (whoever calls it)."""

        def run_it() -> None:
            saved = dict(ref.spectral_attention.__kwdefaults__)
            ref.spectral_attention.__kwdefaults__.update(defaults)
            try:
                fn()
            finally:
                ref.spectral_attention.__kwdefaults__.update(saved)

        return run_it

    variants = {
        "dynamic": lambda: _prefill(model, ids, dynamic, None),
        "spectral": lambda: _prefill(model, ids, spectral, None),
        # every query through the float32 torch tier path: what every prefill did before the SDPA route
        "spectral_torch_chunk": with_defaults(
            lambda: _prefill(model, ids, spectral, None), chunk_backend="torch"
        ),
        "dynamic_chunked": lambda: _prefill(model, ids, dynamic, chunk),
        "spectral_chunked": lambda: _prefill(model, ids, spectral, chunk),
        "spectral_chunked_dense_tiers": with_defaults(
            lambda: _prefill(model, ids, spectral, chunk), tier_backend="dense_sdpa"
        ),
    }
    _prefill(model, ids[:, :1024], spectral, None)  # warm-up (lazy imports, allocator)
    _prefill(model, ids[:, :1024], dynamic, None)
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    return {
        "tokens": tokens,
        "chunk": chunk,
        "preset": preset,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cpu_s": cpu,
        "wall_s": wall,
        "median_cpu_s": med_cpu,
        "median_wall_s": med_wall,
        "ratio_cpu": {
            "spectral/dynamic": med_cpu["spectral"] / med_cpu["dynamic"],
            "spectral_torch_chunk/dynamic": med_cpu["spectral_torch_chunk"] / med_cpu["dynamic"],
            "spectral_chunked/dynamic_chunked": med_cpu["spectral_chunked"] / med_cpu["dynamic_chunked"],
            "spectral_chunked_dense_tiers/dynamic_chunked": med_cpu["spectral_chunked_dense_tiers"]
            / med_cpu["dynamic_chunked"],
        },
        "load_avg_1min": load,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": "random Llama: 4 layers, hidden 512, 8/2 heads, head_dim 64, fp32",
        "commit": _commit(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--out", type=Path, default=RESULTS / "prefill_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.tokens, args.repeats, args.chunk, args.preset)
    print(f"prefill of {res['tokens']} tokens, {res['model']}, {res['threads']} thread(s), {res['machine']}")
    print(f"load average (1 min) during the run: {', '.join(f'{x:.1f}' for x in res['load_avg_1min'])}")
    print(f"{'variant':<30}{'cpu s (median)':>16}{'wall s (median)':>17}")
    for name in res["median_cpu_s"]:
        print(f"{name:<30}{res['median_cpu_s'][name]:>16.2f}{res['median_wall_s'][name]:>17.2f}")
    for name, r in res["ratio_cpu"].items():
        print(f"{name:<46} {r:.2f}x (cpu time)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
