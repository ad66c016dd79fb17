"""``spectralcache bench <name> [options]``: dispatcher for the micro-benchmarks.

Each benchmark is a module exposing ``configure(parser)`` and ``run(args) -> int`` (the
same contract as the top-level CLI) and becomes a sub-subcommand with its own options
and ``--help``. A benchmark whose module fails to import is reported when chosen and
does not break the others. Add a benchmark by adding a line to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "svd": (
        "spectralcache.bench.svd",
        "randomized SVD vs torch.linalg.svd / torch.svd_lowrank: latency, error, sweeps",
    ),
    "decode": ("spectralcache.bench.decode", "decode step: SpectralCache vs DynamicCache side by side"),
    "attention": (
        "spectralcache.bench.attention",
        "one decode-attention layer (Llama-8B shape): dense SDPA vs Triton kernel vs torch reference, GB/s",
    ),
    "e2e": (
        "spectralcache.bench.e2e",
        "random Llama-8B-shaped model: prefill s, decode ms/token, peak memory, KV bytes per cache",
    ),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="{" + ",".join(BENCHMARKS) + "}")
    sub.required = True
    for name, (module_name, help_text) in BENCHMARKS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_bench_module=module_name)
        try:
            # Benchmark modules import only torch and the standard library at module
            # level, so configuring all of them is cheap; heavy imports live in run().
            importlib.import_module(module_name).configure(sp)
        except ImportError as err:  # keep the other benchmarks usable
            sp.set_defaults(_bench_import_error=f"{name}: {err}")


def run(args: argparse.Namespace) -> int:
    err = getattr(args, "_bench_import_error", None)
    if err:
        raise SystemExit(f"spectralcache bench {err}")
    module = importlib.import_module(args._bench_module)
    return int(module.run(args) or 0)
