"""SpectralCache.to / SpectralLayer.to: device and dtype of every tier, filled or not."""

import pytest
import torch
from tests.tiny_models import tiny_model

from spectralcache.cache.cache import SpectralCache
from spectralcache.config import SpectralConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(block_size=32, rank_keys=8, rank_values=8, outliers_per_block=2, landmarks=4, hot_size=8)
    base.update(kw)
    return SpectralConfig(**base)


@pytest.mark.parametrize("bits", [8, 16])
def test_dtype_change_of_a_filled_cache(bits):
    model = tiny_model("gemma3")  # sliding + compressed layers
    cache = SpectralCache(model, _cfg(coeff_bits=bits, key_space="pre_rope"))
    ids = torch.randint(3, 200, (1, 150))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    before = [layer.reconstruct() for layer in (cache.layers[1], cache.layers[3])]
    coeff_dtype = cache.layers[1].state().cold.key_coeffs.dtype
    assert cache.to(torch.bfloat16) is cache
    for i in (1, 3):
        layer = cache.layers[i]
        st = layer.state()
        assert layer.dtype == torch.bfloat16
        assert st.hot_keys.dtype == st.landmark_keys.dtype == st.cold.outlier_keys.dtype == torch.bfloat16
        assert st.cold.key_basis.dtype == torch.bfloat16  # bases follow (basis_dtype auto for bf16)
        if bits == 8:
            assert st.cold.key_coeffs.dtype == coeff_dtype == torch.int8  # integers kept
            assert st.cold.key_scales.dtype == torch.float16
        else:
            assert st.cold.key_coeffs.dtype == torch.bfloat16
        assert st.rope_inv_freq.dtype == torch.float32
    for i in (0, 2):  # transformers' sliding layers
        assert cache.layers[i].keys.dtype == torch.bfloat16
    # the same tokens, rounded to bf16
    for (k0, v0), layer in zip(before, (cache.layers[1], cache.layers[3])):
        k1, v1 = layer.reconstruct()
        torch.testing.assert_close(k1, k0, rtol=0.02, atol=0.02)
        torch.testing.assert_close(v1, v0, rtol=0.02, atol=0.02)
    # and it keeps working in the new dtype
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randint(3, 200, (1, 40)), past_key_values=cache, use_cache=True)
    assert torch.isfinite(out.logits.float()).all() and cache.get_seq_length() == 190


def test_device_move_including_meta_and_errors():
    model = tiny_model("llama")
    cache = SpectralCache(model, _cfg())
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 100)), past_key_values=cache, use_cache=True)
    cache.to("meta")
    for layer in cache.layers:
        st = layer.state()
        assert st.hot_keys.device.type == "meta" and st.cold.key_coeffs.device.type == "meta"
        assert st.cold.block_starts.device.type == "meta"
    with pytest.raises(TypeError, match="dtype given twice"):
        cache.to(torch.float16, torch.float16)
    with pytest.raises(TypeError, match="unsupported dtype"):
        cache.to(torch.int8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip():
    model = tiny_model("gemma3")
    cache = SpectralCache(model, _cfg())
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 150)), past_key_values=cache, use_cache=True)
    want = cache.layers[1].reconstruct()
    cache.to("cuda")
    assert cache.layers[1].state().hot_keys.is_cuda and cache.layers[0].keys.is_cuda
    cache.to("cpu")
    got = cache.layers[1].reconstruct()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
