"""``spectralcache bench attention`` on CUDA: the graphed columns (skipped without CUDA).

Issue 8's bars are read off graph replay (how a model decodes under ``GraphedDecoder``); the
bench's own command prints them since stop 22. Here: both graphed rows run, the graphed kernel's
own output equals the torch reference, and a spectral row's ``speedup_vs_sdpa`` divides the faster
of the two SDPA rows.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from spectralcache.bench import attention as bench  # noqa: E402
from spectralcache.cli import main  # noqa: E402


def test_graphed_rows_run_and_compare_with_the_faster_sdpa(tmp_path) -> None:
    rc = main(["bench", "attention", "--device", "cuda", "--contexts", "4096", "--batches", "1",
               "--presets", "default", "--methods", "sdpa,sdpa_graph,kernel,kernel_graph,torch",
               "--warmup-ms", "5", "--rep-ms", "20", "--no-plot", "--out", str(tmp_path), "--tag", "t"])  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "bench_attention_t.json").read_text())
    by = {r["method"]: r for r in data["results"]}
    for method in ("sdpa", "sdpa_graph", "kernel", "kernel_graph", "torch"):
        assert by[method]["status"] == "ok", by[method]
        assert by[method]["median_ms"] > 0
    assert by["kernel_graph"]["rel_err_vs_torch"] < 2e-2
    sdpa_best = min(by["sdpa"]["median_ms"], by["sdpa_graph"]["median_ms"])
    for method in ("kernel", "kernel_graph"):
        assert by[method]["speedup_vs_sdpa"] == pytest.approx(sdpa_best / by[method]["median_ms"])
    table = bench.markdown(data)
    assert "kernel graph default ms" in table and "SDPA graph ms" in table
