"""Importance-aware outliers (issue 9, ``SpectralConfig.outlier_selection``), a default-off switch.

With ``"attention"`` / ``"mixed"`` a prefill chunk defers compressing its due blocks until spectral
attention hands the layer its queries (``SpectralLayer.observe_queries``); each block's outliers
are then the tokens the last ``observation_window`` queries attend most (SnapKV), or the best
rank-sum of that and the reconstruction residual. Checked here: the selection in
``compress_blocks`` against independently computed scores; a needle the residual cannot see is
kept exact by attention; the importance against a brute-force softmax; the deferred layout equals
the residual layout; a chunk that nobody observes is compressed whole by the next update; decode
is unchanged; rollback (layer checkpoint, and a forward failing after the observation);
exactness at full rank against dense attention and DynamicCache; config validation.
"""

from __future__ import annotations

import pytest
import torch
from tests.tiny_models import small_lossless_config as lossless
from tests.tiny_models import small_lossy_config as lossy
from tests.tiny_models import tiny_model, tiny_prompt
from transformers import DynamicCache

from spectralcache import SpectralCache
from spectralcache.attention.reference import dense_attention, spectral_attention
from spectralcache.cache.block import compress_blocks, outlier_score, reconstruct
from spectralcache.cache.layer import SpectralLayer
from spectralcache.config import SpectralConfig, get_preset, list_presets
from spectralcache.integrations.compat import cache_kwargs

H, D = 2, 16
pytestmark = pytest.mark.usefixtures("one_thread")


def kv(n: int, seed: int = 0, heads: int = H):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, n, D, generator=g), torch.randn(1, heads, n, D, generator=g)


def layer_for(cfg: SpectralConfig, heads: int = H) -> SpectralLayer:
    return SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=heads)


def cold_tensors(layer: SpectralLayer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.state().cold.tensors().items() if v is not None}


# ------------------------------------------------------------------------------ config


def test_config_fields_validated_and_default_off() -> None:
    for name in list_presets():
        cfg = get_preset(name)
        assert cfg.outlier_selection == "residual"
    for sel in ("residual", "attention", "mixed"):
        assert lossy(outlier_selection=sel).outlier_selection == sel
    with pytest.raises(ValueError, match="outlier_selection"):
        lossy(outlier_selection="snapkv")
    with pytest.raises(ValueError, match="observation_window"):
        lossy(observation_window=0)
    with pytest.raises(TypeError, match="observation_window"):
        lossy(observation_window=2.5)
    with pytest.raises(ValueError, match="outlier_pooling"):
        lossy(outlier_pooling=0)
    with pytest.raises(ValueError, match="outlier_pooling must be odd"):
        lossy(outlier_pooling=4)
    with pytest.raises(TypeError, match="outlier_pooling"):
        lossy(outlier_pooling=True)
    assert lossy(outlier_pooling=1, observation_window=1).outlier_pooling == 1


# ------------------------------------------------------------------------------ compress_blocks


def _blocks(seed: int = 0, nb: int = 3, t: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, H, nb, t, D, generator=g), torch.randn(1, H, nb, t, D, generator=g)


