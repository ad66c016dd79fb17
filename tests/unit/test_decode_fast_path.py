"""The q == 1 (decode) fast path of SpectralLayer / SpectralCache.update against the general path.

What the fast path skips, and what must still hold: the general ``_append`` (fast path off) gives
the same layer state, token for token; validation of a decode token against cached facts raises
the same errors as the full checks, and the facts are dropped on every layout change; a forward
failing in a later layer (or inside this layer's own fast update) restores this layer; NaN / inf
/ -inf decode tokens are still reported at the next sync point (now by scanning the rows stored
since the last check instead of a device flag folded every step); and a plain decode step runs
exactly two kernel-launching torch ops (the two hot-buffer copies).
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from tests.layer_helpers import D, H, T, kv, small_cfg
from tests.tiny_models import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from spectralcache.attention.reference import spectral_attention
from spectralcache.cache.cache import SpectralCache
from spectralcache.cache.layer import SpectralLayer
from spectralcache.config import SpectralConfig

pytestmark = pytest.mark.usefixtures("one_thread")

_COUNTERS = (
    "_seq_len",
    "_n_lm",
    "_nb",
    "_hot_lo",
    "_hot_hi",
    "_hot_start",
    "_chunk_start",
    "_unchecked_from",
)


def _layer(fast: bool, **cfg) -> SpectralLayer:
    layer = SpectralLayer(small_cfg(**cfg), 0, head_dim=D, num_kv_heads=H)
    layer.decode_fast_path = fast
    return layer


def _assert_same(a: SpectralLayer, b: SpectralLayer, q: torch.Tensor) -> None:
    for name in _COUNTERS:
        assert getattr(a, name) == getattr(b, name), name
    sa, sb = a.state(), b.state()
    for name in ("landmark_keys", "landmark_values", "hot_keys", "hot_values", "chunk_keys", "chunk_values"):
        assert torch.equal(getattr(sa, name), getattr(sb, name)), name
    assert (sa.cold is None) == (sb.cold is None)
    if sa.cold is not None:
        for name, x in sa.cold.tensors().items():
            y = getattr(sb.cold, name)
            assert (x is None and y is None) or torch.equal(x, y), name
    assert torch.equal(spectral_attention(q, sa), spectral_attention(q, sb))


@pytest.mark.parametrize(
    "cfg, prefill, dtype",
    [
        ({}, 1, torch.float32),  # landmarks fill during decode
        ({}, 30, torch.bfloat16),
        ({"landmarks": 0}, 7, torch.float32),
        ({"key_space": "post_rope", "coeff_bits": 4, "hot_size": 9}, 40, torch.float16),
    ],
)
def test_fast_path_equals_general_path(cfg, prefill, dtype, monkeypatch):
    """Fresh random tokens through compressions and hot-buffer reallocations: the state after
    every step is the same with the fast path on and off, and the fast path did most steps."""
    fast, slow = _layer(True, **cfg), _layer(False, **cfg)
    taken = []
    orig = SpectralLayer._append_decode

    def spy(self, k, v):
        done = orig(self, k, v)
        if self is fast:
            taken.append(done)
        return done

    monkeypatch.setattr(SpectralLayer, "_append_decode", spy)
    n = prefill + 5 * T + 3
    k, v = kv(2, n, seed=11, dtype=dtype)
    g = torch.Generator().manual_seed(12)
    for layer in (fast, slow):
        layer.update(k[:, :, :prefill], v[:, :, :prefill])
    for i in range(prefill, n):
        q = torch.randn(2, 2 * H, 1, D, generator=g).to(dtype)
        for layer in (fast, slow):
            layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        _assert_same(fast, slow, q)
        for layer in (fast, slow):
            layer.release_chunk()
    assert fast.num_blocks >= 4
    assert sum(taken) > len(taken) // 2 and not all(taken)  # both paths ran


_BAD = [
    (lambda k: k.double(), "dtype torch.float64 != cached dtype"),
    (lambda k: k.to(torch.float16), "dtype torch.float16 != cached dtype"),
    (lambda k: k.to(torch.int32), "unsupported dtype"),
    (lambda k: k.repeat(1, 2, 1, 1), "KV heads"),
    (lambda k: k[..., : D // 2], "head_dim"),
    (lambda k: k.repeat(2, 1, 1, 1), "!= cached batch"),
    (lambda k: k.to("meta"), "!= cached device"),
    (lambda k: k[0], "must be [batch, kv_heads, tokens, head_dim]"),
    (lambda k: k.tolist(), "must be a torch.Tensor"),
]


@pytest.mark.parametrize("make_bad, words", _BAD)
def test_cached_validation_refuses_what_the_full_checks_refuse(make_bad, words):
    """After decode tokens passed (facts cached), a bad one still gets the full checks' error
    (same type, same message; as keys, as values or both), and the layer is unchanged."""
    layer = _layer(True)
    k, v = kv(1, 40, seed=3)
    layer.update(k[:, :, :30], v[:, :, :30])
    for i in range(30, 33):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert layer._decode_facts is not None
    good = k[:, :, 33:34]
    bad = make_bad(good)
    fresh = _layer(True)
    fresh.update(k[:, :, :30], v[:, :, :30])
    for kk, vv in ((bad, bad), (bad, good), (good, bad)):
        with pytest.raises((TypeError, ValueError)) as cached_err:
            layer.update(kk, vv)
        with pytest.raises((TypeError, ValueError)) as full_err:
            fresh.update(kk, vv)
        assert type(cached_err.value) is type(full_err.value)
        assert str(cached_err.value) == str(full_err.value)
        if kk is vv:
            assert words in str(cached_err.value)
    assert layer.get_seq_length() == 33


def test_cached_validation_facts_are_dropped_on_layout_changes():
    layer = _layer(True)
    k, v = kv(1, 40, seed=4)
    layer.update(k[:, :, :30], v[:, :, :30])
    layer.update(k[:, :, 30:31], v[:, :, 30:31])
    layer.to(dtype=torch.float64)  # the cached facts said float32
    with pytest.raises(ValueError, match=r"dtype torch\.float32 != cached dtype torch\.float64"):
        layer.update(k[:, :, 31:32], v[:, :, 31:32])
    layer.update(k[:, :, 31:32].double(), v[:, :, 31:32].double())
    layer.batch_repeat_interleave(2)  # the cached facts said batch 1
    with pytest.raises(ValueError, match="batch 1 != cached batch 2"):
        layer.update(k[:, :, 32:33].double(), v[:, :, 32:33].double())


def _cache(n_layers: int = 3) -> SpectralCache:
    cfg = SpectralConfig(
        block_size=T, rank_keys=4, rank_values=6, hot_size=4, landmarks=3, outliers_per_block=2
    )
    return SpectralCache(
        tiny_config(
            "llama", head_dim=D, num_key_value_heads=H, num_attention_heads=2 * H, num_hidden_layers=n_layers
        ),
        cfg,
    )


def _fill(cache: SpectralCache, n: int, seed: int) -> None:
    for i in range(len(cache.layers)):
        k, v = kv(1, n, seed=seed + i)
        cache.update(k, v, i)
        cache.layers[i].release_chunk()


def _snapshot(cache: SpectralCache) -> list:
    out = []
    for layer in cache.layers:
        st = layer.state()
        out.append(
            (
                [getattr(layer, name) for name in _COUNTERS],
                [x.clone() for x in (st.landmark_keys, st.hot_keys, st.hot_values)],
                layer._hot_k.data_ptr(),
            )
        )
    return out


def _same_snapshot(a: list, b: list) -> None:
    for (ca, ta, pa), (cb, tb, pb) in zip(a, b):
        assert ca == cb and pa == pb
        assert all(torch.equal(x, y) for x, y in zip(ta, tb))


@pytest.mark.parametrize("fail", ["later_layer_update", "later_layer_attention", "inside_fast_update"])
def test_failed_decode_forward_rolls_back_fast_path_layers(fail, monkeypatch):
    """A decode forward whose layers 0..1 took the fast path fails at layer 2 (or inside layer 1's
    own fast update, after its writes): every layer is restored, and the next step continues
    exactly like a cache that never saw the failed one."""
    cache, ref = _cache(), _cache()
    for c in (cache, ref):
        _fill(c, 30, seed=0)
    tok = [kv(1, 1, seed=100 + i) for i in range(8)]
    for step in range(2):  # past the first decode step (it reallocates the exact-fit hot buffer)
        for c in (cache, ref):
            for i in range(3):
                c.update(*tok[(step + i) % 8], i)
                c.layers[i].release_chunk()
    before = _snapshot(cache)
    taken = []
    orig = SpectralLayer._append_decode

    def spy(self, k, v):
        done = orig(self, k, v)
        taken.append(done)
        if fail == "inside_fast_update" and self is cache.layers[1]:
            raise RuntimeError("injected failure after the fast writes")
        return done

    monkeypatch.setattr(SpectralLayer, "_append_decode", spy)
    with pytest.raises((RuntimeError, ValueError)):
        cache._begin_forward()
        try:
            for i in range(3):
                k, v = tok[i]
                if i == 2 and fail == "later_layer_update":
                    k = k.double()  # refused by validation
                cache.update(k, v, i)
                if i == 2 and fail == "later_layer_attention":
                    raise RuntimeError("injected failure in the model after layer 2's update")
                cache.layers[i].release_chunk()
        except BaseException:
            cache._end_forward(failed=True)
            raise
    monkeypatch.undo()
    assert taken[:2] == [True, True]
    _same_snapshot(_snapshot(cache), before)
    assert not any(layer.has_pending_chunk for layer in cache.layers)
    # the next steps: identical to the cache that never saw the failed one
    for step in range(3, 8):
        for c in (cache, ref):
            c._begin_forward()
            for i in range(3):
                c.update(*tok[(step + i) % 8], i)
                c.layers[i].release_chunk()
            c._end_forward(failed=False)
    for la, lb in zip(cache.layers, ref.layers):
        assert all(torch.equal(x, y) for x, y in zip(la.reconstruct(), lb.reconstruct()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["hot_value", "landmark", "compressing_step"])
def test_nonfinite_decode_token_reported_at_next_sync_point(bad, where):
    """Through the cache (fast path, no device flag any more): a NaN / inf / -inf decode token
    is accepted without a host read, then memory_report and the next compression raise naming
    the layer and its cache index; a token arriving on the very step that compresses a block is
    refused there, and the cache is unchanged."""
    cache = _cache(2)
    prefill = 1 if where == "landmark" else 30
    _fill(cache, prefill, seed=5)
    layer = cache.layers[1]
    bad_at = {"landmark": 2, "hot_value": 33, "compressing_step": None}[where]
    if where == "compressing_step":  # the step whose update compresses a block
        bad_at = prefill
        while layer.hot_len + (bad_at - prefill) + 1 < layer.config.hot_size + T:
            bad_at += 1
    for i in range(prefill, bad_at + 1):
        for j, lay in enumerate(cache.layers):
            k, v = kv(1, 1, seed=1000 + 7 * i + j)
            if i == bad_at and j == 1:
                v[0, 1, 0, 3] = bad
            if i == bad_at and j == 1 and where == "compressing_step":
                nb = lay.num_blocks
                with pytest.raises(
                    ValueError, match=rf"layer 1: .*NaN or inf \(first at cache index {bad_at}\)"
                ):
                    cache.update(k, v, j)
                assert lay.num_blocks == nb and lay.get_seq_length() == bad_at
                return
            cache.update(k, v, j)
            lay.release_chunk()
        if i == bad_at - 1:
            cache.memory_report()  # a sync point: every stored row is checked, nothing pending
            assert layer._unchecked_from is None
    assert layer._unchecked_from == bad_at
    with pytest.raises(ValueError, match=rf"layer 1: .*NaN or inf \(first at cache index {bad_at}\)"):
        cache.memory_report()
    with pytest.raises(ValueError, match=rf"cache index {bad_at}"):
        for i in range(bad_at + 1, bad_at + 3 * T):
            k, v = kv(1, 1, seed=i)
            cache.update(k, v, 0)
            cache.layers[0].release_chunk()
            cache.update(k, v, 1)
            layer.release_chunk()
    for x in layer.state().cold.tensors().values() if layer.state().cold is not None else ():
        if x is not None and x.is_floating_point():
            assert torch.isfinite(x).all()


def test_checked_rows_are_not_read_again_and_rollback_restores_the_marker(monkeypatch):
    layer = _layer(True)
    k, v = kv(1, 40, seed=6)
    layer.update(k[:, :, :30], v[:, :, :30])
    layer.update(k[:, :, 30:31], v[:, :, 30:31])
    assert layer._unchecked_from == 30
    layer.check_finite()
    assert layer._unchecked_from is None
    reads = []
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or True)
    layer.check_finite()  # nothing stored since: no host read
    assert reads == []
    monkeypatch.undo()
    token = layer.checkpoint()
    bad = k[:, :, 31:32].clone()
    bad[0, 0, 0, 0] = float("nan")
    layer.update(bad, v[:, :, 31:32])
    assert layer._unchecked_from == 31
    layer.rollback(token)  # the poisoned step is undone, and so is its mark
    assert layer._unchecked_from is None
    layer.check_finite()


class _OpLog(TorchDispatchMode):
    _VIEWS: ClassVar[set[str]] = {
        "slice",
        "alias",
        "view",
        "as_strided",
        "transpose",
        "select",
        "unsqueeze",
        "expand",
        "detach",
    }

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.rstrip("_") not in self._VIEWS and not name.startswith("empty"):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_plain_decode_step_runs_two_kernel_ops():
    """SpectralCache.update of a decode token that fits the hot buffer: the two copies into it,
    nothing else that would launch a kernel on CUDA (views and allocations are not counted).
    Before the fast path: 7 (the 5-launch NaN fold and the copies)."""
    cache = _cache(1)
    _fill(cache, 30, seed=9)
    layer = cache.layers[0]
    plain = 0
    for i in range(12):
        k, v = kv(1, 1, seed=50 + i)
        grows = layer._hot_hi >= layer._hot_k.shape[2]
        nb = layer.num_blocks
        log = _OpLog()
        with log:
            cache.update(k, v, 0)
            layer.state()
        layer.release_chunk()
        if not grows and layer.num_blocks == nb:
            assert log.ops == ["copy_", "copy_"], log.ops
            plain += 1
    assert plain >= 8
