import pytest
import torch
from tests.layer_helpers import D, H, T, kv, small_cfg
from tests.tiny_models import tiny_config, tiny_model
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from spectralcache.cache.block import compress_blocks, reconstruct
from spectralcache.cache.cache import SpectralCache, get_active_spectral_layer
from spectralcache.cache.layer import SpectralLayer
from spectralcache.cache.rope import RopeRotator, find_rotary_inv_freq
from spectralcache.cache.sliding import SlidingWindowLayer
from spectralcache.config import SpectralConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def llama_rotator(head_dim=D, theta=10000.0):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return RopeRotator(inv, head_dim)


# ------------------------------------------------------------------------------ tiers


def test_tier_flow_and_state_contract():
    cfg = small_cfg()
    layer = SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=H)
    k, v = kv(2, 120, dtype=torch.bfloat16)
    layer.update(k[:, :, :50], v[:, :, :50])
    layer.release_chunk()
    for i in range(50, 120):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        s = i + 1
        st = layer.state()
        nb = layer.num_blocks
        assert st.seq_len == s == layer.get_seq_length()
        assert st.landmark_keys.shape == (2, H, 3, D) and st.landmark_keys.dtype == torch.bfloat16
        assert st.hot_start == 3 + nb * T
        assert cfg.hot_size <= st.hot_keys.shape[-2] < cfg.hot_size + T
        assert st.hot_start + st.hot_keys.shape[-2] == s
        assert st.chunk_start == i and torch.equal(st.chunk_keys, k[:, :, i : i + 1])
        cold = st.cold
        assert cold.key_coeffs.shape == (2, H, nb, T, 4) and cold.key_coeffs.dtype == torch.int8
        assert cold.value_coeffs.shape == (2, H, nb, T, 6)
        assert cold.key_scales.shape == (2, H, nb, T, 1) and cold.key_scales.dtype == torch.float16
        assert cold.key_basis.shape == (2, H, nb, 4, D) and cold.key_basis.dtype == torch.bfloat16
        assert cold.outlier_keys.shape == (2, H, nb, 2, D) and cold.outlier_index.shape == (2, H, nb, 2)
        assert cold.block_starts.tolist() == [3 + T * j for j in range(nb)]
        assert (cold.block_size, cold.coeff_bits, cold.rank_keys, cold.rank_values) == (T, 8, 4, 6)
    # exact tiers really are exact
    rk, rv = layer.reconstruct()
    torch.testing.assert_close(rk[:, :, :3], k[:, :, :3].float(), rtol=0, atol=0)
    hs = layer.state().hot_start
    torch.testing.assert_close(rv[:, :, hs:], v[:, :, hs:].float(), rtol=0, atol=0)


def test_prefill_compresses_many_blocks_in_one_call():
    layer = SpectralLayer(small_cfg(), 0)
    k, v = kv(1, 3 + 5 * T + 4 + 3)
    layer.update(k, v)
    assert layer.num_blocks == 5 and layer.hot_len == 7
    assert (
        layer.compression_calls and layer.compression_calls[0][0] == 5 and len(layer.compression_calls) == 1
    )
    # the cold tier equals compressing those blocks directly
    blocks = compress_blocks(
        k[:, :, 3 : 3 + 5 * T].reshape(1, H, 5, T, D),
        v[:, :, 3 : 3 + 5 * T].reshape(1, H, 5, T, D),
        small_cfg(),
        4,
        6,
    )
    rk, rv = layer.reconstruct()
    ek, ev = reconstruct(blocks)
    torch.testing.assert_close(rk[:, :, 3 : 3 + 5 * T], ek.reshape(1, H, 5 * T, D))
    torch.testing.assert_close(rv[:, :, 3 : 3 + 5 * T], ev.reshape(1, H, 5 * T, D))


def test_chunk_lifecycle_and_return_value():
    layer = SpectralLayer(small_cfg(), 0)
    k, v = kv(1, 30)
    out_k, out_v = layer.update(k[:, :, :20], v[:, :, :20])
    assert out_k is layer.state().chunk_keys and out_v is layer.state().chunk_values
    assert layer.has_pending_chunk
    layer.release_chunk()
    st = layer.state()
    assert st.chunk_keys is None and st.chunk_start == st.seq_len == 20
    layer.update(k[:, :, 20:21], v[:, :, 20:21])
    assert layer.state().chunk_start == 20 and layer.state().chunk_keys.shape[-2] == 1
    # the next update frees the previous chunk even if attention never released it
    layer.update(k[:, :, 21:22], v[:, :, 21:22])
    assert layer.state().chunk_start == 21


