"""Per-sample scores, measured reduction and the resolved method config of prediction rows from
several eval directories side by side (issue 9, "Stop 15: the identity-values discrepancy").

    python benchmarks/results/fidelity/cpu_4k/compare_samples.py LABEL=DIR/predictions/SLUG/STEM.jsonl ...

Prints one line per file: the score of each sample id (``.`` = not run), n, accuracy, the mean
``compression_ratio_full`` and the config fields that differ from the first file's config; then
whether rows with the same id in two files have identical predictions.
"""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            rows[r["id"]] = r  # the latest row of an id wins, as in eval.runner.latest_rows
    return rows


def main(argv: list[str]) -> int:
    files = [(a.split("=", 1)[0], load(a.split("=", 1)[1])) for a in argv]
    ids = sorted({i for _, rows in files for i in rows})
    ref_cfg = next(
        (r.get("method_config") for _, rows in files for r in rows.values() if r.get("method_config")), None
    )
    width = max(len(label) for label, _ in files)
    print(" " * width, " ".join(i[-2:] for i in ids))
    for label, rows in files:
        scores = " ".join(f"{rows[i]['score']:2.0f}" if i in rows else " ." for i in ids)
        n = len(rows)
        acc = 100 * sum(r["score"] for r in rows.values()) / n
        red = sum(r["compression_ratio_full"] for r in rows.values()) / n
        cfg = next(iter(rows.values())).get("method_config") or {}
        diff = {k: v for k, v in cfg.items() if ref_cfg and ref_cfg.get(k) != v}
        print(f"{label:{width}s} {scores}  n={n} acc={acc:.0f}% reduction={red:.3f}x  config-diff={diff}")
    for a in range(len(files)):
        for b in range(a + 1, len(files)):
            (la, ra), (lb, rb) = files[a], files[b]
            common = [i for i in ids if i in ra and i in rb]
            same = sum(ra[i]["prediction"] == rb[i]["prediction"] for i in common)
            if common:
                print(f"{la} vs {lb}: identical predictions on {same}/{len(common)} common samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
