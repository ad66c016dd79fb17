"""Graphed decoding (``integrations/graphed.py``) = the eager path, on CPU.

CUDA graphs do not exist on CPU, so these tests run the graph-mode step *without* capture
(``mode="static"``): the same static buffers, device-index writes (``index_copy_`` at the row a
device scalar names), one staged copy of every layer's sizes, the Triton decode kernel reading
those sizes over the layer's capacity (through Triton's interpreter), compression and hot-window
compaction between steps. The capture itself is tested in ``tests/gpu/test_graphed_cuda.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from tests.layer_helpers import D, H, kv
from tests.tiny_models import small_lossy_config, tiny_model, tiny_prompt

from spectralcache import GraphedDecoder, graphed_generate
from spectralcache.cache.cache import SpectralCache
from spectralcache.cache.layer import SpectralLayer
from spectralcache.integrations.compat import cache_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")

# 16-token blocks and 4 hot tokens: a compression every 16 decode steps
CFG = dict(block_size=16, rank_keys=8, rank_values=8, hot_size=4, landmarks=3, outliers_per_block=2)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _decode(model, ids, n, mode, **cfg):
    cache = SpectralCache(model, small_lossy_config(**{**CFG, **cfg}))
    decoder = GraphedDecoder(model, cache, max_new_tokens=n, mode=mode)
    tokens, logits = decoder.generate(ids, n, return_logits=True)
    return tokens, logits, cache, decoder


def _same_cache(a: SpectralCache, b: SpectralCache) -> None:
    for la, lb in zip(a.layers, b.layers):
        assert la.get_seq_length() == lb.get_seq_length()
        assert (la.num_blocks, la.hot_len, la.num_landmarks) == (lb.num_blocks, lb.hot_len, lb.num_landmarks)
        # layer 0's K/V depend on the tokens only (bit-equal); later layers' on attention outputs
        # (the kernel vs the torch reference: float rounding apart)
        for x, y in zip(la.reconstruct(), lb.reconstruct()):
            assert ((x - y).norm() / y.norm()).item() < 1e-3


@pytest.mark.parametrize(
    ("batch", "prompt", "steps"),
    [
        (2, 34, 9),  # a cold block from the prefill; one compression while decoding (step 4)
        (1, 10, 14),  # no block yet: the first compression happens while decoding (step 12)
        (1, 2, 4),  # prompt shorter than the landmarks: eager steps until they are full
    ],
)
def test_static_step_equals_eager(model, batch, prompt, steps) -> None:
    ids = tiny_prompt(batch, prompt, seed=prompt)
    ref_tokens, ref_logits, ref_cache, _ = _decode(model, ids, steps, "eager")
    tokens, logits, cache, decoder = _decode(model, ids, steps, "static")
    assert torch.equal(tokens, ref_tokens)
    for a, b in zip(logits, ref_logits):
        # ~1e-6 (kernel vs torch reference summation order); up to ~5e-5 once a block of layer 1
        # (whose K/V carry that rounding) is compressed: the rank-8 fit amplifies it
        assert ((a - b).norm() / b.norm()).item() < 1e-3
    _same_cache(cache, ref_cache)  # same blocks compressed from the same rows, same hot window
    assert decoder.static_steps + decoder.eager_steps == steps - 1
    if prompt >= CFG["landmarks"]:
        assert decoder.static_steps == steps - 1
    # the layer ends a valid eager layer: eager decoding goes on from it and agrees
    nxt = tokens[:, -1:]
    with torch.no_grad():
        a = model(nxt, **cache_kwargs(model, cache)).logits
        b = model(nxt, **cache_kwargs(model, ref_cache)).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-3


def test_static_step_with_block_parts_equals_eager(model, monkeypatch) -> None:
    """The graph-mode kernel launch with block parts (32-token blocks read in two 16-token halves by
    capacity·2 programs, those past the live blocks reading nothing) = the eager path, through a
    compression while decoding."""
    import spectralcache.attention.triton.decode as dec

    launches = []
    plain = dec.decode_attention

    def with_parts(*args, **kwargs):
        assert kwargs.get("device_sizes") is not None  # the graph-mode launch
        launches.append(kwargs["capacity_blocks"])
        # outliers in their block's part-0 program (outlier_split off): each exact row read once
        return plain(*args, **{**kwargs, "block_parts": 2, "block_t": 16, "outlier_split": False})

    cfg = dict(block_size=32)
    ids = tiny_prompt(1, 50, seed=7)  # one block from the prefill; a compression while decoding
    ref_tokens, ref_logits, _, _ = _decode(model, ids, 30, "eager", **cfg)
    monkeypatch.setattr(dec, "decode_attention", with_parts)
    tokens, logits, cache, decoder = _decode(model, ids, 30, "static", **cfg)
    assert launches and decoder.static_steps == 29
    assert max(launches) > 1 and cache.layers[0].num_blocks >= 2
    assert torch.equal(tokens, ref_tokens)
    for a, b in zip(logits, ref_logits):
        assert ((a - b).norm() / b.norm()).item() < 1e-3


def test_staged_sizes_are_the_kernel_contract(model) -> None:
    """The sizes the decoder stages (one copy for every layer) = ``decode_sizes`` of each layer's
    graph state, and the hot window stays at row 0 of one buffer between compressions."""
    from spectralcache.attention.triton.decode import decode_sizes

    ids = tiny_prompt(1, 34, seed=3)  # 15 hot tokens: a compression at the 5th step
    cache = SpectralCache(model, small_lossy_config(**CFG))
    decoder = GraphedDecoder(model, cache, max_new_tokens=8, mode="static")
    nxt = decoder.next_ids(decoder.prefill(ids))
    hot_ptrs, cold_objs = set(), set()
    calls = len(cache.layers[0].compression_calls)
    for _ in range(8):
        nxt = decoder.next_ids(decoder.step(nxt))
        staged = decoder.host_sizes()
        for i, layer in enumerate(cache.layers):
            assert staged[i].tolist() == decode_sizes(layer.graph_state(), 1, 0)
            assert layer._hot_lo == 0
        hot_ptrs.add(cache.layers[0]._hot_k.data_ptr())
        cold_objs.add(id(cache.layers[0]._cold))
    assert len(hot_ptrs) == 1  # fixed-capacity hot buffer, compacted in place
    assert len(cold_objs) == 1  # cold capacity reserved ahead: compressions append in place
    assert len(cache.layers[0].compression_calls) > calls  # ... and one happened while decoding


def test_layer_graph_protocol_equals_eager_updates() -> None:
    """``graph_prepare`` + ``graph_advance`` + a device-index write = ``update``, token by token
    (random K/V, several compressions), without any model."""
    from types import SimpleNamespace

    cfg = dict(block_size=32, rank_keys=4, rank_values=6, hot_size=4, landmarks=3, outliers_per_block=2)
    eager = SpectralLayer(small_lossy_config(**cfg), 0, head_dim=D, num_kv_heads=H)
    graph = SpectralLayer(small_lossy_config(**cfg), 0, head_dim=D, num_kv_heads=H)
    k0, v0 = kv(2, 70, seed=5)
    for layer in (eager, graph):
        layer.update(k0, v0)
        layer.release_chunk()
    row = torch.zeros(1, dtype=torch.long)
    ks, vs = kv(2, 100, seed=6)
    ptrs = set()
    for i in range(100):
        k, v = ks[:, :, i : i + 1], vs[:, :, i : i + 1]
        eager.update(k, v)
        eager.release_chunk()
        graph.graph_prepare(tokens_ahead=100 - i)
        row.fill_(graph.graph_advance())
        graph._graph_slot = SimpleNamespace(write_row=row)
        try:
            graph.update(k, v)
        finally:
            graph._graph_slot = None
        state = graph.state()
        assert state.chunk_keys is k and state.chunk_start == state.seq_len - 1
        graph.release_chunk()
        assert graph.get_seq_length() == eager.get_seq_length()
        ka, va = eager.reconstruct()
        kb, vb = graph.reconstruct()
        assert torch.equal(ka, kb) and torch.equal(va, vb)
        ptrs.add(graph._hot_k.data_ptr())
    assert graph.num_blocks == eager.num_blocks >= 4
    assert len(ptrs) == 1


def test_in_place_compaction_invalidates_checkpoints() -> None:
    cfg = dict(block_size=32, rank_keys=4, rank_values=6, hot_size=4, landmarks=3, outliers_per_block=2)
    layer = SpectralLayer(small_lossy_config(**cfg), 0, head_dim=D, num_kv_heads=H)
    k0, v0 = kv(1, 60, seed=7)
    layer.update(k0, v0)
    layer.release_chunk()
    layer.graph_prepare()  # fixed buffer, window at row 0
    token = layer.checkpoint()
    row = torch.zeros(1, dtype=torch.long)
    from types import SimpleNamespace

    ks, vs = kv(1, 40, seed=8)
    for i in range(40):
        layer.graph_prepare()
        row.fill_(layer.graph_advance())
        layer._graph_slot = SimpleNamespace(write_row=row)
        layer.update(ks[:, :, i : i + 1], vs[:, :, i : i + 1])
        layer._graph_slot = None
        layer.release_chunk()
    assert layer.compression_calls
    with pytest.raises(RuntimeError, match="no longer valid"):
        layer.rollback(token)


def test_failed_step_rolls_back_every_layer(model, monkeypatch) -> None:
    from spectralcache.integrations import graphed

    ids = tiny_prompt(1, 24, seed=9)
    cache = SpectralCache(model, small_lossy_config(**CFG))
    decoder = GraphedDecoder(model, cache, max_new_tokens=8, mode="static")
    first = decoder.next_ids(decoder.prefill(ids)).clone()
    nxt = decoder.next_ids(decoder.step(first)).clone()
    before = [(layer.get_seq_length(), layer.reconstruct()) for layer in cache.layers]
    calls = []
    real = graphed.GraphSlot.attend

    def fail(self, query, layer, scaling, softcap):
        calls.append(layer.layer_idx)
        if layer.layer_idx == 1:
            raise RuntimeError("injected")
        return real(self, query, layer, scaling, softcap)

    monkeypatch.setattr(graphed.GraphSlot, "attend", fail)
    with pytest.raises(RuntimeError, match="injected"):
        decoder.step(nxt)
    monkeypatch.setattr(graphed.GraphSlot, "attend", real)
    assert calls == [0, 1]
    for layer, (n, (k, v)) in zip(cache.layers, before):
        assert layer.get_seq_length() == n and layer._graph_slot is None
        k2, v2 = layer.reconstruct()
        assert torch.equal(k, k2) and torch.equal(v, v2)
    # and decoding goes on, equal to an eager cache fed the same tokens
    ref = SpectralCache(model, small_lossy_config(**CFG))
    a = decoder.step(nxt)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, ref))
        model(first, **cache_kwargs(model, ref))
        b = model(nxt, **cache_kwargs(model, ref)).logits[:, -1]
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_auto_on_cpu_is_the_eager_path(model) -> None:
    if torch.cuda.is_available():
        pytest.skip("auto captures on CUDA")
    ids = tiny_prompt(2, 30, seed=11)
    got = graphed_generate(model, ids, SpectralCache(model, small_lossy_config(**CFG)), 6)
    cache = SpectralCache(model, small_lossy_config(**CFG))
    want = []
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(model, cache)).logits[:, -1]
        for _ in range(6):
            nxt = logits.argmax(-1, keepdim=True)
            want.append(nxt)
            logits = model(nxt, **cache_kwargs(model, cache)).logits[:, -1]
    assert torch.equal(got, torch.cat(want, dim=1))


def test_refusals(model) -> None:
    cache = SpectralCache(model, small_lossy_config(**CFG, compress_layers=[0]))
    with pytest.raises(ValueError, match=r"layers \[1\] are not compressed"):
        GraphedDecoder(model, cache, mode="static")
    with pytest.raises(ValueError, match="hot_size"):
        GraphedDecoder(
            model, SpectralCache(model, small_lossy_config(**{**CFG, "hot_size": 0})), mode="static"
        )
    with pytest.raises(ValueError, match="mode"):
        GraphedDecoder(model, SpectralCache(model, small_lossy_config(**CFG)), mode="fast")
    torch_ref = SpectralCache(model, small_lossy_config(**CFG, attention_backend="torch"))
    with pytest.raises(ValueError, match="torch reference was requested"):
        GraphedDecoder(model, torch_ref, mode="static")
    GraphedDecoder(model, torch_ref, mode="eager")
    with pytest.raises(TypeError, match="SpectralCache"):
        GraphedDecoder(model, object())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs the model on CUDA"):
            GraphedDecoder(model, SpectralCache(model, small_lossy_config(**CFG)), mode="graph")
    import spectralcache

    cache = SpectralCache(model, small_lossy_config(**CFG))
    spectralcache.disable(model)
    try:
        with pytest.raises(ValueError, match="enable"):
            GraphedDecoder(model, cache, mode="static")
    finally:
        spectralcache.enable(model)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            GraphedDecoder(model, cache, mode="static")
    finally:
        model.eval()
    decoder = GraphedDecoder(model, SpectralCache(model, small_lossy_config(**CFG)), mode="static")
    ids = tiny_prompt(2, 12, seed=1)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left"):
        decoder.prefill(ids, attention_mask=mask)
    assert decoder.cache.get_seq_length() == 0
    decoder.prefill(ids)
    with pytest.raises(ValueError, match="batch"):
        decoder.step(ids[:1, :1])
    with pytest.raises(ValueError, match=r"\[batch, 1\]"):
        decoder.step(ids)


def _padded(batch: int, length: int, pads: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tiny_prompt(batch, length, seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def test_padded_batch_static_equals_eager(model) -> None:
    """Left padding: the static step (mask by cache index of fixed address, per-row positions)
    = the model's own forwards with the growing 2D mask and the same positions."""
    ids, mask = _padded(2, 34, [5, 0], seed=21)
    runs = {}
    for mode in ("eager", "static"):
        cache = SpectralCache(model, small_lossy_config(**CFG))
        decoder = GraphedDecoder(model, cache, max_new_tokens=8, mode=mode)
        runs[mode] = decoder.generate(ids, 8, attention_mask=mask, return_logits=True)
    assert torch.equal(runs["static"][0], runs["eager"][0])
    for a, b in zip(runs["static"][1], runs["eager"][1]):
        assert ((a - b).norm() / b.norm()).item() < 1e-3