def test_mask_sizes_seq_length_max_length_reset():
    layer = SpectralLayer(small_cfg(), 0)
    assert layer.get_seq_length() == 0 and layer.get_mask_sizes(5) == (5, 0)
    k, v = kv(1, 40)
    layer.update(k, v)
    assert layer.get_seq_length() == 40
    assert layer.get_mask_sizes(3) == (43, 0)
    assert layer.get_max_length() == -1
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized and layer.num_blocks == 0
    layer.update(k[:1, :, :5], v[:1, :, :5])
    assert layer.get_seq_length() == 5


# ------------------------------------------------------------------------------ bad input


def _snapshot(layer):
    rk, rv = layer.reconstruct()
    return layer.get_seq_length(), layer.num_blocks, rk.clone(), rv.clone()


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda k, v: (k.clone().index_fill_(2, torch.tensor([0]), float("nan")), v),
            ValueError,
            "NaN or inf",
        ),
        (
            lambda k, v: (k, v.clone().index_fill_(3, torch.tensor([1]), float("inf"))),
            ValueError,
            "NaN or inf",
        ),
        (lambda k, v: (k[0], v[0]), ValueError, "must be \\[batch, kv_heads, tokens, head_dim\\]"),
        (lambda k, v: (k[..., :8], v[..., :8]), ValueError, "head_dim 8"),
        (lambda k, v: (k[:, :1], v[:, :1]), ValueError, "KV heads"),
        (lambda k, v: (k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1)), ValueError, "batch 2 != cached batch 1"),
        (lambda k, v: (k.double(), v.double()), ValueError, "dtype torch.float64 != cached dtype"),
        (lambda k, v: (k, v.half()), ValueError, "dtype"),
        (lambda k, v: (k, v[:, :, :1]), ValueError, "same shape"),
        (lambda k, v: (k.numpy(), v), TypeError, "torch.Tensor"),
        (lambda k, v: (k.long(), v.long()), TypeError, "unsupported dtype"),
    ],
)
def test_bad_input_leaves_cache_intact(make, exc, match):
    layer = SpectralLayer(small_cfg(), 0, head_dim=D, num_kv_heads=H)
    k, v = kv(1, 60)
    layer.update(k[:, :, :57], v[:, :, :57])
    before = _snapshot(layer)
    chunk = layer.state().chunk_keys
    bad_k, bad_v = make(k[:, :, 57:], v[:, :, 57:])
    with pytest.raises(exc, match=match):
        layer.update(bad_k, bad_v)
    after = _snapshot(layer)
    assert before[:2] == after[:2]
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
    assert layer.state().chunk_keys is chunk
    # and it still works afterwards
    layer.update(k[:, :, 57:], v[:, :, 57:])
    assert layer.get_seq_length() == 60


# ------------------------------------------------------------------------------ crop


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_crop_semantics(key_space):
    cfg = small_cfg(key_space=key_space)
    rot = llama_rotator() if key_space == "pre_rope" else None
    layer = SpectralLayer(cfg, 0, rotator=rot)
    k, v = kv(2, 3 + 4 * T + 9, seed=3)
    layer.update(k, v)
    assert layer.num_blocks == 4
    full_k, full_v = layer.reconstruct()
    s = layer.get_seq_length()
    # into the hot buffer: exact slice
    layer.crop(-3)
    assert layer.get_seq_length() == s - 3 and layer.num_blocks == 4
    torch.testing.assert_close(layer.reconstruct()[0], full_k[:, :, : s - 3], rtol=0, atol=0)
    # into the middle of block 2: blocks 2, 3 dropped, block 2's head is its reconstruction
    new_len = 3 + 2 * T + 5
    layer.crop(-(layer.get_seq_length() - new_len))
    assert layer.num_blocks == 2 and layer.hot_len == 5 and layer.state().hot_start == 3 + 2 * T
    rk, rv = layer.reconstruct()
    torch.testing.assert_close(rk, full_k[:, :, :new_len], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, full_v[:, :, :new_len], rtol=1e-6, atol=1e-6)
    # exactly at a block boundary
    layer.crop(-5)
    assert layer.num_blocks == 2 and layer.hot_len == 0
    # into the landmarks
    layer.crop(-(layer.get_seq_length() - 2))
    assert layer.num_blocks == 0 and layer.get_seq_length() == 2 and layer.num_landmarks == 2
    torch.testing.assert_close(layer.reconstruct()[0], k[:, :, :2])
    # refilling after a crop keeps the tier invariants
    k2, v2 = kv(2, 3 * T, seed=4)
    layer.update(k2, v2)
    assert layer.num_landmarks == 3 and layer.state().hot_start == 3 + layer.num_blocks * T
    with pytest.raises(ValueError, match="negative"):
        layer.crop(4)
    layer.crop(-10_000)
    assert layer.get_seq_length() == 0


