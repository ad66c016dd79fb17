"""``spectralcache eval``: the evaluation harness on the command line.

::

    spectralcache eval [tasks] --tasks niah_single_1,vt --lengths 4096 --methods baseline,spectral:default \\
        --samples 20 --out DIR [--device cpu|cuda] [--dtype float32|bfloat16] [--seed 0]
    spectralcache eval needle --lengths 1024,2048,4096,8192 --depths 0,0.25,0.5,0.75,1 --methods ... --out DIR
    spectralcache eval perplexity --prefill 2048 --continue 512 --methods ... --out DIR
    spectralcache eval spectrum --length 4096 --out DIR

Without a sub-command, ``eval`` runs the tasks. Everything is resumable: rerun the same
command and finished samples are skipped. Plots are (re)drawn at the end of each run;
``spectralcache plot DIR`` redraws them from the JSON alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUBS = ("tasks", "needle", "perplexity", "spectrum")


def _int_list(text: str) -> list[int]:
    def one(x: str) -> int | None:
        x = x.strip().lower()
        if not x:
            return None
        return int(x[:-1]) * 1024 if x.endswith("k") else int(x)

    try:
        vals = [one(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v is None or v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals  # type: ignore[return-value]


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return vals


def _str_list(text: str) -> list[str]:
    vals = [x.strip() for x in text.split(",")]
    if not all(vals):
        raise argparse.ArgumentTypeError(f"empty name in {text!r}")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _methods(text: str):
    from spectralcache.eval.methods import parse_methods

    try:
        return parse_methods(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common(p: argparse.ArgumentParser, *, methods: bool = True, top: bool = False) -> None:
    # On the bare `eval` parser --out cannot be required: `eval needle --out X` gives it to the
    # sub-parser, and argparse would still demand it from the parent. run() checks it.
    p.add_argument("--out", type=Path, required=not top, help="results directory (created; reused to resume)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--seed", type=int, default=0, help="task generation and per-sample torch seed (default 0)"
    )
    p.add_argument("--model", default="gemma3-270m", help="model (default gemma3-270m, the embedded package)")
    p.add_argument(
        "--threads", default="auto", help="torch threads, or 'auto' (1 when the CPU is oversubscribed)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="write JSON only")
    if methods:
        p.add_argument(
            "--methods",
            type=_methods,
            default=None,
            help="comma-separated methods, e.g. baseline,spectral:default,spectral:rank_keys=16,rank_values=32,"
            "quantized:int4,streaming:sinks=4,window=1024 (baseline always runs first)",
        )


def _task_args(p: argparse.ArgumentParser, *, needle: bool, top: bool = False) -> None:
    _common(p, top=top)
    if needle:
        p.add_argument("--task", default="niah_single_1", help="the needle task (default niah_single_1)")
        p.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192])
        p.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
        p.add_argument(
            "--samples", type=_positive, default=2, help="samples per (length, depth) cell (default 2)"
        )
    else:
        p.add_argument("--tasks", type=_str_list, default=["niah_single_1", "niah_multikey_2", "vt"])
        p.add_argument("--lengths", type=_int_list, default=[4096])
        p.add_argument(
            "--samples", type=_positive, default=20, help="samples per (task, length) (default 20)"
        )
    p.add_argument(
        "--no-stop-newline",
        action="store_true",
        help="decode the full budget (RULER) instead of stopping at a newline",
    )
    p.add_argument(
        "--prefill-chunk", type=_positive, default=None, help="prefill in chunks of this many tokens"
    )
    p.add_argument(
        "--max-new-tokens", type=_positive, default=None, help="override the samples' decode budget"
    )


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{" + ",".join(SUBS) + "}")
    _task_args(parser, needle=False, top=True)  # `spectralcache eval --tasks ...` = `eval tasks ...`
    _task_args(sub.add_parser("tasks", help="RULER-style tasks (the default)"), needle=False)
    _task_args(sub.add_parser("needle", help="needle sweep over length x depth -> heatmap"), needle=True)
    pp = sub.add_parser("perplexity", help='perplexity, protocol "prefill, compress, continue"')
    _common(pp)
    pp.add_argument("--prefill", type=_positive, default=2048)
    pp.add_argument("--continue", dest="cont", type=_positive, default=512)
    pp.add_argument("--segments", type=_positive, default=1, help="text segments per method (default 1)")
    pp.add_argument(
        "--mode", choices=("step", "chunk"), default="step", help="token by token (default) or chunked"
    )
    pp.add_argument("--chunk", type=_positive, default=128, help="tokens per call in --mode chunk")
    sp = sub.add_parser("spectrum", help="singular-value spectra of real Gemma K/V per compressed layer")
    _common(sp, methods=False)
    sp.add_argument("--length", type=_positive, default=4096, help="prompt tokens to capture (default 4096)")
    sp.add_argument("--block-size", type=_positive, default=512)


def _need_methods(args: argparse.Namespace):
    from spectralcache.eval.methods import parse_methods

    return args.methods if args.methods is not None else parse_methods("baseline,spectral:default")


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "eval_command", None) or "tasks"
    if args.out is None:
        print("spectralcache eval: error: the following arguments are required: --out", file=sys.stderr)
        return 2
    from spectralcache.eval.model import choose_threads

    try:
        print(f"torch threads: {choose_threads(args.threads)}", file=sys.stderr)
    except ValueError as err:
        print(f"spectralcache eval: error: {err}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    if cmd == "spectrum":
        from spectralcache.eval.spectrum import run_spectrum

        run_spectrum(
            args.out,
            length=args.length,
            block_size=args.block_size,
            device=args.device,
            dtype=args.dtype,
            model_name=args.model,
            seed=args.seed,
            plots=not args.no_plots,
        )
        return 0

    from spectralcache.eval.model import load_model

    methods = _need_methods(args)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    if cmd == "perplexity":
        from spectralcache.eval.perplexity import run_perplexity

        res = run_perplexity(
            model, tok, methods, prefill=args.prefill, cont=args.cont, num_segments=args.segments,
            mode=args.mode, chunk=args.chunk, out=args.out, seed=args.seed, progress=progress,
            device=args.device, dtype=args.dtype,
        )  # fmt: skip
        from spectralcache.eval.perplexity import perplexity_table

        print(perplexity_table(res))
    else:
        from spectralcache.eval.runner import RunOptions, run_eval, summary_table

        opts = RunOptions(
            out=args.out, samples=args.samples, seed=args.seed, device=args.device, dtype=args.dtype,
            model_name=args.model, stop_newline=not args.no_stop_newline, prefill_chunk=args.prefill_chunk,
            max_new_tokens=args.max_new_tokens, progress=progress,
        )  # fmt: skip
        if cmd == "needle":
            summaries = run_eval(
                [args.task], args.lengths, methods, opts, depths=args.depths, model=model, tokenizer=tok
            )
        else:
            summaries = run_eval(args.tasks, args.lengths, methods, opts, model=model, tokenizer=tok)
        print(summary_table(summaries))
    if not args.no_plots:
        from spectralcache.eval.plots import draw_all

        for p in draw_all(args.out):
            print(f"wrote {p}", file=sys.stderr)
    return 0
