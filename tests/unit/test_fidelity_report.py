"""``benchmarks/fidelity_study.py report`` end to end on a hand-made eval folder: every method is
compared with the baseline on the same samples (won / lost, interval, sign test), and a sample
only one side answered (an error on the other) stays out of the pairing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from spectralcache.eval.scoring import paired_comparison

ROOT = Path(__file__).resolve().parents[2]
STEM = "niah_single_1_4096"


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(sid: str, method: str, prediction: str, score: float, kv: int, error: str | None = None) -> dict:
    return {
        "id": sid,
        "method": method,
        "prediction": prediction,
        "score": score,
        "error": error,
        "kv_bytes": kv,
        "kv_bytes_full": kv // 2,
        "compression_ratio_full": 1000 / kv,
        "prefill_s": 0.1,
        "decode_s": 0.1,
        "new_tokens": 4,
    }


def test_report_pairs_each_method_with_the_baseline(tmp_path):
    ids = [f"s{i}" for i in range(8)]
    _write(
        tmp_path / "eval" / "tasks" / f"{STEM}.jsonl",
        [
            {
                "id": s,
                "task": "niah_single_1",
                "target_length": 4096,
                "metric": "string_match_all",
                "answers": ["42"],
                "prompt_tokens": 4096,
                "context_tokens": 4000,
                "depth": 0.5,
                "seed": 0,
                "context": "haystack",
                "question": "the number?",
                "answer_prefix": "",
                "max_new_tokens": 8,
            }
            for s in ids
        ],
    )
    base_right = [1, 1, 1, 1, 1, 1, 0, 0]
    method_right = [1, 1, 1, 1, 0, 0, 1, 0]  # loses s4, s5, wins s6; s7 is an error below
    _write(
        tmp_path / "eval" / "predictions" / "baseline" / f"{STEM}.jsonl",
        [_row(s, "baseline", "42" if ok else "7", float(ok), 1000) for s, ok in zip(ids, base_right)],
    )
    rows = [
        _row(s, "spectral:x", "42" if ok else "9", float(ok), 200) for s, ok in zip(ids[:7], method_right)
    ]
    rows.append(_row("s7", "spectral:x", "", 0.0, 200, error="boom"))
    _write(tmp_path / "eval" / "predictions" / "spectral-x" / f"{STEM}.jsonl", rows)

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fidelity_study.py"),
            "--out",
            str(tmp_path),
            "report",
            "--no-plots",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    table = {r["method"]: r for r in json.loads((tmp_path / "fidelity.json").read_text())["rows"]}
    assert table["baseline"]["vs_baseline"] is None
    vs = table["spectral:x"]["vs_baseline"]
    expect = paired_comparison(method_right[:7], base_right[:7])  # s7 errored: not paired
    assert (vs["n"], vs["wins"], vs["losses"]) == (7, 1, 2)
    assert vs["difference"] == expect.difference and vs["ci_low"] == expect.ci_low
    assert table["spectral:x"]["baseline_accuracy_same_samples"] == 100 * 6 / 7
    md = (tmp_path / "fidelity.md").read_text()
    assert "| 1 / 2 (p 1.00) |" in md and f"{expect.difference:+.1f}" in md
