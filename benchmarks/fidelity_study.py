"""Fidelity levers (issue 9) on the real Gemma 3 270M: accuracy vs measured KV reduction.

Two steps, both rerunnable:

``run``: the evaluation harness (``spectralcache eval tasks``) on the chosen tasks / lengths with
the lever methods, into ``OUT/eval`` (resumable: finished samples are skipped; samples run
outermost, so a stopped run has every method on the same samples)::

    OMP_NUM_THREADS=1 python benchmarks/fidelity_study.py run --samples 10

``report``: summarizes whatever ``OUT/eval`` holds (a partial run too) into ``OUT/fidelity.json``
(per task x length x method: n, accuracy, the measured reduction on the compressed layers =
``compression_ratio_full``, i.e. the baseline's bytes on the full-attention layers over the
method's, both from ``SpectralCache.memory_report``-style held bytes after the answer was
generated) and a Pareto plot ``OUT/pareto_<length>.png``::

    python benchmarks/fidelity_study.py report

``ppl``: perplexity by the protocol "prefill, compress, continue" (``P = 2048``, ``N = 512``,
2 segments) for the same methods, into ``OUT/perplexity``::

    OMP_NUM_THREADS=1 python benchmarks/fidelity_study.py ppl

``bytes``: one layer's measured reduction (held bytes after a prefill, random K/V) against prompt
length, with and without a lever, at a given shape (default the Llama-3.1-8B layer: head_dim 128,
8 KV heads, bfloat16)::

    OMP_NUM_THREADS=1 python benchmarks/fidelity_study.py bytes

Every number in the report carries its ``n``; with few samples per cell the accuracy moves in
steps of 100/n points, so read differences smaller than that as noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spectralcache.eval.methods import parse_value
from spectralcache.eval.scoring import PairedComparison, paired_comparison

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fidelity"
DEFAULT_TASKS = "niah_single_1,niah_multikey_1"
# baseline first (every ratio is against it, on the same sample); then the levers
DEFAULT_METHODS = ",".join(
    [
        "baseline",
        "spectral:default",
        "spectral:default,compress_tail=true",
        "spectral:default,value_codec=identity",
        "spectral:default,value_codec=identity,compress_tail=true",
    ]
)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cmd_run(args: argparse.Namespace) -> int:
    from spectralcache.cli import main as cli_main

    if args.one_call:
        # the runner looks ``answer`` up at call time: swap in its one-call protocol
        from spectralcache.eval import runner

        runner.answer = functools.partial(runner.answer, one_call=True)
    out = Path(args.out) / "eval"
    argv = [
        "eval", "tasks",
        "--tasks", args.tasks,
        "--lengths", args.lengths,
        "--samples", str(args.samples),
        "--methods", args.methods,
        "--out", str(out),
        "--threads", str(args.threads),
        "--device", args.device,
        "--dtype", args.dtype,
        "--no-plots",
    ]  # fmt: skip
    if args.no_progress:
        argv.append("--no-progress")
    out.mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "runs.log", "a") as log:
        log.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} commit {_git_commit()} "
            f"host {platform.node()} ({platform.processor() or platform.machine()}): "
            f"{'[one-call prefill: context + question in one forward] ' if args.one_call else ''}"
            f"spectralcache {' '.join(argv)}\n"
        )
    return cli_main(argv)


def _needle_token_span(tokenizer: Any, context: str, answer: str) -> list[int]:
    """Token indices (with BOS) of the context tokens that spell ``answer`` (the needle's value)."""
    at = context.find(answer)
    if at < 0:
        raise ValueError(f"answer {answer!r} not found in the context")
    enc = tokenizer(context, add_special_tokens=True, return_offsets_mapping=True)
    end = at + len(answer)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > at]


