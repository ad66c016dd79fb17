"""``spectralcache bench e2e``'s graphed methods on CPU (their steps run uncaptured there).

The CUDA graph capture itself is exercised on the GPU (``tests/gpu/test_graphed_cuda.py`` and
``benchmarks/bench_gpu.sh final``); here: the static-cache step feeds positions correctly (its
logits = DynamicCache's, token by token, rewind included) and the bench runs the methods end to end.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from tests.tiny_models import tiny_model, tiny_prompt

from spectralcache.bench import e2e
from spectralcache.integrations.compat import cache_kwargs


def test_static_cache_step_equals_dynamic_cache() -> None:
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = tiny_prompt(2, 20, seed=4)
    follow = tiny_prompt(2, 6, seed=5)
    dev = torch.device("cpu")
    static = e2e._make_cache(model, "graphed:static", max_cache_len=40)
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        e2e._prefill_static(
            model, ids, static, e2e.cache_argument(model)
        )  # the bench's prefill of a StaticCache
        model(ids, **cache_kwargs(model, dynamic))
        decoder = e2e._graphed_decoder(model, static, ids, 12, dev)
        want = [model(follow[:, i : i + 1], **cache_kwargs(model, dynamic)).logits[:, -1] for i in range(6)]
        for _ in range(2):  # the second pass rewinds and overwrites the same positions
            got = [decoder.step(follow[:, i : i + 1]).clone() for i in range(6)]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            decoder.rewind(6)
    assert decoder.captures == 0 and decoder.uncaptured_steps == 12


def test_bench_runs_graphed_methods(tmp_path) -> None:
    methods = "dynamic;graphed:static;graphed:default,block_size=32,hot_size=8,landmarks=4,rank_keys=8,rank_values=8,outliers_per_block=4"
    argv = ["--device", "cpu", "--model", "tiny", "--layers", "1", "--lengths", "48", "--methods", methods,
            "--decode-steps", "2", "--warmup-steps", "1", "--warmup-tokens", "0", "--no-plot",
            "--out", str(tmp_path), "--tag", "t"]  # fmt: skip
    assert e2e.main(argv) == 0
    rows = json.loads((tmp_path / "bench_e2e_t.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    graphed = rows[2]
    assert (
        graphed["graph_captured"] is False and graphed["uncaptured_steps"] == 6 and graphed["logits_finite"]
    )
    assert "decode_speedup_vs_graphed_static" in graphed
