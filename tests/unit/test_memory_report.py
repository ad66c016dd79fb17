"""memory_report(): bytes measured from tensor storage, per tier, against DynamicCache."""

import pytest
import torch
from tests.tiny_models import tiny_config, tiny_model

from spectralcache.cache.cache import SpectralCache
from spectralcache.config import SpectralConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _bytes(dtype):
    return torch.empty((), dtype=dtype).element_size()


def expected_tier_bytes(b, h, nb, t, d, rk, rv, o, lm, hot, bits, model_dtype, basis_dtype):
    coeff = {8: rk + rv, 4: (rk + 1) // 2 + (rv + 1) // 2, 16: (rk + rv) * _bytes(model_dtype)}[bits]
    return {
        "landmarks": 2 * b * h * lm * d * _bytes(model_dtype),
        "coefficients": b * h * nb * t * coeff,
        "scales": 0 if bits == 16 else 2 * b * h * nb * t * 2,
        "bases": b * h * nb * (rk + rv) * d * _bytes(basis_dtype),
        "outliers": 2 * b * h * nb * o * d * _bytes(model_dtype),
        "outlier_index": b * h * nb * o * 8,
        "block_starts": nb * 8,
        "hot": 2 * b * h * hot * d * _bytes(model_dtype),
        "chunk": 0,
    }


def filled_cache(cfg, n_tokens, dtype, head_dim=64, kv_heads=2, batch=2, seed=0):
    hf = tiny_config(
        "llama", head_dim=head_dim, num_key_value_heads=kv_heads, num_attention_heads=2 * kv_heads
    )
    cache = SpectralCache(hf, cfg)
    g = torch.Generator().manual_seed(seed)
    for i in range(len(cache.layers)):
        k = torch.randn(batch, kv_heads, n_tokens, head_dim, generator=g).to(dtype)
        v = torch.randn(batch, kv_heads, n_tokens, head_dim, generator=g).to(dtype)
        cache.update(k, v, i)
        cache.layers[i].release_chunk()
    return cache


@pytest.mark.parametrize(
    ("bits", "dtype"), [(8, torch.float32), (8, torch.bfloat16), (4, torch.float16), (16, torch.float32)]
)
def test_tiers_are_measured_from_storage(bits, dtype):
    cfg = SpectralConfig(
        block_size=32,
        rank_keys=6,
        rank_values=9,
        hot_size=5,
        landmarks=3,
        outliers_per_block=4,
        coeff_bits=bits,
    )
    n = 3 + 4 * 32 + 7
    cache = filled_cache(cfg, n, dtype)
    rep = cache.memory_report()
    basis_dtype = cfg.basis_torch_dtype(dtype)
    exp = expected_tier_bytes(2, 2, 4, 32, 64, 6, 9, 4, 3, 7, bits, dtype, basis_dtype)
    layer0 = rep["layers"][0]
    assert layer0["kind"] == "spectral" and layer0["num_blocks"] == 4 and layer0["seq_len"] == n
    assert layer0["tiers"] == exp
    assert layer0["held_bytes"] == sum(exp.values())
    assert layer0["dynamic_bytes"] == 2 * 2 * 2 * n * 64 * _bytes(dtype)
    assert rep["compressed_layers"]["held_bytes"] == 2 * sum(exp.values())
    assert rep["tiers"]["coefficients"] == 2 * exp["coefficients"]
    st = cache.layers[0].state()
    if bits == 8:
        assert st.cold.key_coeffs.dtype == torch.int8 and st.cold.value_coeffs.dtype == torch.int8
    elif bits == 4:
        assert st.cold.key_coeffs.dtype == torch.uint8
    assert rep["compression"]["blocks"] == 2 * 2 * 4 // 2  # 4 blocks per layer, 2 layers
    assert rep["compression"]["seconds"] > 0


def test_identity_codec_int8_keys_int4_values_bytes():
    cfg = SpectralConfig(
        block_size=32,
        hot_size=5,
        landmarks=3,
        outliers_per_block=4,
        key_codec="identity",
        value_codec="identity",
        coeff_bits=8,
        value_coeff_bits=4,
    )
    n = 3 + 4 * 32 + 7
    cache = filled_cache(cfg, n, torch.float32)
    tiers = cache.memory_report()["layers"][0]["tiers"]
    assert tiers["bases"] == 0
    assert tiers["coefficients"] == 2 * 2 * 4 * 32 * (64 + 32)  # int8 key rows + packed int4 value rows
    assert tiers["scales"] == 2 * 2 * 4 * 32 * 2 * 2


@pytest.mark.parametrize("bits", [8, 4])
def test_identity_codec_bytes(bits):
    """Identity keys store head_dim columns per token and no key basis; values keep theirs."""
    cfg = SpectralConfig(
        block_size=32,
        rank_keys=6,
        rank_values=9,
        hot_size=5,
        landmarks=3,
        outliers_per_block=4,
        coeff_bits=bits,
        key_codec="identity",
    )
    n = 3 + 4 * 32 + 7
    cache = filled_cache(cfg, n, torch.float32)
    exp = expected_tier_bytes(2, 2, 4, 32, 64, 64, 9, 4, 3, 7, bits, torch.float32, torch.float16)
    exp["bases"] = 2 * 2 * 4 * 9 * 64 * 2  # value basis only
    layer0 = cache.memory_report()["layers"][0]
    assert layer0["tiers"] == exp
    st = cache.layers[0].state()
    assert st.cold.key_basis is None and st.cold.rank_keys == 64


def test_views_are_charged_their_whole_storage_once():
    cfg = SpectralConfig(
        block_size=16, rank_keys=4, rank_values=4, hot_size=2, landmarks=0, outliers_per_block=1
    )
    cache = SpectralCache(tiny_config("llama", num_key_value_heads=2), cfg)
    fused = torch.randn(2, 1, 2, 40, 32)  # one storage holding K and V (and more tokens)
    cache.update(fused[0, :, :, :10], fused[1, :, :, :10], 0)
    rep = cache.memory_report()
    # the pending chunk pins the whole fused storage, counted once for K and V together
    assert rep["layers"][0]["tiers"]["chunk"] == fused.numel() * 4
    cache.layers[0].release_chunk()
    assert cache.memory_report()["layers"][0]["tiers"]["chunk"] == 0


def test_uncompressed_and_sliding_layers_are_reported():
    model = tiny_model("gemma3")
    cache = SpectralCache(
        model, SpectralConfig(block_size=32, rank_keys=8, rank_values=8, outliers_per_block=2)
    )
    ids = torch.randint(3, 200, (1, 150))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    rep = cache.memory_report()
    kinds = [layer["kind"] for layer in rep["layers"]]
    assert kinds == ["sliding", "spectral", "sliding", "spectral"]
    sliding = rep["layers"][0]
    assert sliding["held_bytes"] == sliding["dynamic_bytes"] > 0
    assert rep["all_layers"]["held_bytes"] == sum(layer["held_bytes"] for layer in rep["layers"])


def _block_only_ratio(dtype):
    """Gemma-3-270M-shaped layer (1 KV head, head_dim 256), rank 32/64 int8, 32 outliers per 512."""
    cfg = SpectralConfig(
        block_size=512, rank_keys=32, rank_values=64, outliers_per_block=32, landmarks=16, hot_size=64
    )
    hf = tiny_config("llama", head_dim=256, num_key_value_heads=1, num_attention_heads=4, num_hidden_layers=1)
    cache = SpectralCache(hf, cfg)
    n = 16 + 4 * 512 + 64
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, n, 256, generator=g).to(dtype)
    v = torch.randn(1, 1, n, 256, generator=g).to(dtype)
    cache.update(k, v, 0)
    cache.layers[0].release_chunk()
    report = cache.memory_report()
    rep = report["layers"][0]
    tiers = rep["tiers"]
    cold = sum(
        tiers[name]
        for name in ("coefficients", "scales", "bases", "outliers", "outlier_index", "block_starts")
    )
    cold_dynamic = 2 * 4 * 512 * 256 * _bytes(dtype)
    assert (rep["cold_bytes"], rep["cold_dynamic_bytes"]) == (cold, cold_dynamic)
    assert report["cold_blocks"]["ratio"] == pytest.approx(cold / cold_dynamic)
    return cold / cold_dynamic, rep["ratio"], tiers


