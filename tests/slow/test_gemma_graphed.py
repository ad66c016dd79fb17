"""Graphed decoding on the real Gemma 3 270M (CPU, float32): the decode step GraphedDecoder replays
on CUDA -- 15 sliding-window layers shifting their window buffers, 3 compressed layers read by the
Triton kernel with device-side sizes -- run without capture (``mode="static"``, the kernel in
Triton's interpreter) must answer as the model's own eager forwards with the same cache config."""

from __future__ import annotations

import os

import pytest
import torch

from spectralcache import GraphedDecoder, SpectralCache
from spectralcache.cache.sliding import SlidingWindowLayer

pytestmark = pytest.mark.slow

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)
pytest.importorskip("triton")


def test_static_graph_step_answers_as_eager(gemma) -> None:
    from tests.slow.test_gemma_generation import PASS_KEY, needle_prompt

    model, tok = gemma
    ids = needle_prompt(tok, target=1400, depth=0.3)  # window (512) full; two 512-token blocks compressed
    runs = {}
    for mode in ("eager", "static"):
        cache = SpectralCache(model, "default")
        decoder = GraphedDecoder(model, cache, max_new_tokens=6, mode=mode)
        runs[mode] = (*decoder.generate(ids, 6, return_logits=True), decoder, cache)
    tokens, logits, decoder, cache = runs["static"]
    assert decoder.static_steps == 5 and decoder.eager_steps == 0
    assert sum(isinstance(layer, SlidingWindowLayer) for layer in cache.layers) == 15
    assert cache.layers[5].num_blocks >= 2
    assert torch.equal(tokens, runs["eager"][0])
    for a, b in zip(logits, runs["eager"][1]):
        assert ((a - b).norm() / b.norm()).item() < 1e-4
    assert PASS_KEY[:2] in tok.decode(tokens[0])  # and it is the right answer
