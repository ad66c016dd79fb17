"""The layer's storage layout: preallocated, append-only tiers, checkpoint / rollback.

A twin layer that never saw the rolled-back update is the reference: after ``rollback`` the
layer must be indistinguishable from it (state tensors, counters, and every later update).
"""

import itertools

import pytest
import torch
from tests.layer_helpers import D, H, T, kv, rotator, small_cfg

from spectralcache.cache.layer import COLD_GROWTH, SpectralLayer
from spectralcache.cache.rope import RopeRotator
from spectralcache.cache.state import ColdBlocks

pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(key_space="post_rope", **kw):
    rot = rotator() if key_space == "pre_rope" else None
    return SpectralLayer(small_cfg(key_space=key_space, **kw), 0, head_dim=D, num_kv_heads=H, rotator=rot)


def _tensors_of(layer):
    st = layer.state()
    out = {
        "landmark_keys": st.landmark_keys,
        "landmark_values": st.landmark_values,
        "hot_keys": st.hot_keys,
        "hot_values": st.hot_values,
    }
    if st.cold is not None:
        out.update({f"cold.{k}": v for k, v in st.cold.tensors().items()})
    return st, out


def assert_same(a: SpectralLayer, b: SpectralLayer) -> None:
    assert (a.get_seq_length(), a.num_blocks, a.hot_len, a.num_landmarks) == (
        b.get_seq_length(),
        b.num_blocks,
        b.hot_len,
        b.num_landmarks,
    )
    if b.get_seq_length() == 0:
        return
    sa, ta = _tensors_of(a)
    sb, tb = _tensors_of(b)
    assert (sa.hot_start, sa.seq_len, sa.chunk_start) == (sb.hot_start, sb.seq_len, sb.chunk_start)
    assert ta.keys() == tb.keys()
    for name in ta:
        x, y = ta[name], tb[name]
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype, name
            assert torch.equal(x, y), name


def test_state_is_views_into_preallocated_buffers():
    layer = make_layer()
    k, v = kv(2, 3 + 3 * T + 5, seed=1)
    layer.update(k, v)
    st = layer.state()
    cold = st.cold
    assert cold.num_blocks == 3 and cold.key_coeffs.shape == (2, H, 3, T, 4)
    assert cold.block_starts.tolist() == [3, 3 + T, 3 + 2 * T]
    # a prefill into an empty cold tier allocates exactly what it needs
    assert layer.cold_capacity == 3
    # views share the layer's buffers (no copy per state() call)
    assert st.hot_keys.untyped_storage().data_ptr() == layer.state().hot_keys.untyped_storage().data_ptr()
    assert cold.key_coeffs.untyped_storage().data_ptr() == layer._cold.key_coeffs.untyped_storage().data_ptr()
    # the tensor fields are derived from the dataclass, block_starts included
    assert "block_starts" in ColdBlocks.tensor_fields() and "block_size" not in ColdBlocks.tensor_fields()


def test_cold_tier_grows_geometrically_during_decode():
    layer = make_layer()
    k, v = kv(1, 3 + 40 * T, seed=2)
    layer.update(k[:, :, :40], v[:, :, :40])
    ptrs, caps = set(), []
    for i in range(40, k.shape[2]):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        layer.release_chunk()
        if layer._cold is not None:
            ptrs.add(layer._cold.key_coeffs.untyped_storage().data_ptr())
            if not caps or caps[-1] != layer.cold_capacity:
                caps.append(layer.cold_capacity)
    nb = layer.num_blocks
    assert nb >= 38 and layer.cold_capacity >= nb
    # amortized: each reallocation grows by COLD_GROWTH (at least one block), so there are
    # O(log nb) of them, not one per block
    for a, b in itertools.pairwise(caps):
        assert b >= max(a + 1, int(a * COLD_GROWTH))
    assert len(caps) <= 16 < nb
    # the live blocks equal a fresh prefill-free reference: reconstruct is exact over every tier
    ref = make_layer()
    ref.update(k[:, :, :40], v[:, :, :40])
    for i in range(40, k.shape[2]):
        ref.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
    torch.testing.assert_close(layer.reconstruct()[0], ref.reconstruct()[0], rtol=0, atol=0)


