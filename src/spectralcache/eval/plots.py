"""Plots of evaluation results, drawn from the JSON alone (``spectralcache plot DIR``).

``DIR`` is any directory written by ``spectralcache eval`` (tasks or needle), ``eval
perplexity`` or ``eval spectrum``, or a parent of several: every results directory found
under it is (re)drawn:

- tasks  -> ``accuracy_vs_ratio.png``: score vs measured compression ratio, one panel per
  (task, length), one marker per method (the baseline at ratio 1 is the ceiling);
- needle -> ``needle_heatmap.png``: accuracy over (context length x depth), one panel per method;
- perplexity -> ``perplexity_vs_ratio.png``;
- spectrum -> ``spectrum.png`` (drawn by :mod:`spectralcache.eval.spectrum`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(method: str) -> dict[str, Any]:
    kind = method.split(":")[0]
    return {
        "baseline": {"marker": "*", "s": 160, "color": "black"},
        "spectral": {"marker": "o", "s": 70, "color": None},
        "quantized": {"marker": "s", "s": 60, "color": None},
        "streaming": {"marker": "^", "s": 60, "color": None},
    }.get(kind, {"marker": "D", "s": 60, "color": None})


def _ratio(s: dict) -> float:
    return s.get("compression_ratio") or (1.0 if s["method"] == "baseline" else float("nan"))


def plot_tasks(summaries: list[dict], path: Path, *, ratio_key: str = "compression_ratio") -> Path | None:
    """Accuracy vs measured compression ratio, one panel per (task, length)."""
    rows = [s for s in summaries if s.get("depth") is None and s.get("score") is not None]
    if not rows:
        return None
    plt = _plt()
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for s in rows:
        groups[(s["task"], s["target_length"])].append(s)
    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.2), squeeze=False)
    methods = sorted({s["method"] for s in rows})
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for ax, key in zip(axes[0], keys):
        for s in sorted(groups[key], key=lambda s: s["method"]):
            st = _style(s["method"])
            x = s.get(ratio_key) or (1.0 if s["method"] == "baseline" else None)
            if x is None:
                continue
            ax.scatter(x, s["score"], marker=st["marker"], s=st["s"], color=st["color"] or colors[s["method"]],
                       label=f"{s['method']} (n={s['n']})", zorder=3)  # fmt: skip
        ax.set_title(f"{key[0]} @ {key[1]} tokens")
        ax.set_xlabel("compression ratio (measured KV bytes, all layers)" if ratio_key == "compression_ratio"
                      else "compression ratio (full-attention layers)")  # fmt: skip
        ax.set_ylabel("score (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_needle(summaries: list[dict], path: Path) -> Path | None:
    """Accuracy heatmap (depth x context length), one panel per method."""
    rows = [s for s in summaries if s.get("depth") is not None and s.get("score") is not None]
    if not rows:
        return None
    plt = _plt()
    methods = sorted({s["method"] for s in rows}, key=lambda m: (m != "baseline", m))
    lengths = sorted({s["target_length"] for s in rows})
    depths = sorted({s["depth"] for s in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.3 * len(methods) + 1, 3.6), squeeze=False)
    fig.subplots_adjust(wspace=0.12)
    im = None
    for ax, m in zip(axes[0], methods):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        ratios = []
        for s in rows:
            if s["method"] == m:
                grid[depths.index(s["depth"])][lengths.index(s["target_length"])] = s["score"]
                if s.get("compression_ratio"):
                    ratios.append(s["compression_ratio"])
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths] if ax is axes[0][0] else [])
        ax.set_xlabel("context length")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth (fraction of the context)")
        title = m if len(m) < 28 else m[:27] + "…"
        if ratios and m != "baseline":
            title += f"\nratio {min(ratios):.2f}–{max(ratios):.2f}"
        ax.set_title(title, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_perplexity(results: list[dict], path: Path) -> Path | None:
    rows = [r for r in results if r.get("error") is None and r.get("perplexity") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(sorted(rows, key=lambda r: r["method"])):
        st = _style(r["method"])
        x = r.get("compression_ratio") or 1.0
        ax.scatter(x, r["perplexity"], marker=st["marker"], s=st["s"], color=st["color"] or cmap(i % 10),
                   label=r["method"], zorder=3)  # fmt: skip
    p = rows[0]["protocol"]
    ax.set_title(f"perplexity: prefill {p['prefill']}, continue {p['continue']} ({p['mode']})", fontsize=10)
    ax.set_xlabel("compression ratio (measured KV bytes, all layers)")
    ax.set_ylabel("perplexity on the continuation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_all(root: Path) -> list[Path]:
    """Redraw every plot under ``root`` from its JSON; returns the files written."""
    from spectralcache.eval.runner import summarize

    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    written: list[Path] = []
    for tasks_dir in sorted({p.parent for p in root.rglob("tasks") if p.is_dir()}):
        if not (tasks_dir / "predictions").is_dir():
            continue
        summaries = summarize(tasks_dir)
        for fn, name in ((plot_tasks, "accuracy_vs_ratio.png"), (plot_needle, "needle_heatmap.png")):
            out = fn(summaries, tasks_dir / name)
            if out is not None:
                written.append(out)
    for ppl in sorted(root.rglob("perplexity/summary.json")):
        out = plot_perplexity(json.loads(ppl.read_text()), ppl.parent.parent / "perplexity_vs_ratio.png")
        if out is not None:
            written.append(out)
    for spec in sorted(root.rglob("spectrum.json")):
        from spectralcache.eval.spectrum import plot_spectrum

        written.append(plot_spectrum(json.loads(spec.read_text()), spec.with_suffix(".png")))
    return written


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="results directory (searched recursively)")


def run(args: argparse.Namespace) -> int:
    try:
        written = draw_all(args.dir)
    except FileNotFoundError as err:
        print(f"spectralcache plot: error: {err}", file=sys.stderr)
        return 2
    if not written:
        print(f"spectralcache plot: no results found under {args.dir}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0
