"""The ``spectralcache`` command.

Each subcommand lives in the module that owns its idea; that module exposes
``configure(parser)`` (adds its arguments) and ``run(args) -> int``. Modules are
imported only when their subcommand is chosen, so ``--help`` stays fast and an
optional dependency missing for one subcommand does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("spectralcache.eval.demo", "needle demo on the embedded Gemma 3 270M: plain vs spectral cache"),
    "eval": (
        "spectralcache.eval.cli",
        "evaluation harness: RULER-style tasks, needle sweeps, perplexity, spectra",
    ),
    "bench": ("spectralcache.bench.cli", "micro-benchmarks (randomized SVD, decode step)"),
    "plot": ("spectralcache.eval.plots", "redraw plots from the JSON results in a directory"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectralcache",
        description="Spectral KV-cache compression for Hugging Face transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module_name).configure(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in SUBCOMMANDS:
        selected = None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
