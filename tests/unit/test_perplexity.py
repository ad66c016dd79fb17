"""Perplexity protocol "prefill, compress, continue" on tiny random-weight models."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from spectralcache.eval import perplexity as ppl
from spectralcache.eval.methods import parse_methods

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import tiny_config


@pytest.fixture(scope="module")
def tiny_gemma():
    torch.manual_seed(0)
    cfg = tiny_config("gemma3", vocab_size=262144, hidden_size=32, intermediate_size=64, sliding_window=48)
    return AutoModelForCausalLM.from_config(cfg).eval()


@torch.inference_mode()
def _reference_nll(model, ids: list[int], prefill: int) -> float:
    """One forward over the whole segment, no cache: the textbook NLL of ids[prefill:]."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, prefill - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, x[0, prefill:], reduction="sum").item()


def test_segments_are_deterministic_and_shared(gemma_tokenizer):
    a = ppl.segments(gemma_tokenizer, 100, 20, 3)
    b = ppl.segments(gemma_tokenizer, 100, 20, 3)
    assert a == b
    assert [len(s) for s in a] == [120, 120, 120]
    assert all(s[0] == gemma_tokenizer.bos_token_id for s in a)
    assert len({tuple(s) for s in a}) == 3  # consecutive, different slices of the text
    with pytest.raises(ValueError, match="prefill"):
        ppl.segments(gemma_tokenizer, 1, 20, 1)


@pytest.mark.parametrize("mode", ["step", "chunk"])
def test_baseline_nll_equals_full_forward_reference(tiny_gemma, gemma_tokenizer, mode):
    ids = ppl.segments(gemma_tokenizer, 90, 30, 1)[0]
    res = ppl.score_segment(tiny_gemma, None, ids, 90, mode=mode, chunk=7)
    assert res.tokens == 30
    assert res.nll_sum == pytest.approx(_reference_nll(tiny_gemma, ids, 90), rel=1e-4)
    assert res.kv_bytes > res.kv_bytes_full > 0


def test_bad_mode_and_prefill(tiny_gemma):
    with pytest.raises(ValueError, match="mode"):
        ppl.score_segment(tiny_gemma, None, list(range(3, 40)), 10, mode="fast")
    with pytest.raises(ValueError, match="prefill"):
        ppl.score_segment(tiny_gemma, None, list(range(3, 40)), 40)


def test_same_split_for_every_method_and_lossless_matches(tiny_gemma, gemma_tokenizer, tmp_path):
    pytest.importorskip("spectralcache.cache.cache")
    methods = parse_methods(
        "spectral:lossless,block_size=32,hot_size=8,landmarks=4,"
        "spectral:default,block_size=32,rank_keys=4,rank_values=4,hot_size=8,landmarks=4,outliers_per_block=1,"
        "streaming:sinks=2,window=16"
    )
    out = tmp_path / "ppl"
    res = ppl.run_perplexity(tiny_gemma, gemma_tokenizer, methods, prefill=160, cont=24, num_segments=2,
                             out=out, progress=False)  # fmt: skip
    by = {r["method"]: r for r in res}
    assert list(by) == ["baseline", *(m.name for m in methods)]
    assert all(r["error"] is None and r["tokens"] == 48 for r in res)
    base, lossless = by["baseline"], by[methods[0].name]
    # full rank, no quantization: the compressed cache reproduces the plain one
    assert lossless["nll"] == pytest.approx(base["nll"], rel=1e-4, abs=1e-4)
    # a real compressor holds fewer bytes on the compressed layers and is measured against the baseline
    lossy = by[methods[1].name]
    assert lossy["compression_ratio_full"] > 1.0
    assert lossy["compression_ratio"] == pytest.approx(base["kv_bytes"] / lossy["kv_bytes"])
    assert by[methods[2].name]["compression_ratio_full"] > 1.0
    assert all(math.isfinite(r["perplexity"]) for r in res)
    # files: one per method + summary; a rerun with the same protocol reuses them
    summary = json.loads((out / "perplexity" / "summary.json").read_text())
    assert [r["method"] for r in summary] == list(by)
    again = ppl.run_perplexity(tiny_gemma, gemma_tokenizer, methods, prefill=160, cont=24, num_segments=2,
                               out=out, progress=False)  # fmt: skip
    assert [r["nll"] for r in again] == [r["nll"] for r in res]
