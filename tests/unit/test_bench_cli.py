"""``spectralcache bench`` dispatcher and the randomized-SVD benchmark (tiny shapes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectralcache.bench.svd import decaying_matrix, optimal_errors, parse_shapes
from spectralcache.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_bench_help_lists_benchmarks():
    out = subprocess.run(
        [sys.executable, "-m", "spectralcache.cli", "bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert all(name in out for name in ("svd", "decode", "attention", "e2e"))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rsvd.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--sweep" in out and "--shapes" in out


def test_bench_svd_writes_self_describing_json_and_png(tmp_path):
    rc = main(
        ["bench", "svd", "--device", "cpu", "--shapes", "3x64x32:4,40x90:6", "--repeats", "2", "--warmup", "0",
         "--out", str(tmp_path), "--tag", "t"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "rsvd_t.json").read_text())
    meta = data["meta"]
    for key in ("command", "date_utc", "torch", "device", "device_name", "machine", "torch_threads"):
        assert meta[key] not in (None, "")
    rows = data["results"]
    methods = {r["method"] for r in rows}
    assert {"torch.linalg.svd", "torch.svd_lowrank(niter=2)"} <= methods
    assert {f"rsvd[{o}]" for o in ("householder", "cholqr", "cholqr2", "shifted_cholqr")} <= methods
    assert len(rows) == 2 * len(methods)
    for r in rows:
        assert r["median_ms"] > 0 and r["x_vs_linalg_svd"] > 0 and r["x_vs_svd_lowrank"] > 0
        assert r["err_ratio"] >= 1 - 1e-4  # nobody beats the optimum
        if r["method"].startswith("rsvd["):
            assert r["err_ratio"] <= 1.05 and set(r["stages_ms"]) >= {"sketch", "core"} and r["path"]
    assert (tmp_path / "rsvd_t.png").stat().st_size > 1000


def test_bench_svd_sweep(tmp_path):
    rc = main(
        ["bench", "svd", "--sweep", "--device", "cpu", "--shapes", "2x48x24:4", "--methods", "cholqr2",
         "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    sweep = json.loads((tmp_path / "rsvd_sweep_cpu.json").read_text())["sweeps"]["2x48x24_r4"]
    assert [p["n_iter"] for p in sweep["n_iter"]] == [0, 1, 2, 4, 8]
    assert [p["oversample"] for p in sweep["oversample"]] == [0, 4, 8, 16, 32]
    ratios = [p["err_ratio"] for p in sweep["n_iter"]]
    assert ratios[-1] <= ratios[0] + 1e-6  # more power iterations never hurt here
    assert (tmp_path / "rsvd_sweep_cpu_2x48x24_r4.png").exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--shapes", "8x512"], "bad shape"),
        (["--shapes", "8x10x4:9"], "bad shape"),
        (["--methods", "nope", "--shapes", "2x8x4:2"], "unknown method"),
    ],
)
def test_bench_svd_bad_arguments_are_clear(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        main(["bench", "svd", "--device", "cpu", "--out", str(tmp_path), "--no-plot", *argv])


def test_bench_unknown_benchmark_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "nope"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_parse_shapes_and_test_matrix_spectrum():
    assert parse_shapes("8x512x128:16, 16384x1024:160") == [((8, 512, 128), 16), ((16384, 1024), 160)]
    M = decaying_matrix((2, 200, 60), noise=0.0, decay=5.0, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(M.double())
    # decaying, not flat: the 20th singular value is far below the first
    assert float((s[:, 19] / s[:, 0]).max()) < 0.1
    opt = optimal_errors(M, [4])[4]
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    exact = torch.linalg.vector_norm(
        M.double() - (U[..., :4] * S[..., None, :4]) @ Vh[..., :4, :]
    ) / torch.linalg.vector_norm(M.double())
    assert abs(opt - float(exact)) < 1e-6
