"""GraphedDecoder on a model with sliding-window layers (a tiny Gemma 3: sliding, full, sliding,
full; window 64): the sliding layers' graphed step (``cache/sliding.py``) against the model's own
eager forwards, in ``static`` mode (the graph-mode step without capture; the CUDA capture itself is
tests/gpu/test_graphed_cuda.py's)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from tests.tiny_models import small_lossy_config, tiny_model, tiny_prompt

from spectralcache import GraphedDecoder
from spectralcache.cache.cache import SpectralCache
from spectralcache.cache.sliding import SlidingWindowLayer
from spectralcache.integrations.compat import cache_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(block_size=16, rank_keys=8, rank_values=8, hot_size=4, landmarks=3, outliers_per_block=2)
WINDOW = 64


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3")


def _decode(model, ids, n, mode, mask=None):
    cache = SpectralCache(model, small_lossy_config(**CFG))
    decoder = GraphedDecoder(model, cache, max_new_tokens=n, mode=mode)
    tokens, logits = decoder.generate(ids, n, attention_mask=mask, return_logits=True)
    return tokens, logits, cache, decoder


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-3) -> None:
    assert ((a - b).norm() / b.norm()).item() < tol


def test_sliding_layers_are_transformers_own_with_a_graph_step(model) -> None:
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicSlidingWindowLayer

    cache = SpectralCache(model, small_lossy_config(**CFG))
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["SlidingWindowLayer", "SpectralLayer", "SlidingWindowLayer", "SpectralLayer"]
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer) and cache.layers[0].sliding_window == WINDOW
    # the subclass did not register itself in transformers' mapping (other caches keep their class)
    assert DYNAMIC_LAYER_TYPE_MAPPING["sliding_attention"] is DynamicSlidingWindowLayer


@pytest.mark.parametrize(
    ("batch", "prompt", "steps", "graphed"),
    [
        (2, 90, 12, 11),  # windows full from the prefill: every step graphed
        (1, 40, 40, 16),  # the window fills while decoding: eager steps until 63 tokens, then graphed
    ],
)
def test_static_step_equals_eager(model, batch, prompt, steps, graphed) -> None:
    ids = tiny_prompt(batch, prompt, seed=prompt)
    ref_tokens, ref_logits, ref_cache, _ = _decode(model, ids, steps, "eager")
    tokens, logits, cache, decoder = _decode(model, ids, steps, "static")
    assert decoder.static_steps == graphed and decoder.eager_steps == steps - 1 - graphed
    assert torch.equal(tokens, ref_tokens)
    for a, b in zip(logits, ref_logits):
        _close(a, b)
    for la, lb in zip(cache.layers, ref_cache.layers):
        assert la.get_seq_length() == lb.get_seq_length()
        if isinstance(la, SlidingWindowLayer):
            # the last W-1 tokens, in order (layer 0's K/V depend on the tokens only: bit-equal)
            assert la.keys.shape == lb.keys.shape and la.keys.shape[-2] == WINDOW - 1
            tol = 0.0 if la is cache.layers[0] else 1e-4
            assert (la.keys - lb.keys).abs().max().item() <= tol * lb.keys.abs().max().item()
            assert (la.values - lb.values).abs().max().item() <= tol * lb.values.abs().max().item()
    # the cache ends valid for eager decoding: it goes on from it and agrees
    nxt = tokens[:, -1:]
    with torch.no_grad():
        a = model(nxt, **cache_kwargs(model, cache)).logits
        b = model(nxt, **cache_kwargs(model, ref_cache)).logits
    _close(a, b)


def test_graph_step_keeps_the_window_buffers_and_the_layout(model) -> None:
    """Across graphed steps the window buffers keep their address (a graph captured once stays
    valid); an eager step in between replaces ``keys`` and the next prepare copies it back in place."""
    ids = tiny_prompt(1, 80, seed=3)
    cache = SpectralCache(model, small_lossy_config(**CFG))
    decoder = GraphedDecoder(model, cache, max_new_tokens=8, mode="static")
    nxt = decoder.next_ids(decoder.prefill(ids)).clone()
    layer = cache.layers[0]
    nxt = decoder.next_ids(decoder.step(nxt)).clone()
    buffers = (layer._window_k, layer._window_v)
    assert layer.keys.data_ptr() == buffers[0][:, :, 1:].data_ptr()
    nxt = decoder.next_ids(decoder.step(nxt)).clone()
    with torch.no_grad():  # an eager step through the model's own path
        model(nxt, **cache_kwargs(model, cache))
    assert layer.keys.data_ptr() != buffers[0][:, :, 1:].data_ptr()
    before = layer.keys.clone()
    layer.graph_prepare()
    assert (layer._window_k, layer._window_v) == buffers and torch.equal(layer.keys, before)


def test_a_step_of_another_batch_is_refused_by_name(model) -> None:
    """Layer 0 is a sliding layer (transformers' own has no ``batch_size``): the refusal names both
    batches instead of failing on the attribute."""
    ids = tiny_prompt(2, 80, seed=4)
    cache = SpectralCache(model, small_lossy_config(**CFG))
    decoder = GraphedDecoder(model, cache, max_new_tokens=4, mode="static")
    nxt = decoder.next_ids(decoder.prefill(ids)).clone()
    with pytest.raises(ValueError, match="batch 1 != the cache's batch 2"):
        decoder.step(nxt[:1])


def test_failed_step_rolls_back_the_sliding_layers(model, monkeypatch) -> None:
    """A step that fails after sliding layer 0 shifted its window in place (attention of layer 1
    raises) leaves every layer as before it; decoding then goes on equal to an eager cache."""
    from spectralcache.integrations import graphed

    ids = tiny_prompt(1, 80, seed=9)
    cache = SpectralCache(model, small_lossy_config(**CFG))
    decoder = GraphedDecoder(model, cache, max_new_tokens=8, mode="static")
    first = decoder.next_ids(decoder.prefill(ids)).clone()
    nxt = decoder.next_ids(decoder.step(first)).clone()
    sliding = [layer for layer in cache.layers if isinstance(layer, SlidingWindowLayer)]
    before = [(layer.get_seq_length(), layer.keys.clone(), layer.values.clone()) for layer in sliding]
    real = graphed.GraphSlot.attend

    def fail(self, query, layer, scaling, softcap):
        if layer.layer_idx == 1:
            raise RuntimeError("injected")
        return real(self, query, layer, scaling, softcap)

    monkeypatch.setattr(graphed.GraphSlot, "attend", fail)
    with pytest.raises(RuntimeError, match="injected"):
        decoder.step(nxt)
    monkeypatch.setattr(graphed.GraphSlot, "attend", real)
    assert sliding[0]._shifts >= 1  # layer 0 did shift in place before layer 1 failed
    for layer, (n, k, v) in zip(sliding, before):
        assert layer.get_seq_length() == n and layer._graph_slot is None and not layer.has_pending_chunk
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    ref = SpectralCache(model, small_lossy_config(**CFG))
    a = decoder.step(nxt)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, ref))
        model(first, **cache_kwargs(model, ref))
        b = model(nxt, **cache_kwargs(model, ref)).logits[:, -1]
    _close(a, b, 1e-4)


def test_padded_batch_waits_until_the_padding_left_the_window(model) -> None:
    """Left padding of 10 tokens in row 0: the graphed sliding step reads no mask, so steps run
    eagerly while a window still covers cache index 9, then graphed; tokens equal the eager path."""
    ids = tiny_prompt(2, 60, seed=21)
    mask = torch.ones_like(ids)
    ids[0, :10], mask[0, :10] = 0, 0
    runs = {}
    for mode in ("eager", "static"):
        tokens, logits, _, decoder = _decode(model, ids, 20, mode, mask=mask)
        runs[mode] = (tokens, logits, decoder)
    tokens, logits, decoder = runs["static"]
    assert torch.equal(tokens, runs["eager"][0])
    for a, b in zip(logits, runs["eager"][1]):
        _close(a, b)
    # a step at cache index s graphs once s - 63 >= 10: s = 73 is the 14th decode step (index 13)
    assert decoder.static_steps == 19 - 13 and decoder.eager_steps == 13