# ------------------------------------------------------------------------------ pre-RoPE


def _rotary(model):
    return model.model.rotary_emb


@pytest.mark.parametrize(
    ("name", "overrides", "layer_type"),
    [
        ("llama", {}, None),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 512,
                }
            },
            None,
        ),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 512,
                }
            },
            None,
        ),
        ("gemma3", {}, "full_attention"),
        ("gemma3", {}, "sliding_attention"),
    ],
)
def test_rope_inverse_is_exact_on_real_rotary_modules(name, overrides, layer_type):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model(name, num_hidden_layers=4 if name == "gemma3" else 1, **overrides)
    rotary = _rotary(model)
    head_dim = model.config.head_dim
    rot = RopeRotator(find_rotary_inv_freq(model, layer_type), head_dim)
    g = torch.Generator().manual_seed(0)
    n = 300
    k_pre = torch.randn(2, 1, n, head_dim, generator=g)
    pos = torch.arange(5000, 5000 + n)[None].expand(2, n)
    args = (k_pre, pos) if layer_type is None else (k_pre, pos, layer_type)
    cos, sin = rotary(*args)
    _, k_post = apply_rotary_pos_emb(k_pre, k_pre, cos, sin)
    scaling = (
        rotary.attention_scaling if layer_type is None else getattr(rotary, f"{layer_type}_attention_scaling")
    )
    # our inverse of the model's own RoPE recovers the pre-RoPE key (times the model's attention_scaling)
    un = rot.unrotate(k_post, torch.arange(5000, 5000 + n))
    torch.testing.assert_close(un / scaling, k_pre, rtol=1e-5, atol=2e-5)
    # un-rotate then re-rotate is the identity to float32 precision
    back = rot.rotate(un, torch.arange(5000, 5000 + n))
    torch.testing.assert_close(back, k_post, rtol=1e-6, atol=2e-6)
    # block form used by attention
    blocks = un[..., : 3 * 100, :].reshape(2, 1, 3, 100, head_dim)
    starts = torch.tensor([5000, 5100, 5200])
    torch.testing.assert_close(
        rot.rotate_block_keys(blocks, starts).reshape(2, 1, 300, head_dim), k_post, rtol=1e-6, atol=2e-6
    )


def test_gemma3_layer_types_have_their_own_theta():
    model = tiny_model("gemma3")
    full = find_rotary_inv_freq(model, "full_attention")
    local = find_rotary_inv_freq(model, "sliding_attention")
    assert not torch.equal(full, local)


def test_pre_rope_blocks_are_lower_rank_and_reconstruct_post_rope():
    """RoPE'd rank-2 keys: pre-RoPE compression at rank 2 is near exact, post-RoPE is not."""
    g = torch.Generator().manual_seed(0)
    rot = llama_rotator()
    n = 3 + 3 * T + 4
    k_pre = torch.randn(1, H, n, 2, generator=g) @ torch.randn(1, H, 2, D, generator=g)
    k_post = rot.rotate(k_pre, torch.arange(n) + 7)  # row offset (left padding) must not matter
    v = torch.randn(1, H, n, D, generator=g)
    errs = {}
    for ks in ("post_rope", "pre_rope"):
        cfg = small_cfg(key_space=ks, rank_keys=2, outliers_per_block=0, coeff_bits=16)
        layer = SpectralLayer(cfg, 0, rotator=rot if ks == "pre_rope" else None)
        layer.update(k_post, v)
        assert layer.num_blocks == 3
        rk, _ = layer.reconstruct()
        errs[ks] = ((rk - k_post).norm() / k_post.norm()).item()
        st = layer.state()
        assert st.key_space == ks and (st.rope_inv_freq is not None) == (ks == "pre_rope")
    assert errs["pre_rope"] < 1e-5 < 0.05 < errs["post_rope"], errs


# ------------------------------------------------------------------------------ SpectralCache


def test_cache_builds_layers_from_layer_types():
    model = tiny_model("gemma3")
    cache = SpectralCache(model, small_cfg())
    kinds = [type(layer) for layer in cache.layers]
    # sliding layers: transformers' own class, with a graphed step added (cache/sliding.py)
    assert kinds == [SlidingWindowLayer, SpectralLayer, SlidingWindowLayer, SpectralLayer]
    assert issubclass(SlidingWindowLayer, DynamicSlidingWindowLayer)
    assert cache.compressed_layers == (1, 3)
    cache = SpectralCache(model.config, small_cfg(compress_layers=(3,)))
    assert [type(layer) for layer in cache.layers][1] is DynamicLayer
    with pytest.raises(ValueError, match="only full_attention layers can be compressed"):
        SpectralCache(model.config, small_cfg(compress_layers=(0,)))
    with pytest.raises(ValueError, match="compress_layers has indices"):
        SpectralCache(model.config, small_cfg(compress_layers=(9,)))
    # pre-RoPE: the compressed (full-attention) layers invert the full-attention RoPE (theta 1e6)
    pre = SpectralCache(model, small_cfg(key_space="pre_rope"))
    full = find_rotary_inv_freq(model, "full_attention")
    assert torch.equal(pre.layers[1].rope_inv_freq, full) and torch.equal(pre.layers[3].rope_inv_freq, full)
    # string preset / default
    assert SpectralCache(model.config, "aggressive").config.coeff_bits == 4
    assert isinstance(SpectralCache(model.config).config, SpectralConfig)


