"""Checks read once at the forward's end (cache/deferred.py), as the cache does on CUDA.

A prefill through an enabled model no longer synchronizes the device per layer: NaN / inf and
blocks with too many huge rows are flagged on the device and read at the forward's end, where a
failed check rolls every layer back and raises. ``deferring()`` forces the same path on CPU.
Each test here fails if the deferral is not taken (the error would come from the layer that
noticed, before later layers run) or if it changes what a clean forward stores.
"""

from __future__ import annotations

import pytest
import torch
from tests.tiny_models import small_lossy_config, tiny_model, tiny_prompt

from spectralcache import SpectralCache
from spectralcache.cache.block import compress_blocks
from spectralcache.cache.deferred import DeferredCheck, DeviceSeconds, deferring, first_failure
from spectralcache.cache.state import ColdBlocks

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = small_lossy_config()


def _blocks(seed: int, n: int = 6, t: int = 32, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g), torch.randn(n, t, d, generator=g)


def _fields(blocks: ColdBlocks) -> dict[str, torch.Tensor]:
    fields = {name: getattr(blocks, name) for name in blocks.tensor_fields()}
    return {name: x for name, x in fields.items() if x is not None}


@pytest.mark.parametrize("seed", range(3))
def test_clean_blocks_compress_the_same_with_deferred_checks(seed: int) -> None:
    k, v = _blocks(seed)
    k[1, 5] *= 1e6  # one huge row (within outliers_per_block): served exactly either way
    want = compress_blocks(k, v, CFG, 4, 6)
    checks: list[DeferredCheck] = []
    with deferring():
        got = compress_blocks(k, v, CFG, 4, 6, deferred_checks=checks)
    assert len(checks) == 1 and first_failure(checks) is None
    for name, x in _fields(want).items():
        assert torch.equal(x, _fields(got)[name]), name