def test_hot_buffer_is_append_only_during_decode():
    layer = make_layer()
    k, v = kv(1, 400, seed=3)
    layer.update(k[:, :, :30], v[:, :, :30])
    reallocations = 0
    ptr = layer._hot_k.untyped_storage().data_ptr()
    for i in range(30, 400):
        hot_before = layer.state().hot_keys.clone()
        lo_before = layer._hot_lo
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        new_ptr = layer._hot_k.untyped_storage().data_ptr()
        if new_ptr != ptr:
            reallocations += 1
            ptr = new_ptr
        elif layer._hot_lo > lo_before:
            # a block moved to the cold tier: only the window start advanced, nothing shifted
            moved = layer._hot_lo - lo_before
            torch.testing.assert_close(layer.state().hot_keys[:, :, :-1], hot_before[:, :, moved:])
    # one reallocation per `hot_slack` decode tokens at most (not one per token)
    assert 0 < reallocations <= (400 - 30) // layer.hot_slack + 1


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize(
    ("history", "failed"),
    [
        ([], 40),  # rollback of the very first update (lazy initialization)
        ([2], 40),  # landmarks partly filled, then a prefill chunk with compressions
        ([30], 1),  # plain decode token
        ([30] + [1] * 25, 1),  # decode token that triggers a block compression
        ([30] + [1] * 7, 1),  # decode token that reallocates the hot buffer
        ([3 + 8 * T], 5 * T),  # prefill chunk that grows the cold buffers
        ([3 + 8 * T, 1, 1], 3),  # short chunk after decode
    ],
)
def test_rollback_restores_the_layer_exactly(key_space, history, failed):
    layer, twin = make_layer(key_space), make_layer(key_space)
    total = sum(history) + failed + 3 * T
    k, v = kv(2, total, seed=sum(history) + failed)
    pos = 0
    for n in history:
        for lay in (layer, twin):
            lay.update(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
            lay.release_chunk()
        pos += n
    token = layer.checkpoint()
    # an update whose forward fails later: the layer must come back exactly
    junk_k, junk_v = kv(2, failed, seed=99)
    layer.update(junk_k, junk_v)
    layer.rollback(token)
    assert_same(layer, twin)
    assert len(layer.compression_calls) == len(twin.compression_calls)
    # ...and keep behaving like the twin (the junk never resurfaces)
    for n in (failed, 1, 1, 2 * T, 1):
        for lay in (layer, twin):
            lay.update(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        pos += n
        assert_same(layer, twin)
    torch.testing.assert_close(layer.reconstruct()[0], twin.reconstruct()[0], rtol=0, atol=0)


def test_rollback_is_refused_after_a_structural_change():
    layer = make_layer()
    k, v = kv(2, 60, seed=4)
    layer.update(k[:, :, :50], v[:, :, :50])
    token = layer.checkpoint()
    layer.update(k[:, :, 50:51], v[:, :, 50:51])
    layer.crop(-3)
    with pytest.raises(RuntimeError, match="no longer valid"):
        layer.rollback(token)
    other = make_layer()
    with pytest.raises(ValueError, match="this layer"):
        other.rollback(layer.checkpoint())
    # nested checkpoints: rolling back the inner one keeps the outer one valid (the cache
    # checkpoints every layer per forward, the layer itself per update)
    outer = layer.checkpoint()
    twin_state = layer.reconstruct()
    layer.update(k[:, :, 51:52], v[:, :, 51:52])
    inner = layer.checkpoint()
    n_inner = layer.get_seq_length()
    layer.update(k[:, :, 52:54], v[:, :, 52:54])
    layer.rollback(inner)
    layer.rollback(inner)  # again: still the same state
    assert layer.get_seq_length() == n_inner
    layer.rollback(outer)
    assert all(torch.equal(a, b) for a, b in zip(layer.reconstruct(), twin_state))
    # ...but a checkpoint taken after the one rolled back to is stale: its windows get reused
    with pytest.raises(RuntimeError, match="no longer valid"):
        layer.rollback(inner)
    layer.rollback(outer)


def test_failed_update_restores_the_layer():
    """A failure inside update (here: the compression refuses a block) rolls back by itself."""
    layer, twin = make_layer(), make_layer()
    k, v = kv(1, 3 + 2 * T, seed=5)
    for lay in (layer, twin):
        lay.update(k[:, :, :20], v[:, :, :20])
        lay.release_chunk()
    bad_k, bad_v = kv(1, 2 * T, seed=6)
    bad_k[:, :, 3:6] = 3e37  # three rows per block too large for float16 scales, 2 outliers allowed
    outer = layer.checkpoint()  # what the cache takes before every layer's update in a forward
    with pytest.raises(ValueError, match="layer 0: cannot compress cache indices"):
        layer.update(bad_k, bad_v)
    assert_same(layer, twin)
    assert layer.pending_chunk_keys is None
    layer.rollback(outer)  # the update's own rollback left the outer checkpoint valid
    assert_same(layer, twin)


def test_pure_rotate_block_keys_matches_the_rotator_and_the_state_carries_tensors_only():
    import dataclasses

    from spectralcache.cache.rope import rotate_block_keys

    g = torch.Generator().manual_seed(7)
    inv = 1.0 / (500000.0 ** (torch.arange(0, 12, 2, dtype=torch.float) / 12))  # partial rotary: 12 of 16
    keys = torch.randn(2, H, 3, T, D, generator=g)
    starts = torch.tensor([5, 5 + T, 5 + 2 * T])
    got = rotate_block_keys(keys, starts, inv)
    # hand-written rotate-half over the leading 12 dims, angle = float32(cache index) * inv_freq
    pos = (starts[:, None] + torch.arange(T)).float()[..., None] * inv  # [nb, T, 6]
    cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)
    xr = keys[..., :12]
    want = torch.cat([xr * cos + torch.cat([-xr[..., 6:], xr[..., :6]], -1) * sin, keys[..., 12:]], -1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(RopeRotator(inv, D).rotate_block_keys(keys, starts), got, rtol=0, atol=0)
    # the layer's state: tensors and plain values only (no bound methods)
    layer = SpectralLayer(small_cfg(key_space="pre_rope"), 0, head_dim=D, num_kv_heads=H, rope_inv_freq=inv)
    k, v = kv(1, 3 + 2 * T + 4, seed=8)
    layer.update(k, v)
    st = layer.state()
    assert torch.equal(st.rope_inv_freq, inv) and st.rope_inv_freq.dtype == torch.float32
    for f in dataclasses.fields(st):
        assert not callable(getattr(st, f.name)) or isinstance(getattr(st, f.name), torch.Tensor), f.name
    # the post-RoPE reconstruction uses exactly this function
    rk, _ = layer.reconstruct()
    assert rk.shape == (1, H, 3 + 2 * T + 4, D)
    with pytest.raises(ValueError, match="rope_inv_freq"):
        SpectralLayer(small_cfg(key_space="pre_rope"), 0)


def test_offload_prefetch_and_batch_ops_keep_the_tiers():
    layer, twin = make_layer(), make_layer()
    k, v = kv(3, 3 + 4 * T + 5, seed=12)
    for lay in (layer, twin):
        lay.update(k, v)
        lay.release_chunk()
        for i in range(3):  # decode slack in the hot buffer, more cold capacity than blocks
            lay.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
            lay.release_chunk()
    layer.offload()
    layer.prefetch()
    assert_same(layer, twin)
    idx = torch.tensor([2, 0])
    layer.batch_select_indices(idx)
    want = [x[idx] for x in twin.reconstruct()]
    got = layer.reconstruct()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # compacted: capacities now equal what is used
    assert layer.cold_capacity == layer.num_blocks
    assert layer.tier_tensors()["hot"][0].shape[-2] == layer.hot_len
    layer.reorder_cache(torch.tensor([1, 1]))
    layer.batch_repeat_interleave(2)
    assert layer.state().hot_keys.shape[0] == 4 and layer.batch_size == 4
    torch.testing.assert_close(layer.reconstruct()[0][3], want[0][1], rtol=0, atol=0)  # original row 0
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.num_blocks == 0
