"""Paired answers of each method against the baseline in this directory (docs/fidelity.md, Stop 17).

For every method under ``eval/predictions/`` and every task: accuracy, the baseline's accuracy on
the same samples, the share of generated texts identical to the baseline's, the samples lost and
won against the baseline, and for each wrong answer what it is: another needle's value from the
same context (the question matched the wrong key), or something else. Also the smallest and mean
per-sample reduction on the compressed layers (``compression_ratio_full``, as ``report``).

    python benchmarks/results/fidelity/channel8_4k_n30/answers.py [EVAL_DIR]

EVAL_DIR defaults to this directory's ``eval``; prints a Markdown report to stdout.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# the generator's needle sentence: "One of the special magic numbers for KEY is: VALUE."
NEEDLE = re.compile(r"special magic numbers? for ([\w-]+) is: (\d+)")
NUMBER = re.compile(r"\d{4,}")


def read_rows(path: Path) -> dict[str, dict]:
    """Rows of one JSONL file keyed by sample id (the last row of an id wins, as the runner reads them)."""
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["id"]] = row
    return rows


def classify_wrong(prediction: str, task_row: dict) -> str:
    """What a wrong answer is, read from the first number it states."""
    numbers = NUMBER.findall(prediction)
    if not numbers:
        return f"no number ({prediction.strip()[:40]!r})"
    first = numbers[0]
    needles = dict((value, key) for key, value in NEEDLE.findall(task_row["context"]))
    if first in needles:
        return f"another needle's value ({needles[first]}: {first})"
    if first in task_row["context"]:
        return f"a number from the haystack ({first})"
    return f"a number not in the context ({first})"


def main(argv: list[str]) -> int:
    eval_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "eval"
    predictions = eval_dir / "predictions"
    base_dir = predictions / "baseline"
    for method_dir in sorted(p for p in predictions.iterdir() if p.is_dir()):
        print(f"## {method_dir.name}\n")
        for path in sorted(method_dir.glob("*.jsonl")):
            tasks = read_rows(eval_dir / "tasks" / path.name)
            rows = read_rows(path)
            base = read_rows(base_dir / path.name)
            ids = sorted(i for i in rows if i in base and rows[i].get("error") is None)
            n = len(ids)
            if n == 0:
                continue
            right = sum(rows[i]["score"] for i in ids)
            base_right = sum(base[i]["score"] for i in ids)
            same = sum(rows[i]["prediction"] == base[i]["prediction"] for i in ids)
            lost = [i for i in ids if base[i]["score"] > rows[i]["score"]]
            won = [i for i in ids if rows[i]["score"] > base[i]["score"]]
            ratios = [rows[i]["compression_ratio_full"] for i in ids]
            print(
                f"- {path.stem}: n={n}, accuracy {100 * right / n:.0f} % ({right:g}/{n}), baseline on "
                f"the same samples {100 * base_right / n:.0f} % ({base_right:g}/{n}), same answer "
                f"{100 * same / n:.0f} %, reduction mean {sum(ratios) / n:.2f}x smallest {min(ratios):.3f}x"
            )
            print(f"  - lost vs baseline: {[i[-4:] for i in lost]}; won: {[i[-4:] for i in won]}")
            for i in ids:
                if rows[i]["score"] < 1.0:
                    tag = " (baseline also wrong)" if base[i]["score"] < 1.0 else ""
                    kind = classify_wrong(rows[i]["prediction"], tasks[i])
                    print(f"  - wrong {i[-4:]}{tag}: {kind}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