def _exact_fraction(layer: Any, tokens: list[int]) -> float:
    """Share of ``tokens`` (cache indices) the layer serves exactly: landmarks, hot, or an
    outlier of its block (summed over KV heads)."""
    st = layer.state()
    n_lm, hot = st.landmark_keys.shape[-2], st.hot_start
    exact = total = 0
    heads = st.hot_keys.shape[1]
    for p in tokens:
        for h in range(heads):
            total += 1
            if p < n_lm or p >= hot:
                exact += 1
                continue
            t = st.cold.block_size
            block, row = (p - n_lm) // t, (p - n_lm) % t
            exact += int(row in st.cold.outlier_index[0, h, block].tolist())
    return exact / total


def cmd_needles(args: argparse.Namespace) -> int:
    """Which protocol lets ``outlier_selection`` see the question: for each sample, method and
    protocol (two calls: context then question, as the runner; one call), the share of the needle
    value's tokens each compressed layer serves exactly, right after the question was prefilled."""
    from spectralcache import SpectralCache, SpectralConfig
    from spectralcache.cache.layer import SpectralLayer
    from spectralcache.eval.model import load_model
    from spectralcache.eval.runner import prefill, task_path
    from spectralcache.eval.tasks import read_task_file

    torch.set_num_threads(int(args.threads))
    model, tok = load_model(dtype=torch.float32)
    rows = []
    for task in args.tasks.split(","):
        samples = read_task_file(task_path(Path(args.out) / "eval", task, int(args.length)))[: args.samples]
        for s in samples:
            ctx = tok(s["context"], return_tensors="pt", add_special_tokens=True).input_ids
            q = tok(
                s["question"] + s["answer_prefix"], return_tensors="pt", add_special_tokens=False
            ).input_ids
            needle = _needle_token_span(tok, s["context"], s["answers"][0])
            for spec in args.methods.split(";"):
                preset, *kv = spec.split(",")
                overrides = {}
                for item in kv:
                    key, val = item.split("=")
                    overrides[key] = parse_value(val)
                for protocol in ("two_call", "one_call"):
                    cache = SpectralCache(model, SpectralConfig.from_preset(preset, **overrides))
                    with torch.inference_mode():
                        if protocol == "two_call":
                            prefill(model, cache, ctx)
                            prefill(model, cache, q)
                        else:
                            prefill(model, cache, torch.cat([ctx, q], dim=1))
                    layers = {i: la for i, la in enumerate(cache.layers) if isinstance(la, SpectralLayer)}
                    row = {
                        "id": s["id"],
                        "task": task,
                        "method": spec,
                        "protocol": protocol,
                        "needle_tokens": needle,
                        "exact_share_per_layer": {i: _exact_fraction(la, needle) for i, la in layers.items()},
                    }
                    row["exact_share_mean"] = sum(row["exact_share_per_layer"].values()) / len(layers)
                    print(json.dumps({k: row[k] for k in ("id", "method", "protocol", "exact_share_mean")}))
                    rows.append(row)
    out = Path(args.out) / "needles.json"
    out.write_text(json.dumps({"commit": _git_commit(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    """The perplexity protocol "prefill, compress, continue" with the same methods."""
    from spectralcache.cli import main as cli_main

    out = Path(args.out) / "perplexity"
    argv = [
        "eval", "perplexity",
        "--prefill", str(args.prefill),
        "--continue", str(args.cont),
        "--segments", str(args.segments),
        "--methods", args.methods,
        "--out", str(out),
        "--threads", str(args.threads),
        "--no-plots",
        "--no-progress",
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "runs.log", "a") as log:
        log.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} commit {_git_commit()} "
            f"host {platform.node()}: spectralcache {' '.join(argv)}\n"
        )
    return cli_main(argv)


def summaries(eval_dir: Path) -> list[dict]:
    """One summary per (method, task file) found under ``eval_dir/predictions`` with at least
    one answered sample."""
    from spectralcache.eval.runner import task_summaries

    return [s for s in task_summaries(eval_dir) if s["n"]]


def paired_baseline(eval_dir: Path, method_slug: str, stem: str) -> PairedComparison | None:
    """This method against the baseline on exactly the samples both answered without error
    (paired: the same prompts, scored as the accuracy column scores them), or None when they
    share none."""
    from spectralcache.eval.runner import sample_scores

    mine = sample_scores(eval_dir, method_slug, stem)
    base = sample_scores(eval_dir, "baseline", stem)
    both = [sid for sid in mine if sid in base]
    if not both:
        return None
    return paired_comparison([mine[s] for s in both], [base[s] for s in both])


def _field(c: PairedComparison | None, name: str) -> float | None:
    return None if c is None else getattr(c, name)


def per_sample_reduction_min(eval_dir: Path, method_slug: str, stem: str) -> float | None:
    """The smallest per-sample ``compression_ratio_full`` of a method's answered samples: the
    reduction varies with each prompt's length, and a ">= X" bar must hold on every sample, not
    only on the mean the summary reports."""
    from spectralcache.eval.runner import latest_rows, predictions_path, read_rows

    ratios = [
        r["compression_ratio_full"]
        for r in latest_rows(read_rows(predictions_path(eval_dir, method_slug, stem))).values()
        if r.get("error") is None and r.get("compression_ratio_full")
    ]
    return min(ratios) if ratios else None


_SHORT = (
    ("spectral:", ""),
    ("key_codec=identity,value_codec=identity,value_coeff_bits=4,outliers_per_block=8", "idK8+idV4,o8"),
    ("key_codec=channel", "chK"),
    # the value bits are coeff_bits / value_coeff_bits, spelled out in the method
    ("value_codec=identity", "idV"),
    ("compress_tail=True", "tail"),
    ("outlier_selection=attention", "sel=attn"),
    ("outlier_selection=mixed", "sel=mixed"),
)


def short_name(method: str) -> str:
    for a, b in _SHORT:
        method = method.replace(a, b)
    return method


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (higher reduction and higher accuracy are better)."""
    keep = []
    for i, (r, a) in enumerate(points):
        if not any(
            (r2 >= r and a2 >= a) and (r2 > r or a2 > a) for j, (r2, a2) in enumerate(points) if j != i
        ):
            keep.append(i)
    return keep


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    rows = summaries(out / "eval")
    if not rows:
        print(f"no predictions under {out / 'eval'}", file=sys.stderr)
        return 1
    paired = {
        (s["method_slug"], s["stem"]): paired_baseline(out / "eval", s["method_slug"], s["stem"])
        for s in rows
    }
    table = [
        {
            "task": s["task"],
            "length": s["target_length"],
            "method": s["method"],
            "n": s["n"],
            "n_errors": s["n_errors"],
            "accuracy": s["score"],
            # the baseline on exactly these samples (runs of different lengths share the baseline)
            "baseline_accuracy_same_samples": _field(paired[(s["method_slug"], s["stem"])], "reference"),
            # paired against the baseline on the same samples (eval/scoring.paired_comparison):
            # points, 95 % interval, samples won / lost, exact sign-test p
            "vs_baseline": None
            if s["method"] == "baseline" or paired[(s["method_slug"], s["stem"])] is None
            else dataclasses.asdict(paired[(s["method_slug"], s["stem"])]),
            "agree_with_baseline": s["agree_with_baseline"],
            "reduction_compressed_layers": 1.0 if s["method"] == "baseline" else s["compression_ratio_full"],
            "reduction_compressed_layers_min": 1.0
            if s["method"] == "baseline"
            else per_sample_reduction_min(out / "eval", s["method_slug"], s["stem"]),
            "reduction_all_layers": 1.0 if s["method"] == "baseline" else s["compression_ratio"],
            "kv_bytes_full_attention_layers": s["kv_bytes_full"],
            "prefill_s": s["prefill_s"],
        }
        for s in rows
    ]
    table.sort(key=lambda r: (r["length"], r["task"], r["method"] != "baseline", r["method"]))
    result = {
        "what": "accuracy vs measured KV reduction on the compressed (full-attention) layers, Gemma 3 270M",
        "commit": _git_commit(),
        "eval_dir": str((out / "eval").relative_to(ROOT))
        if (out / "eval").is_relative_to(ROOT)
        else str(out),
        "rows": table,
    }
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| task | length | method | n | accuracy % | baseline on the same samples % | same answer as baseline % "
        "| Δ vs baseline, points (95 % CI) | won / lost vs baseline (p) "
        "| reduction (compressed layers) | smallest per sample |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.0f}"
        base = r["baseline_accuracy_same_samples"]
        base = "—" if base is None else f"{base:.0f}"
        agree = "—" if r["agree_with_baseline"] is None else f"{r['agree_with_baseline']:.0f}"
        red = "—" if r["reduction_compressed_layers"] is None else f"{r['reduction_compressed_layers']:.2f}×"
        low = r["reduction_compressed_layers_min"]
        low = "—" if low is None else f"{low:.3f}×"
        vs = r["vs_baseline"]
        delta = (
            "—" if vs is None else f"{vs['difference']:+.1f} ({vs['ci_low']:+.0f} to {vs['ci_high']:+.0f})"
        )
        split = "—" if vs is None else f"{vs['wins']} / {vs['losses']} (p {vs['p_value']:.2f})"
        lines.append(
            f"| {r['task']} | {r['length']} | {r['method']} | {r['n']} | {acc} | {base} | {agree} "
            f"| {delta} | {split} | {red} | {low} |"
        )
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.no_plots:
        for path in _plot(table, out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _plot(table: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for length in sorted({r["length"] for r in table}):
        tasks = sorted({r["task"] for r in table if r["length"] == length})
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 6.5), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            pts = [
                r
                for r in table
                if r["length"] == length and r["task"] == task and r["accuracy"] is not None
                and r["reduction_compressed_layers"] is not None
            ]  # fmt: skip
            xy = [(r["reduction_compressed_layers"], r["accuracy"]) for r in pts]
            front = set(pareto_front(xy))
            markers = "osD^v<>Pp*hX"
            for i, r in enumerate(pts):
                x, y = xy[i]
                ax.scatter(
                    [x], [y], s=70 if i in front else 35, marker=markers[i % len(markers)],
                    label=f"{short_name(r['method'])} (n={r['n']}){' *' if i in front else ''}",
                )  # fmt: skip
            fx = sorted((xy[i] for i in front), key=lambda p: p[0])
            if fx:
                ax.plot([p[0] for p in fx], [p[1] for p in fx], "--", lw=0.8, color="gray")
            ax.set_title(f"{task} @ {length}")
            ax.set_xlabel("measured reduction on compressed layers (×)")
            ax.set_ylabel("accuracy %")
            ax.set_ylim(-5, 105)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)
        fig.suptitle(
            "Gemma 3 270M, float32, CPU: accuracy vs measured KV reduction (* = Pareto front, dashed)"
        )
        fig.tight_layout()
        path = out / f"pareto_{length}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends sit below the axes
        plt.close(fig)
        written.append(path)
    return written


def layer_bytes(cfg, length: int, head_dim: int, kv_heads: int, dtype) -> dict:
    """Held bytes of one ``SpectralLayer`` after a one-call prefill of ``length`` tokens (random
    K/V: the bytes do not depend on the content) against a dense layer's ``2 * length * H * D``."""
    import torch

    from spectralcache.cache.layer import SpectralLayer
    from spectralcache.cache.memory import held_bytes

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, kv_heads, length, head_dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, length, head_dim, generator=g).to(dtype)
    layer = SpectralLayer(cfg, 0, head_dim=head_dim, num_kv_heads=kv_heads)
    layer.update(k, v)
    layer.release_chunk()
    tiers = {name: held_bytes(*ts) for name, ts in layer.tier_tensors().items()}
    held = sum(tiers.values())
    dense = 2 * length * kv_heads * head_dim * k.element_size()
    return {
        "length": length,
        "held_bytes": held,
        "dense_bytes": dense,
        "reduction": dense / held,
        "blocks": layer.num_blocks,
        "block_size": layer.block_size,
        "exact_recent_tokens": layer.hot_len,
        "tiers": tiers,
    }


def cmd_bytes(args: argparse.Namespace) -> int:
    """Measured reduction of one layer vs prompt length, with and without ``compress_tail``."""
    import torch

    from spectralcache.config import SpectralConfig

    torch.set_num_threads(1)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for method in args.methods.split(";"):
        preset, *opts = method.split(",")
        overrides = {}
        for o in opts:
            key, value = o.split("=")
            overrides[key] = parse_value(value)
        cfg = SpectralConfig.from_preset(preset, **overrides)
        for n in lengths:
            r = layer_bytes(cfg, n, args.head_dim, args.kv_heads, dtype)
            r["method"] = method
            rows.append(r)
            print(
                f"{method:40s} {n:6d} tokens: {r['reduction']:.2f}x  ({r['blocks']} blocks of {r['block_size']}, "
                f"{r['exact_recent_tokens']} recent tokens exact)",
                flush=True,
            )
    result = {
        "what": "held bytes of one compressed layer after a one-call prefill vs the dense K/V bytes",
        "shape": {"head_dim": args.head_dim, "kv_heads": args.kv_heads, "dtype": args.dtype},
        "commit": _git_commit(),
        "rows": rows,
    }
    path = Path(args.out) / f"bytes_hd{args.head_dim}_h{args.kv_heads}_{args.dtype}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results directory (default {DEFAULT_OUT})")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the evaluation harness (resumable)")
    r.add_argument("--tasks", default=DEFAULT_TASKS)
    r.add_argument("--lengths", default="4096")
    r.add_argument("--samples", type=int, default=10)
    r.add_argument("--methods", default=DEFAULT_METHODS)
    r.add_argument("--threads", default="1")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument(
        "--one-call",
        action="store_true",
        help="prefill context and question in one forward (runner.answer(one_call=True)); use its own --out",
    )
    rep = sub.add_parser("report", help="summarize OUT/eval into fidelity.json / .md and Pareto plots")
    rep.add_argument("--no-plots", action="store_true")
    pp = sub.add_parser("ppl", help='perplexity, "prefill, compress, continue" (P=2048, N=512)')
    pp.add_argument("--prefill", type=int, default=2048)
    pp.add_argument("--continue", dest="cont", type=int, default=512)
    pp.add_argument("--segments", type=int, default=2)
    pp.add_argument("--methods", default=DEFAULT_METHODS)
    pp.add_argument("--threads", default="1")
    by = sub.add_parser("bytes", help="one layer's measured reduction vs prompt length (random K/V)")
    by.add_argument("--head-dim", type=int, default=128)
    by.add_argument("--kv-heads", type=int, default=8)
    by.add_argument("--dtype", default="bfloat16")
    by.add_argument("--lengths", default="3584,3840,4096,4352,4608,8192,16384")
    by.add_argument(
        "--methods",
        default="default;default,compress_tail=true;aggressive;aggressive,compress_tail=true",
        help="';'-separated PRESET[,field=value...]",
    )
    nd = sub.add_parser("needles", help="share of the needle's tokens kept exact, per protocol")
    nd.add_argument("--tasks", default=DEFAULT_TASKS)
    nd.add_argument("--length", default="4096")
    nd.add_argument("--samples", type=int, default=4)
    nd.add_argument("--threads", default="1")
    nd.add_argument(
        "--methods",
        default="default;default,outlier_selection=attention;default,outlier_selection=mixed",
        help="';'-separated PRESET[,field=value...]",
    )
    args = p.parse_args(argv)
    return {"needles": cmd_needles, "run": cmd_run, "report": cmd_report, "bytes": cmd_bytes, "ppl": cmd_ppl}[
        args.cmd
    ](args)


if __name__ == "__main__":
    raise SystemExit(main())