def test_nan_rows_are_flagged_and_kept_out_of_the_fit() -> None:
    k, v = _blocks(7)
    k[2, 3, 0] = float("nan")
    v[4, 9, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        compress_blocks(k, v, CFG, 4, 6)  # read at once: refused
    checks: list[DeferredCheck] = []
    with deferring():
        got = compress_blocks(k, v, CFG, 4, 6, deferred_checks=checks)
    assert "NaN or inf" in (first_failure(checks) or "")
    # no solver saw the NaN: every fitted tensor is finite (the bad rows sit in the outliers)
    for name in ("key_coeffs", "key_scales", "key_basis", "value_coeffs", "value_scales", "value_basis"):
        x = getattr(got, name)
        assert x is None or bool(torch.isfinite(x.float()).all()), name
    assert 3 in got.outlier_index[2].tolist() and 9 in got.outlier_index[4].tolist()


def test_too_many_huge_rows_are_flagged() -> None:
    k, v = _blocks(8)
    v[3, : CFG.outliers_per_block + 1] *= 1e35  # more huge rows than outlier slots in block 3
    with pytest.raises(ValueError, match="too large"):
        compress_blocks(k, v, CFG, 4, 6)
    checks: list[DeferredCheck] = []
    with deferring():
        compress_blocks(k, v, CFG, 4, 6, deferred_checks=checks)
    assert "too large" in (first_failure(checks) or "")


def test_checks_are_read_at_once_without_deferring_on_cpu() -> None:
    k, v = _blocks(9)
    k[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        compress_blocks(k, v, CFG, 4, 6, deferred_checks=[])  # CPU, not forced: not deferred


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_forward_runs_every_layer_then_refuses_and_rolls_back(llama) -> None:
    """Deferred: layer 0's NaN is read at the end, so layer 1 ran; then everything is undone."""
    prompt, chunk = tiny_prompt(1, 80, seed=1), tiny_prompt(1, 40, seed=2)
    cache = SpectralCache(llama, CFG)
    ran: list[int] = []
    with torch.no_grad(), deferring():
        llama(prompt, past_key_values=cache, use_cache=True)
        before = [(layer.get_seq_length(), layer.num_blocks) for layer in cache.layers]
        reference = [layer.reconstruct() for layer in cache.layers]
        handles = [
            llama.model.layers[0].self_attn.k_proj.register_forward_hook(
                lambda m, a, out: out * float("nan")
            ),
            llama.model.layers[-1].register_forward_pre_hook(lambda *_: ran.append(1)),
        ]
        try:
            with pytest.raises(ValueError, match=r"layer 0: .*NaN or inf.*cache is unchanged"):
                llama(chunk, past_key_values=cache, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        assert ran == [1] and len(llama.model.layers) == 2  # refused after the whole forward
        assert [(layer.get_seq_length(), layer.num_blocks) for layer in cache.layers] == before
        for layer, (rk, rv) in zip(cache.layers, reference, strict=True):
            k, v = layer.reconstruct()
            assert torch.equal(k, rk) and torch.equal(v, rv)
        assert all(layer.deferred_checks is None for layer in cache.layers)
        # and the cache goes on as if the refused call never happened
        got = llama(chunk, past_key_values=cache, use_cache=True).logits
        twin = SpectralCache(llama, CFG)
        llama(prompt, past_key_values=twin, use_cache=True)
        want = llama(chunk, past_key_values=twin, use_cache=True).logits
    assert torch.equal(got, want)


def test_deferred_prefill_stores_what_checks_at_once_store(llama) -> None:
    prompt = tiny_prompt(2, 150, seed=3)
    caches = []
    for deferred in (False, True):
        cache = SpectralCache(llama, CFG)
        with torch.no_grad():
            if deferred:
                with deferring():
                    llama(prompt, past_key_values=cache, use_cache=True)
            else:
                llama(prompt, past_key_values=cache, use_cache=True)
        caches.append(cache)
    assert caches[0].layers[0].num_blocks > 0
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        ka, va = a.reconstruct()
        kb, vb = b.reconstruct()
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    stats = caches[1].compression_stats()
    assert stats["blocks"] == caches[0].compression_stats()["blocks"] and stats["seconds"] > 0


def test_huge_rows_in_a_deferred_forward_roll_back_every_layer(llama) -> None:
    cache = SpectralCache(llama.config, CFG)
    k = torch.randn(1, 2, 100, 32)
    huge = k.clone()
    huge[:, :, 10:20] *= 1e35  # > outliers_per_block rows too large for int8 scales in one block
    with deferring():
        cache._begin_forward()  # what the hooks of an enabled model do around its forward
        cache.update(k, k, 0)
        cache.update(huge, huge, 1)  # not refused here: the flag is read at the end
        assert cache.layer_lengths() == [100, 100]
        with pytest.raises(ValueError, match=r"layer 1: cannot compress .*too large"):
            cache._end_forward(failed=False)
    assert cache.layer_lengths() == [0, 0]


def test_device_seconds_on_cpu() -> None:
    seconds = DeviceSeconds(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before stop"):
        float(seconds)
    assert float(seconds.stop()) >= 0.0


def _closure_tensors(fn) -> list[torch.Tensor]:
    found, todo, seen = [], [fn], set()
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        for cell in f.__closure__ or ():
            x = cell.cell_contents
            if isinstance(x, torch.Tensor):
                found.append(x)
            elif callable(x) and getattr(x, "__closure__", None) is not None:
                todo.append(x)
    return found


def test_a_pending_check_holds_no_block_sized_tensor() -> None:
    """A forward keeps its checks until it ends: each must pin scalars only, not the blocks'
    float copies (measured on the H100 before: +8 GB peak at 32K, every layer's copies held)."""
    k, v = _blocks(10, n=4)
    checks: list[DeferredCheck] = []
    with deferring():
        compress_blocks(k, v, CFG, 4, 6, deferred_checks=checks)
    (check,) = checks
    pinned = [check.failed, *_closure_tensors(check.message)]
    assert pinned and all(x.numel() <= 1 for x in pinned), [tuple(x.shape) for x in pinned]