def test_one_fifth_on_fp32_layers():
    # fp32 K/V (Gemma 3 270M as loaded on CPU): fp16 bases, int8 coefficients, fp32 outliers
    cold_ratio, layer_ratio, _ = _block_only_ratio(torch.float32)
    per_block = 512 * 96 + 2 * 512 * 2 + 96 * 256 * 2 + 2 * 32 * 256 * 4 + 32 * 8 + 8
    assert cold_ratio == pytest.approx(per_block / (2 * 512 * 256 * 4))
    assert cold_ratio <= 0.2
    # the exact tiers (16 landmarks + 64 hot of 2128 tokens) are included in the layer ratio
    assert cold_ratio < layer_ratio <= 0.2


def test_sixteen_bit_ratio_matches_storage_arithmetic():
    # bf16 K/V: the exact outliers (2*32*256*2 B) and bf16 bases alone cost 0.156 of a block,
    # so this configuration cannot reach 1/5 at 16 bits; the report must say so honestly.
    cold_ratio, _, _ = _block_only_ratio(torch.bfloat16)
    per_block = 512 * 96 + 2 * 512 * 2 + 96 * 256 * 2 + 2 * 32 * 256 * 2 + 32 * 8 + 8
    assert cold_ratio == pytest.approx(per_block / (2 * 512 * 256 * 2))
    assert 0.25 < cold_ratio < 0.26


