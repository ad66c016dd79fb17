"""The decode path reads nothing on the host; NaN/inf from decode tokens is caught at the next
natural sync point and never enters a compressed block."""

import pytest
import torch
from tests.layer_helpers import D, H, T, kv, small_cfg

from spectralcache.cache.layer import SpectralLayer
from spectralcache.config import SpectralConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(**kw):
    return SpectralLayer(small_cfg(**kw), 0, head_dim=D, num_kv_heads=H)


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


def test_decode_update_makes_no_host_read(monkeypatch):
    """Counted: every Python-level way to read a tensor value on the host, during decode steps
    that compress nothing (and the hot buffer reallocation included)."""
    layer = make_layer()
    k, v = kv(2, 200)
    layer.update(k[:, :, :30], v[:, :, :30])
    layer.release_chunk()
    calls: dict[str, int] = {}
    for name in _HOST_READS:
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    no_block_steps = 0
    reallocated = False
    for i in range(30, 200):
        nb, ptr = layer.num_blocks, layer._hot_k.data_ptr()
        before = dict(calls)
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        layer.state()
        layer.release_chunk()
        if layer.num_blocks == nb:  # no block was due: not a single host read
            assert calls == before, (i, calls, before)
            no_block_steps += 1
            reallocated |= layer._hot_k.data_ptr() != ptr
        else:  # a compression is a natural sync point (and reads the NaN/inf flag there)
            assert calls.get("__bool__", 0) > before.get("__bool__", 0)
    monkeypatch.undo()
    assert no_block_steps > 100 and reallocated


def test_decode_update_runs_on_the_meta_device():
    """Stronger and CUDA-free: tensors on the meta device have no data, so any host read
    (``.item()``, ``bool()``, ``nonzero``, data-dependent shapes, copies to the host) raises.
    Decode steps that compress nothing run there; the one that compresses a block does not."""
    layer = make_layer()
    k, v = kv(1, 40)
    layer.update(k, v)
    layer.to("meta")
    steps = 0
    while layer.hot_len + 1 < 4 + T:  # hot_size + block_size: the next token would compress
        x = torch.randn(1, H, 1, D, device="meta")
        layer.update(x, x)
        st = layer.state()
        assert st.hot_keys.device.type == "meta" and st.cold.key_coeffs.device.type == "meta"
        steps += 1
    assert steps >= 10
    x = torch.randn(1, H, 1, D, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        layer.update(x, x)  # compression reads the NaN/inf flag on the host


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_decode_token_is_reported_at_the_next_sync_point(bad):
    layer = make_layer()
    k, v = kv(1, 120, seed=1)
    layer.update(k[:, :, :30], v[:, :, :30])
    layer.release_chunk()
    blocks = layer.num_blocks
    # decode steps: the poisoned one is accepted without a host read
    for i in range(30, 33):
        kk = k[:, :, i : i + 1].clone()
        if i == 31:
            kk[0, 1, 0, 5] = bad
        layer.update(kk, v[:, :, i : i + 1])
        layer.release_chunk()
    assert layer.get_seq_length() == 33
    # explicit check (what memory_report calls) names the layer and the first bad cache index
    with pytest.raises(
        ValueError, match=r"layer 0: a decode step stored .*NaN or inf \(first at cache index 31\)"
    ):
        layer.check_finite()
    # the next decode steps go on until a block is due: that update is refused, unchanged
    i = 33
    with pytest.raises(ValueError, match="cache index 31"):
        while True:
            layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
            layer.release_chunk()
            i += 1
    assert layer.num_blocks == blocks and layer.get_seq_length() == i
    # ...so no non-finite value ever entered a compressed block
    cold = layer.state().cold
    for name, x in cold.tensors().items():
        if x is not None and x.is_floating_point():
            assert torch.isfinite(x).all(), name
    # a prefill chunk is a sync point too
    with pytest.raises(ValueError, match="cache index 31"):
        layer.update(k[:, :, i : i + 2], v[:, :, i : i + 2])
    # cropping the poisoned token away clears it; the layer works again
    layer.crop(-(layer.get_seq_length() - 31))
    layer.check_finite()
    for j in range(31, 31 + 2 * T):
        layer.update(k[:, :, j : j + 1], v[:, :, j : j + 1])
    assert layer.num_blocks > blocks
    assert all(torch.isfinite(x).all() for x in layer.reconstruct())


def test_nonfinite_prefill_chunk_is_refused_before_any_change():
    layer = make_layer()
    k, v = kv(1, 60, seed=2)
    layer.update(k[:, :, :40], v[:, :, :40])
    k2 = k[:, :, 40:].clone()
    k2[0, 0, 7, 0] = float("nan")
    before = layer.reconstruct()
    with pytest.raises(
        ValueError, match="layer 0: key/value states contain NaN or inf; the cache was not changed"
    ):
        layer.update(k2, v[:, :, 40:])
    after = layer.reconstruct()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_but_finite_decode_token_does_not_block_compression(dtype):
    """Before: a finite key of 1e10 made every later compression raise (float16 scale overflow),
    so the cache could never compress again. Now the row is kept exact and compression goes on."""
    layer = make_layer(coeff_bits=4)
    k, v = kv(1, 3 + 6 * T, seed=3)
    k, v = k.to(dtype), v.to(dtype)
    layer.update(k[:, :, :20], v[:, :, :20])
    huge_at = 21
    k[0, 1, huge_at] = 1e10
    for i in range(20, k.shape[2]):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        layer.release_chunk()
    assert layer.num_blocks >= 4  # the block holding the huge token and later ones compressed
    rk, _ = layer.reconstruct(dtype=torch.float32)
    assert torch.equal(rk[0, 1, huge_at], k[0, 1, huge_at].float())
    assert torch.isfinite(rk).all()


def test_cache_level_decode_update_runs_on_the_meta_device():
    """The same through SpectralCache.update (every layer, handshake included)."""
    from tests.tiny_models import tiny_config

    from spectralcache.cache.cache import SpectralCache

    cfg = SpectralConfig(
        block_size=32, rank_keys=6, rank_values=9, hot_size=5, landmarks=3, outliers_per_block=4
    )
    cache = SpectralCache(
        tiny_config("llama", head_dim=64, num_key_value_heads=2, num_attention_heads=4), cfg
    )
    for i in range(len(cache.layers)):
        k = torch.randn(1, 2, 50, 64)
        cache.update(k, k.clone(), i)
        cache.layers[i].release_chunk()
    cache.to("meta")
    for _ in range(5):
        for i in range(len(cache.layers)):
            x = torch.randn(1, 2, 1, 64, device="meta")
            cache.update(x, x, i)
            assert cache.layers[i].state().hot_keys.device.type == "meta"
            cache.layers[i].release_chunk()
    assert cache.get_seq_length() == 55