def test_padded_batch_matches_dynamic_cache(model) -> None:
    """With an exact configuration (identity codecs, 16-bit) the padded static step = a
    DynamicCache decoded as ``generate`` does (mask of the padding, positions by cumsum)."""
    from transformers import DynamicCache

    exact = dict(
        CFG, key_codec="identity", value_codec="identity", coeff_bits=16, rank_keys=None, rank_values=None
    )
    ids, mask = _padded(3, 20, [0, 7, 2], seed=22)
    cache = SpectralCache(model, small_lossy_config(**exact))
    tokens, logits = GraphedDecoder(model, cache, max_new_tokens=6, mode="static").generate(
        ids, 6, attention_mask=mask, return_logits=True
    )
    dyn = DynamicCache(config=model.config)
    import spectralcache

    spectralcache.disable(model)
    try:
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, dyn)).logits[:, -1]
            m, p = mask, pos[:, -1:]
            for i in range(6):
                torch.testing.assert_close(logits[i], out, rtol=1e-4, atol=1e-4)
                nxt = tokens[:, i : i + 1]
                assert torch.equal(nxt, out.argmax(-1, keepdim=True))
                m = torch.cat([m, torch.ones_like(nxt)], dim=1)
                p = p + 1
                out = model(nxt, attention_mask=m, position_ids=p, **cache_kwargs(model, dyn)).logits[:, -1]
    finally:
        spectralcache.enable(model)