def test_allocated_capacity_is_reported_next_to_the_used_bytes():
    """Preallocated capacity is held memory: ``held_bytes`` counts it; ``used_bytes`` is the
    live data. Right after a prefill they agree (exact-fit buffers); decode adds slack."""
    cfg = SpectralConfig(
        block_size=32, rank_keys=6, rank_values=9, hot_size=5, landmarks=3, outliers_per_block=4
    )
    n = 3 + 4 * 32 + 7
    cache = filled_cache(cfg, n, torch.float32)
    layer0 = cache.memory_report()["layers"][0]
    assert layer0["used_bytes"] == layer0["held_bytes"] and layer0["tiers_used"] == layer0["tiers"]
    g = torch.Generator().manual_seed(1)
    for _ in range(40):  # decode: one more block, hot buffer reallocated with slack
        for i in range(len(cache.layers)):
            k = torch.randn(2, 2, 1, 64, generator=g)
            cache.update(k, k.clone(), i)
            cache.layers[i].release_chunk()
    layer = cache.layers[0]
    rep = cache.memory_report()["layers"][0]
    assert rep["num_blocks"] == 5 == layer.num_blocks and layer.cold_capacity == 5
    hot_cap = layer.tier_tensors()["hot"][0].shape[-2]
    assert hot_cap > layer.hot_len
    assert rep["tiers"]["hot"] == 2 * 2 * 2 * hot_cap * 64 * 4
    assert rep["tiers_used"]["hot"] == 2 * 2 * 2 * layer.hot_len * 64 * 4
    assert rep["used_bytes"] < rep["held_bytes"] == sum(rep["tiers"].values())
    # cold capacity beyond the live blocks is charged too (after growth)
    for _ in range(32):
        for i in range(len(cache.layers)):
            k = torch.randn(2, 2, 1, 64, generator=g)
            cache.update(k, k.clone(), i)
            cache.layers[i].release_chunk()
    rep = cache.memory_report()["layers"][0]
    assert layer.num_blocks == 6 and layer.cold_capacity == 7
    assert rep["tiers"]["coefficients"] == 7 * rep["tiers_used"]["coefficients"] // 6


def test_memory_report_is_a_sync_point_for_decode_nan():
    cfg = SpectralConfig(
        block_size=32, rank_keys=6, rank_values=9, hot_size=5, landmarks=3, outliers_per_block=4
    )
    cache = filled_cache(cfg, 50, torch.float32)
    k = torch.full((2, 2, 1, 64), float("nan"))
    cache.update(k, k, 1)
    cache.layers[1].release_chunk()
    with pytest.raises(ValueError, match=r"layer 1: a decode step stored .* cache index 50"):
        cache.memory_report()
