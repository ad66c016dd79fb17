"""Which niah template, dtype and lengths can the uncompressed Gemma 3 270M actually do?

The fidelity comparisons (compressed vs plain cache) only mean something where the plain
cache scores well, so before choosing their tasks we measure the ceiling: plain
``DynamicCache``, greedy ``transformers`` generation, on CPU, for

* the phrasing: RULER's exact niah_single_1 prompt (singular rewrite: "A special magic
  number is hidden ...") vs the plural "Some special magic numbers are hidden ..."
  (``niah_single_1_plural``: same needles and haystack, only the wording differs);
* the dtype: float32 vs bfloat16 (the same weights, cast);
* the length: 1K / 2K / 4K tokens;

plus a short check of other tasks at one length (``--extra-tasks``).

Protocol as in the runner: the prompt is ``context`` (tokenized with BOS) followed by
``question + answer_prefix`` (no special tokens); greedy decoding for the sample's
``max_new_tokens``. Two scores per answer: RULER's (``string_match_all`` on the whole
continuation) and the runner's default (continuation cut at its first line).

Resumable: every finished (task, dtype, length, sample) is written to the JSON at once
and skipped on the next start. Run under ``nice``; it prints progress with tqdm.

    nice -n 10 python benchmarks/template_study.py            # the committed result
    python benchmarks/template_study.py --plot-only           # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "template_study.json"


def _load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "rows": []}


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _key(row: dict) -> tuple:
    return (row["task"], row["dtype"], row["target_length"], row["id"])


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["dtype"], r["target_length"]), []).append(r)
    out = []
    for (task, dtype, length), rs in sorted(groups.items()):
        n = len(rs)
        out.append(
            {
                "task": task,
                "dtype": dtype,
                "target_length": length,
                "samples": n,
                "ruler_score": round(100 * sum(r["score"] for r in rs) / n, 1),
                "first_line_score": round(100 * sum(r["score_first_line"] for r in rs) / n, 1),
                "correct": sum(r["score"] == 1.0 for r in rs),
                "mean_seconds": round(sum(r["seconds"] for r in rs) / n, 2),
            }
        )
    return out


def table(summary: list[dict]) -> str:
    lines = [
        "| task | dtype | length | samples | RULER score | first-line score | s/sample |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['task']} | {s['dtype']} | {s['target_length']} | {s['samples']} | "
            f"{s['ruler_score']:.1f} ({s['correct']}/{s['samples']}) | {s['first_line_score']:.1f} | "
            f"{s['mean_seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(data: dict, png: Path, tasks: list[str]) -> None:
    """Left: the niah phrasing x dtype x length grid (bars, k/n on top). Right: other tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(data["rows"])
    grid = [s for s in summary if s["task"] in tasks]
    others = [s for s in summary if s["task"] not in tasks]
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2] if others else [1, 0.01]}
    )
    lengths = sorted({s["target_length"] for s in grid})
    combos = [
        (t, d)
        for t in tasks
        for d in ("float32", "bfloat16")
        if any(s["task"] == t and s["dtype"] == d for s in grid)
    ]
    width = 0.8 / max(1, len(combos))
    colors = ["tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:green", "tab:olive"]
    for ci, (task, dtype) in enumerate(combos):
        for li, length in enumerate(lengths):
            hit = [s for s in grid if (s["task"], s["dtype"], s["target_length"]) == (task, dtype, length)]
            if not hit:
                continue
            s = hit[0]
            x = li - 0.4 + width * (ci + 0.5)
            ax.bar(
                x,
                s["ruler_score"],
                width * 0.95,
                color=colors[ci % len(colors)],
                label=f"{task} · {dtype}" if li == 0 else None,
            )
            ax.text(x, s["ruler_score"] + 1, f"{s['correct']}/{s['samples']}", ha="center", fontsize=7)
    ax.axhline(80, color="gray", lw=0.8, ls=":")
    ax.set_xticks(range(len(lengths)), [f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in lengths])
    ax.set_ylim(0, 125)
    ax.set_xlabel("prompt length (Gemma tokens)")
    ax.set_ylabel("accuracy, RULER string_match_all (%)")
    ax.set_title("niah phrasing x dtype x length", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    if others:
        labels = [f"{s['task']}\n{s['target_length'] // 1024}K {s['dtype']}" for s in others]
        ax2.bar(range(len(others)), [s["ruler_score"] for s in others], color="tab:gray")
        for i, s in enumerate(others):
            ax2.text(i, s["ruler_score"] + 1, f"{s['correct']}/{s['samples']}", ha="center", fontsize=7)
        ax2.axhline(80, color="gray", lw=0.8, ls=":")
        ax2.set_xticks(range(len(others)), labels, fontsize=6.5, rotation=30, ha="right")
        ax2.set_ylim(0, 125)
        ax2.set_title("other tasks (few samples)", fontsize=10)
    else:
        ax2.axis("off")
    fig.suptitle("Gemma 3 270M, plain DynamicCache, greedy, CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["niah_single_1", "niah_single_1_plural"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument(
        "--extra-tasks", nargs="*", default=["niah_multikey_1", "vt", "niah_single_2", "niah_multikey_2"]
    )
    p.add_argument("--extra-length", type=int, default=4096)
    p.add_argument("--extra-samples", type=int, default=5)
    p.add_argument("--extra-dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core box, 1 thread costs ~3x less CPU time per sample than 2)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    png = args.out.with_suffix(".png")

    data = _load(args.out)
    if args.plot_only:
        plot(data, png, args.tasks)
        print(table(summarize(data["rows"])))
        return 0

    import torch
    import transformers
    from tqdm import tqdm
    from transformers import DynamicCache

    from spectralcache.eval.model import load_model
    from spectralcache.eval.scoring import postprocess_prediction, score
    from spectralcache.eval.tasks import generate_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/template_study.py", *(argv if argv is not None else sys.argv[1:])])
    commands = data.get("meta", {}).get("commands", [])
    data["meta"] = {
        "commands": commands if command in commands else [*commands, command],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "protocol": "context (BOS) + question + answer_prefix, plain DynamicCache, greedy generate",
    }
    done = {_key(r) for r in data["rows"]}

    model, tok = load_model(dtype=torch.float32)
    plan = [(t, d, n, args.samples) for d in args.dtypes for n in args.lengths for t in args.tasks]
    plan += [(t, args.extra_dtype, args.extra_length, args.extra_samples) for t in args.extra_tasks]
    # float32 first: casting to bfloat16 afterwards is exact, the other way round is not
    order = {"float32": 0, "bfloat16": 1, "float16": 2}
    plan.sort(key=lambda x: order.get(x[1], 3))
    jobs = []
    for task, dtype, length, n in plan:
        for s in generate_samples(task, tokenizer=tok, length=length, num_samples=n, seed=args.seed):
            jobs.append((dtype, s))
    todo = [(d, s) for d, s in jobs if (s["task"], d, s["target_length"], s["id"]) not in done]
    print(f"{len(jobs)} answers planned, {len(jobs) - len(todo)} already in {args.out}", flush=True)

    current = "float32"
    for dtype, s in tqdm(todo, desc="template study", unit="sample"):
        if dtype != current:
            model.to(getattr(torch, dtype))
            current = dtype
        ctx = tok(s["context"], return_tensors="pt", add_special_tokens=True).input_ids
        q = tok(s["question"] + s["answer_prefix"], return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([ctx, q], dim=1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=DynamicCache(config=model.config),
                max_new_tokens=s["max_new_tokens"],
                do_sample=False,
            )
        seconds = time.perf_counter() - t0
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        first = postprocess_prediction(text).split("\n")[0]
        row = {
            "task": s["task"],
            "dtype": dtype,
            "target_length": s["target_length"],
            "id": s["id"],
            "prompt_tokens": int(ids.shape[1]),
            "depth": s["depth"],
            "answers": s["answers"],
            "prediction": text,
            "score": score(s["metric"], text, s["answers"]),
            "score_first_line": score(s["metric"], first, s["answers"]),
            "seconds": round(seconds, 2),
        }
        data["rows"].append(row)
        data["summary"] = summarize(data["rows"])
        _save(args.out, data)
        tqdm.write(f"{s['task']:22s} {dtype:8s} {s['target_length']:5d} {row['score']:.2f} {text[:60]!r}")

    data["summary"] = summarize(data["rows"])
    _save(args.out, data)
    plot(data, png, args.tasks)
    print(table(data["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