def test_attention_selection_keeps_the_most_important_tokens() -> None:
    cfg = lossy(outlier_selection="attention", outliers_per_block=3)
    k, v = _blocks(1)
    imp = torch.rand(1, H, 3, 32, generator=torch.Generator().manual_seed(2))
    cb = compress_blocks(k, v, cfg, 4, 6, importance=imp)
    want = imp.topk(3, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(cb.outlier_index, want)
    torch.testing.assert_close(
        cb.outlier_keys, torch.gather(k, 3, want.unsqueeze(-1).expand(-1, -1, -1, -1, D))
    )


def test_mixed_selection_is_the_rank_sum() -> None:
    cfg = lossy(outlier_selection="mixed", outliers_per_block=3)
    k, v = _blocks(3)
    imp = torch.rand(1, H, 3, 32, generator=torch.Generator().manual_seed(4))
    cb = compress_blocks(k, v, cfg, 4, 6, importance=imp)
    # residuals of the same fit, without outliers (no refit: the basis does not depend on them)
    plain = compress_blocks(k, v, lossy(outliers_per_block=0), 4, 6)
    rk, rv = reconstruct(plain)
    residual = outlier_score(k, rk, v, rv)  # [1, H, 3, 32]

    def rank01(x: torch.Tensor) -> torch.Tensor:
        return x.argsort(-1).argsort(-1).float() / 31

    want = (rank01(residual) + rank01(imp)).topk(3, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(cb.outlier_index, want)


def test_residual_selection_ignores_importance_and_shape_is_checked() -> None:
    k, v = _blocks(5)
    imp = torch.rand(1, H, 3, 32)
    a = compress_blocks(k, v, lossy(), 4, 6, importance=imp)
    b = compress_blocks(k, v, lossy(), 4, 6)
    for name, x in a.tensors().items():
        if x is not None:
            assert torch.equal(x, getattr(b, name)), name
    with pytest.raises(ValueError, match="importance must be"):
        compress_blocks(k, v, lossy(outlier_selection="attention"), 4, 6, importance=imp[..., :31])


def test_overflowing_rows_stay_forced_outliers_under_attention() -> None:
    k, v = _blocks(6)
    k[0, 0, 1, 7] = 1e7  # int8 scale would overflow float16: must be kept exact
    imp = torch.rand(1, H, 3, 32)
    imp[0, 0, 1, 7] = 0.0  # least important of its block
    cb = compress_blocks(k, v, lossy(outlier_selection="attention"), 4, 6, importance=imp)
    assert 7 in cb.outlier_index[0, 0, 1].tolist()


# ------------------------------------------------------------------------------ the layer


def _needle_case():
    """One block whose needle lies in the haystack's subspace (residual ~0) but is what the last
    queries attend to; three off-subspace distractors have the largest residuals."""
    g = torch.Generator().manual_seed(7)
    n, lm, t = 40, 3, 32
    e = torch.eye(D)
    k = 0.5 * torch.randn(1, 1, n, 2, generator=g) @ e[:2]  # rank-2 haystack keys
    v = 0.5 * torch.randn(1, 1, n, 2, generator=g) @ e[2:4]
    needle = lm + 11
    k[0, 0, needle] = 6.0 * e[0]
    distractors = [lm + 3, lm + 20, lm + 27]
    for i, j in enumerate(distractors):
        k[0, 0, j] += 3.0 * e[8 + i]
        v[0, 0, j] += 3.0 * e[12 + i]
    query = 0.1 * torch.randn(1, 2, n, D, generator=g)
    query[:, :, -4:] = 3.0 * e[0]  # the observation window looks at the needle
    assert n == lm + t + 5
    return k, v, query, needle - lm, [j - lm for j in distractors]


@pytest.mark.parametrize("selection", ["residual", "attention"])
def test_attention_keeps_the_needle_residual_misses(selection: str) -> None:
    k, v, query, needle, distractors = _needle_case()
    cfg = lossy(
        rank_keys=2, rank_values=2, outliers_per_block=2, observation_window=4, outlier_pooling=1
    ).replace(outlier_selection=selection)
    layer = layer_for(cfg, heads=1)
    layer.update(k, v)
    layer.observe_queries(query, D**-0.5)
    layer.release_chunk()
    assert layer.num_blocks == 1
    kept = layer.state().cold.outlier_index[0, 0, 0].tolist()
    if selection == "residual":
        assert needle not in kept and set(kept) <= set(distractors)
    else:
        assert needle in kept
    if selection == "attention":  # served exactly
        assert torch.equal(layer.reconstruct()[0][0, 0, 3 + needle], k[0, 0, 3 + needle])


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_importance_matches_brute_force(softcap: float | None) -> None:
    """Causal softmax over every exact key, summed over the window and the GQA group, max-pooled."""
    cfg = lossy(outlier_selection="attention", hot_size=8, observation_window=6, outlier_pooling=3)
    layer = layer_for(cfg)
    n = 3 + 64 + 10
    k, v = kv(n, seed=8)
    layer.update(k, v)
    assert layer.num_blocks == 0 and layer.hot_len == n - 3  # deferred
    q = torch.randn(1, 2 * H, n, D, generator=torch.Generator().manual_seed(9))
    m = 64
    got = layer._attention_importance(q, 0.3, softcap, m)
    w = 6
    want = torch.zeros(1, H, m)
    for head in range(2 * H):
        kvh = head // 2
        for i in range(n - w, n):
            s = (q[0, head, i] @ k[0, kvh, : i + 1].T) * 0.3
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            p = torch.softmax(s, -1)
            want[0, kvh] += p[3 : 3 + m]
    pooled = torch.stack([want[..., max(0, j - 1) : j + 2].amax(-1) for j in range(m)], dim=-1)
    torch.testing.assert_close(got, pooled, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("selection", ["attention", "mixed"])
def test_deferred_layout_equals_residual_layout(selection: str, tail: bool) -> None:
    """Same blocks (count, block length, starts) and hot window as the residual layer; while
    deferred the state is a valid all-exact one; the hot buffer ends exact-fit."""
    k, v = kv(200, seed=10)
    ref = layer_for(lossy(compress_tail=tail))
    lay = layer_for(lossy(compress_tail=tail, outlier_selection=selection))
    q = torch.randn(1, 2 * H, 200, D)
    for lo, hi in ((0, 90), (90, 200)):
        ref.update(k[:, :, lo:hi], v[:, :, lo:hi])
        ref.release_chunk()
        lay.update(k[:, :, lo:hi], v[:, :, lo:hi])
        st = lay.state()
        assert st.hot_start + st.hot_keys.shape[-2] == st.seq_len == hi
        lay.observe_queries(q[:, :, lo:hi])
        lay.release_chunk()
        assert (lay.num_blocks, lay.block_size, lay.hot_len) == (ref.num_blocks, ref.block_size, ref.hot_len)
        assert torch.equal(lay.state().cold.block_starts, ref.state().cold.block_starts)
        assert lay._hot_k.shape[-2] == lay.hot_len  # no prompt-sized buffer left held
        torch.testing.assert_close(lay.state().hot_keys, ref.state().hot_keys, atol=0, rtol=0)


def test_unobserved_chunk_is_compressed_whole_by_the_next_update() -> None:
    """A chunk nobody observed (no spectral attention call) leaves its blocks exact in the hot
    tier; the next update (here a decode step) compresses them by residual, exactly as a
    residual layer would have."""
    k, v = kv(120, seed=11)
    ref = layer_for(lossy())
    lay = layer_for(lossy(outlier_selection="attention"))
    for layer in (ref, lay):
        layer.update(k[:, :, :119], v[:, :, :119])
        layer.release_chunk()
    assert lay.num_blocks == 0 and ref.num_blocks > 0
    torch.testing.assert_close(lay.reconstruct()[0], k[:, :, :119], atol=0, rtol=0)
    for layer in (ref, lay):
        layer.update(k[:, :, 119:], v[:, :, 119:])
        layer.observe_queries(torch.randn(1, 2 * H, 1, D))  # a decode query: nothing to do
        layer.release_chunk()
    assert (lay.num_blocks, lay.hot_len) == (ref.num_blocks, ref.hot_len)
    a, b = cold_tensors(lay), cold_tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_decode_only_is_unchanged() -> None:
    k, v = kv(110, seed=12)
    ref = layer_for(lossy())
    lay = layer_for(lossy(outlier_selection="mixed"))
    for i in range(110):
        for layer in (ref, lay):
            layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
            layer.observe_queries(torch.randn(1, 2 * H, 1, D))
            layer.release_chunk()
        assert not lay._observe_due
    assert lay.num_blocks == ref.num_blocks > 0
    a, b = cold_tensors(lay), cold_tensors(ref)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_rollback_undoes_the_observed_compression() -> None:
    k, v = kv(200, seed=13)
    layer = layer_for(lossy(outlier_selection="attention"))
    layer.update(k[:, :, :80], v[:, :, :80])
    layer.observe_queries(torch.randn(1, 2 * H, 80, D))
    layer.release_chunk()
    before = (layer.num_blocks, layer.hot_len, layer.reconstruct(), len(layer.compression_calls))
    token = layer.checkpoint()
    layer.update(k[:, :, 80:], v[:, :, 80:])
    layer.observe_queries(torch.randn(1, 2 * H, 120, D))
    layer.release_chunk()
    assert layer.num_blocks > before[0]
    layer.rollback(token)
    assert (layer.num_blocks, layer.hot_len, len(layer.compression_calls)) == (
        before[0],
        before[1],
        before[3],
    )
    after = layer.reconstruct()
    assert torch.equal(after[0], before[2][0]) and torch.equal(after[1], before[2][1])
    # and the layer goes on exactly as one that never saw the rolled-back chunk
    layer.update(k[:, :, 80:], v[:, :, 80:])
    assert layer._observe_due


def test_bad_query_is_refused_and_the_layer_unchanged() -> None:
    k, v = kv(80, seed=14)
    layer = layer_for(lossy(outlier_selection="attention"))
    layer.update(k, v)
    with pytest.raises(ValueError, match="observe_queries needs"):
        layer.observe_queries(torch.randn(1, 3, 80, D))  # 3 query heads for 2 KV heads
    assert layer.num_blocks == 0 and layer._observe_due and layer.hot_len == 77


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("selection", ["attention", "mixed"])
def test_lossless_chunked_prefill_and_decode_match_dense(selection: str, key_space: str) -> None:
    """At full rank / 16 bits: each chunk attends like dense causal attention over the exact K/V
    (read the way the interface does: attend, observe, release), and so does every decode step."""
    cfg = lossless(outlier_selection=selection, compress_tail=True, key_space=key_space)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    layer = SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=H, rope_inv_freq=inv)
    n, chunk = 170, 50
    k, v = kv(n + 20, seed=15)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        q = torch.randn(1, 2 * H, hi - lo, D)
        layer.update(k[:, :, lo:hi], v[:, :, lo:hi])
        out = spectral_attention(q, layer.state())
        layer.observe_queries(q)
        layer.release_chunk()
        mask = torch.ones(hi - lo, hi, dtype=torch.bool).tril(lo)
        ref = dense_attention(q, k[:, :, :hi], v[:, :, :hi], mask.view(1, 1, hi - lo, hi))
        torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
    assert layer.num_blocks > 0
    for i in range(n, n + 20):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        qd = torch.randn(1, 2 * H, 1, D)
        got = spectral_attention(qd, layer.state())
        layer.release_chunk()
        torch.testing.assert_close(
            got.float(), dense_attention(qd, k[:, :, : i + 1], v[:, :, : i + 1], None), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(layer.reconstruct()[0], k, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ through a model


@pytest.mark.parametrize("selection", ["attention", "mixed"])
def test_lossless_generation_token_identical_and_observed(selection: str) -> None:
    model = tiny_model("llama")
    ids = tiny_prompt(1, 300, seed=1)
    cfg = lossless(block_size=64, hot_size=8, landmarks=4, outlier_selection=selection)
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **cache_kwargs(model, DynamicCache()), **kwargs)
        cache = SpectralCache(model, cfg)
        got = model.generate(ids, **cache_kwargs(model, cache), **kwargs)
    assert torch.equal(got, want)
    # the prefill deferred every block: right after it, blocks exist only if attention observed
    cache = SpectralCache(model, cfg)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache), use_cache=True)
    spectral = [layer for layer in cache.layers if isinstance(layer, SpectralLayer)]
    assert spectral and all(
        (layer.num_blocks, layer.hot_len, layer._observe_due) == (4, 300 - 4 - 4 * 64, False)
        for layer in spectral
    )


def test_forward_failing_after_the_observation_rolls_it_back() -> None:
    """Layer 0 compresses its deferred blocks inside the forward; an error later in that forward
    rolls them back with everything else, and the next call equals a fresh cache's."""
    model = tiny_model("llama")
    cfg = SpectralConfig(
        block_size=16,
        hot_size=4,
        landmarks=2,
        outliers_per_block=2,
        rank_keys=8,
        rank_values=8,
        outlier_selection="attention",
    )
    prompt, chunk = tiny_prompt(1, 100, seed=1), tiny_prompt(1, 20, seed=2)
    cache = SpectralCache(model, cfg)
    seen = {}

    def boom(*_):
        seen["blocks"] = cache.layers[0].num_blocks
        raise RuntimeError("boom after layer 0's attention")

    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        before = (cache.layer_lengths(), cache.layers[0].num_blocks, cache.layers[0].reconstruct())
        handle = model.model.layers[1].mlp.register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                model(chunk, past_key_values=cache, use_cache=True)
        finally:
            handle.remove()
        assert seen["blocks"] > before[1]  # the failing forward had compressed (observed) blocks
        assert cache.layer_lengths() == before[0] and cache.layers[0].num_blocks == before[1]
        assert torch.equal(cache.layers[0].reconstruct()[0], before[2][0])
        got = model(chunk, past_key_values=cache, use_cache=True).logits
        fresh = SpectralCache(model, cfg)
        model(prompt, past_key_values=fresh, use_cache=True)
        want = model(chunk, past_key_values=fresh, use_cache=True).logits
    assert torch.equal(got, want)
