"""Decode speed without kernels: a SpectralCache step at 4K tokens is at most 1.5x a DynamicCache step.

Measured side by side in one run (steps alternate between the caches, medians compared),
on CPU with one intra-op thread so other processes on a shared box perturb both alike.
Block compression is not a per-step cost; it is reported separately by the benchmark
(``python benchmarks/decode_step.py``).
"""

from __future__ import annotations

import pytest

from spectralcache.bench.decode import measure_attention, measure_model_step, tiny_decode_model
from spectralcache.config import SpectralConfig

MAX_RATIO = 1.5


pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_decode_step_at_4k_tokens() -> None:
    model = tiny_decode_model()  # Gemma 3 270M attention geometry: head_dim 256, 4 q heads, 1 KV head
    result = measure_model_step(model, tokens=4096, steps=15, config=SpectralConfig())
    assert result["compression_blocks"] >= 7  # the context really is compressed
    assert result["ratio"] <= MAX_RATIO, result


def test_attention_call_at_4k_tokens() -> None:
    result = measure_attention(tokens=4096, steps=30, config=SpectralConfig())
    assert result["compression_blocks"] >= 7
    assert result["ratio"] <= MAX_RATIO, result