def test_cache_construction_errors():
    with pytest.raises(ValueError, match="no full-attention layer"):
        SpectralCache(tiny_config("mistral", sliding_window=32), small_cfg())
    with pytest.raises(ValueError, match="exceeds the model's head_dim=32"):
        SpectralCache(tiny_config("llama"), small_cfg(rank_values=64, block_size=128))
    with pytest.raises(ValueError, match="needs the model"):
        SpectralCache(tiny_config("llama"), small_cfg(key_space="pre_rope"))
    with pytest.raises(TypeError, match="SpectralConfig"):
        SpectralCache(tiny_config("llama"), 3)
    with pytest.raises(TypeError, match="transformers model or PretrainedConfig"):
        SpectralCache(object(), small_cfg())
    from transformers import DeepseekV3Config

    mla = DeepseekV3Config(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        intermediate_size=64,
        moe_intermediate_size=32,
    )
    with pytest.raises(ValueError, match="multi-head latent attention"):
        SpectralCache(mla, small_cfg())


def test_active_layer_registry():
    """The layer is found from the very chunk tensor its update returned (no "last updated
    cache": get_active_spectral_layer without the tensor finds nothing)."""
    model = tiny_model("gemma3")
    cache = SpectralCache(model, small_cfg())
    k1 = torch.randn(1, 1, 10, 64)  # gemma3 tiny: 1 KV head, head_dim 64
    v1 = torch.randn(1, 1, 10, 64)
    out_k, _ = cache.update(k1, v1, 1)
    layer = cache.layers[1]
    assert get_active_spectral_layer(1, out_k) is layer
    assert get_active_spectral_layer(1) is None
    assert get_active_spectral_layer(3, out_k) is None  # another layer index
    assert get_active_spectral_layer(1, k1.clone()) is None
    out0, _ = cache.update(k1, v1, 0)
    assert get_active_spectral_layer(0, out0) is None  # sliding layer: stock attention
    layer.release_chunk()
    assert get_active_spectral_layer(1, out_k) is None  # attention already ran: never read stale state
    with pytest.raises(ValueError, match="out of range"):
        cache.update(k1, v1, 4)
    del cache, layer
    assert get_active_spectral_layer(1, out_k) is None


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_cuda_layer_matches_cpu(key_space):
    """Same tokens on CUDA and CPU: same tiers, reconstructions within float32 noise, and the
    memory report measures CUDA storage."""
    cfg = small_cfg(key_space=key_space, coeff_bits=16, rank_keys=8, rank_values=8, svd_method="exact")
    rot = llama_rotator() if key_space == "pre_rope" else None
    k, v = kv(2, 3 + 5 * T + 6, seed=9)
    layers = {}
    for dev in ("cpu", "cuda"):
        layer = SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=H, rotator=rot)
        layer.update(k[:, :, :40].to(dev), v[:, :, :40].to(dev))
        for i in range(40, k.shape[2]):
            layer.update(k[:, :, i : i + 1].to(dev), v[:, :, i : i + 1].to(dev))
        layer.crop(-T)
        layers[dev] = layer
    st = layers["cuda"].state()
    assert st.cold.key_coeffs.is_cuda and st.cold.block_starts.is_cuda and st.hot_keys.is_cuda
    assert layers["cuda"].num_blocks == layers["cpu"].num_blocks
    for a, b in zip(layers["cuda"].reconstruct(), layers["cpu"].reconstruct()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_memory_report_and_generate():
    model = tiny_model("gemma3").cuda()
    ids = torch.randint(3, 200, (2, 300), device="cuda")
    cache = SpectralCache(
        model, small_cfg(block_size=64, rank_keys=16, rank_values=16, landmarks=4, hot_size=8)
    )
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 308)
    rep = cache.memory_report()
    assert rep["compressed_layers"]["held_bytes"] > 0 and rep["compression"]["blocks"] > 0
    assert cache.layers[1].state().cold.key_coeffs.dtype == torch.int8
