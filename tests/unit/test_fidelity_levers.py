"""Fidelity levers of issue 9, each a default-off ``SpectralConfig`` switch.

``compress_tail``: the layer's first compression in a prefill chunk re-blocks the prompt into
``k = ceil(n / T)`` blocks of ``T' = n // k`` tokens, so only ``hot_size`` (+ fewer than ``k``)
recent tokens stay exact. Checked here: the block choice and the state contract, exactness at
full rank / 16 bits against a dense oracle (prefill, decode after it, crop, rollback), both
attention readers (torch reference and the Triton decode kernel) on such a state, and
token-identical greedy generation in a tiny model.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from tests.tiny_models import small_lossless_config as lossless
from tests.tiny_models import small_lossy_config as lossy
from tests.tiny_models import tiny_model, tiny_prompt
from transformers import DynamicCache

from spectralcache import SpectralCache
from spectralcache.attention.reference import dense_attention, dense_reference, spectral_attention
from spectralcache.cache.layer import SpectralLayer
from spectralcache.config import SpectralConfig
from spectralcache.integrations.compat import cache_kwargs

H, D = 2, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def kv(n: int, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, H, n, D)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def fresh_layer(cfg: SpectralConfig) -> SpectralLayer:
    return SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=H)


def expected_block_size(cfg: SpectralConfig, n: int) -> int:
    """The documented rule, written independently of the layer's code."""
    t = cfg.block_size
    ranks = [r for r in cfg.ranks_for(D)]
    t_min = min(t, max(math.ceil(t / 2), cfg.outliers_per_block + 1, *ranks))
    if n < t_min:
        return t
    k = math.ceil(n / t)
    t_prime = min(t, max(t_min, n // k))
    if n >= t and n % t <= n % t_prime:  # plain blocks waste no more: keep them
        return t
    if n >= t and n % t <= n // 64:  # a long prompt: plain blocks leave at most 1/64 of it exact
        return t
    return t_prime


def check_contract(layer: SpectralLayer) -> None:
    """Blocks contiguous and ending at hot_start, [nb, T'] shapes, tiers covering seq_len."""
    st = layer.state()
    t = layer.block_size
    nb = layer.num_blocks
    assert st.hot_start == layer.num_landmarks + nb * t
    assert st.hot_start + st.hot_keys.shape[-2] == st.seq_len
    if nb:
        cold = st.cold
        assert cold.block_size == t
        assert cold.key_coeffs.shape[2:4] == (nb, t) and cold.value_coeffs.shape[2:4] == (nb, t)
        assert torch.equal(cold.block_starts.cpu(), layer.num_landmarks + t * torch.arange(nb))
        assert int(cold.outlier_index.max()) < t


# ------------------------------------------------------------------------------ block choice


@pytest.mark.parametrize("n_tokens", [5, 10, 20, 30, 40, 50, 63, 64, 70, 97, 130, 200, 333])
def test_tail_compressed_to_hot_size(n_tokens: int) -> None:
    cfg = lossy(compress_tail=True)
    layer = fresh_layer(cfg)
    layer.update(*kv(n_tokens))
    layer.release_chunk()
    check_contract(layer)
    n = n_tokens - cfg.landmarks - cfg.hot_size  # tokens past the landmarks and the hot window
    t_exp = expected_block_size(cfg, n)
    if n >= t_exp:  # something was compressed: the layer's block length is fixed
        assert layer.block_size == t_exp
        assert cfg.block_size // 2 <= t_exp <= cfg.block_size
        k = math.ceil(n / cfg.block_size)
        assert cfg.hot_size <= layer.hot_len < cfg.hot_size + max(k, n // 64 + 1)
    else:
        assert layer.num_blocks == 0 and layer.block_size == cfg.block_size
    # the switch off keeps today's layout: whole config.block_size blocks, up to T - 1 extra hot
    off = fresh_layer(lossy())
    off.update(*kv(n_tokens))
    assert off.block_size == cfg.block_size
    assert layer.hot_len <= off.hot_len and layer.num_landmarks == off.num_landmarks


def test_long_prompt_keeps_whole_blocks() -> None:
    """n = 974 tokens past the landmarks and the hot window: 30 whole 32-token blocks leave 14 over
    (<= 974 // 64 = 15), so the layer keeps block_size although 31 blocks of 31 would leave 13; at
    n = 975, 15 over (= 975 // 64) still keeps it; n = 496 (16 over > 7) re-blocks (16 blocks of 31)."""
    cfg = lossy(compress_tail=True)
    extra = cfg.landmarks + cfg.hot_size
    for n, plain in ((974, True), (975, True), (496, False)):
        k = math.ceil(n / 32)
        assert n % (n // k) < n % 32  # the re-blocked layout would waste fewer tokens
        layer = fresh_layer(cfg)
        layer.update(*kv(n + extra))
        layer.release_chunk()
        check_contract(layer)
        assert (layer.block_size == cfg.block_size) is plain, (n, layer.block_size)
        assert layer.hot_len == cfg.hot_size + (n % 32 if plain else n - (n // (n // k)) * (n // k))


def test_switch_off_is_unchanged_layout() -> None:
    cfg = lossy()
    layer = fresh_layer(cfg)
    layer.update(*kv(130))
    assert layer.block_size == 32 and layer.num_blocks == (130 - 3 - 4) // 32
    assert layer.hot_len == 130 - 3 - 32 * layer.num_blocks


def test_decode_never_reblocks() -> None:
    """Only a prefill chunk (q > 1) chooses T'; a first compression by decode keeps T."""
    layer = fresh_layer(lossy(compress_tail=True))
    k, v = kv(60)
    for i in range(60):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert layer.num_blocks and layer.block_size == 32


def test_config_validation() -> None:
    with pytest.raises(TypeError, match="compress_tail"):
        SpectralConfig(compress_tail="yes")
    assert SpectralConfig().compress_tail is False
    for name in ("lowrank", "aggressive", "pre_rope", "lossless"):
        assert SpectralConfig.from_preset(name).compress_tail is False
    for name in ("default", "max"):  # the presets that compress the prefill's partial tail
        assert SpectralConfig.from_preset(name).compress_tail is True


# ------------------------------------------------------------------------------ exactness


def _query(n_q: int, q_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_q, q_len, D, generator=g)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_lossless_prefill_then_decode_matches_dense(key_space: str) -> None:
    """At full rank / 16 bits the re-blocked layer attends exactly like dense attention over
    the exact K/V, after the prefill and at every decode step (decode blocks have T' too)."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    cfg = lossless(compress_tail=True, key_space=key_space)
    layer = SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=H, rope_inv_freq=inv)
    n_prompt, n_decode = 80, 60
    k, v = kv(n_prompt + n_decode, seed=3)
    layer.update(k[:, :, :n_prompt], v[:, :, :n_prompt])
    t_prime = layer.block_size
    assert t_prime == expected_block_size(cfg, n_prompt - 3 - 4) and t_prime < 32
    q = _query(2 * H, n_prompt, seed=4)
    out = spectral_attention(q, layer.state())
    layer.release_chunk()
    ref = dense_attention(q, k[:, :, :n_prompt], v[:, :, :n_prompt], None)
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
    blocks_before = layer.num_blocks
    for i in range(n_prompt, n_prompt + n_decode):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        check_contract(layer)
        assert cfg.hot_size <= layer.hot_len < cfg.hot_size + t_prime
        qd = _query(2 * H, 1, seed=i)
        got = spectral_attention(qd, layer.state())
        layer.release_chunk()
        want = dense_attention(qd, k[:, :, : i + 1], v[:, :, : i + 1], None)
        torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5)
    assert layer.num_blocks > blocks_before and layer.block_size == t_prime
    rk, rv = layer.reconstruct()
    torch.testing.assert_close(rk, k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv, v, atol=1e-5, rtol=1e-5)


def test_second_chunk_keeps_block_length() -> None:
    cfg = lossless(compress_tail=True)
    layer = fresh_layer(cfg)
    k, v = kv(150, seed=5)
    layer.update(k[:, :, :60], v[:, :, :60])
    t_prime = layer.block_size
    layer.update(k[:, :, 60:], v[:, :, 60:])
    check_contract(layer)
    assert layer.block_size == t_prime
    assert cfg.hot_size <= layer.hot_len < cfg.hot_size + t_prime
    torch.testing.assert_close(layer.reconstruct()[0], k, atol=1e-5, rtol=1e-5)


def test_lossy_state_readers_agree() -> None:
    """A lossy re-blocked state: the reference equals attention over its own decompression."""
    cfg = lossy(compress_tail=True)
    layer = fresh_layer(cfg)
    layer.update(*kv(97, seed=6))
    layer.release_chunk()
    assert layer.block_size not in (32,) and layer.num_blocks
    q = _query(2 * H, 1, seed=7)
    st = layer.state()
    torch.testing.assert_close(
        spectral_attention(q, st).float(), dense_reference(q, st), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("keep", [0, 2, 3, 10, 27, 40, 52, 60, 75, 80])
def test_crop_exact_and_reblocks_after_emptying(keep: int) -> None:
    cfg = lossless(compress_tail=True)
    layer = fresh_layer(cfg)
    k, v = kv(90, seed=8)
    layer.update(k[:, :, :80], v[:, :, :80])
    t_prime = layer.block_size
    layer.crop(keep - 80)
    check_contract(layer)
    assert layer.get_seq_length() == keep
    if keep:
        torch.testing.assert_close(layer.reconstruct()[0], k[:, :, :keep], atol=1e-5, rtol=1e-5)
    if layer.num_blocks:
        assert layer.block_size == t_prime
    else:
        # an empty cold tier forgets T': the next prefill chooses again
        assert layer.block_size == cfg.block_size
        layer.update(k[:, :, keep:90], v[:, :, keep:90])
        check_contract(layer)
        torch.testing.assert_close(layer.reconstruct()[0], k[:, :, :90], atol=1e-5, rtol=1e-5)


def test_rollback_restores_block_length() -> None:
    cfg = lossless(compress_tail=True)
    layer = fresh_layer(cfg)
    k, v = kv(120, seed=9)
    layer.update(k[:, :, :5], v[:, :, :5])  # nothing compressed yet: no T' chosen
    token = layer.checkpoint()
    layer.update(k[:, :, 5:80], v[:, :, 5:80])
    assert layer.num_blocks and layer.block_size != cfg.block_size
    layer.rollback(token)
    assert layer.num_blocks == 0 and layer.block_size == cfg.block_size
    assert layer.get_seq_length() == 5
    layer.update(k[:, :, 5:120], v[:, :, 5:120])  # chooses for the 115-token chunk instead
    check_contract(layer)
    assert layer.block_size == expected_block_size(cfg, 120 - 3 - 4)
    torch.testing.assert_close(layer.reconstruct()[0], k, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ Triton reader


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_triton_decode_reads_reblocked_state(key_space: str) -> None:
    """The fused decode kernel (Triton's interpreter on CPU) on a real re-blocked state with a
    block length that is neither the config's nor a power of two."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)")
    from spectralcache.attention.triton import decode_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    cfg = lossy(compress_tail=True, key_space=key_space)
    layer = SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=H, rope_inv_freq=inv)
    k, v = kv(98, seed=10)
    layer.update(k[:, :, :97].to(device), v[:, :, :97].to(device))
    layer.release_chunk()
    layer.update(k[:, :, 97:].to(device), v[:, :, 97:].to(device))  # a decode step: chunk of 1
    st = layer.state()
    assert st.cold.block_size == layer.block_size not in (16, 32)
    q = _query(2 * H, 1, seed=11).to(device)
    got = decode_attention(q, st, None, None, None, block_t=16)
    ref = spectral_attention(q, st)
    err = float((got.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-5, err


# ------------------------------------------------------------------------------ in a model


def test_lossless_generation_token_identical() -> None:
    """Greedy generation through a tiny Llama with a re-blocked lossless cache equals DynamicCache."""
    model = tiny_model("llama")
    ids = tiny_prompt(1, 300, seed=1)
    cfg = lossless(block_size=64, hot_size=8, landmarks=4, outliers_per_block=2, compress_tail=True)
    kwargs = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **cache_kwargs(model, DynamicCache()), **kwargs)
        cache = SpectralCache(model, cfg)
        got = model.generate(ids, **cache_kwargs(model, cache), **kwargs)
    assert torch.equal(got, want)
    spectral = [layer for layer in cache.layers if isinstance(layer, SpectralLayer)]
    assert spectral and all(layer.block_size < 64 for layer in spectral)


@pytest.mark.parametrize("seed", range(3))
def test_random_programs_stay_exact(seed: int) -> None:
    """Random prefill chunks, decode steps, crops and rolled-back updates on a lossless
    re-blocked layer: the layer always reconstructs exactly the tokens it should hold, and its
    state keeps the contract."""
    gen = torch.Generator().manual_seed(seed)

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    cfg = lossless(compress_tail=True)
    layer = fresh_layer(cfg)
    k, v = kv(600, seed=100 + seed)
    pos = 0  # tokens held (the layer holds k[:, :, :pos])
    for _ in range(25):
        op = rand(0, 3)
        if op == 0 and pos + 90 <= 600:  # prefill chunk
            n = rand(2, 90)
            layer.update(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
            pos += n
        elif op == 1 and pos + 12 <= 600:  # decode steps
            for _ in range(rand(1, 12)):
                layer.update(k[:, :, pos : pos + 1], v[:, :, pos : pos + 1])
                pos += 1
        elif op == 2 and pos:  # crop
            keep = rand(0, pos)
            if keep < pos:
                layer.crop(keep - pos)
            pos = keep
        elif op == 3 and pos + 70 <= 600:  # an update rolled back
            token = layer.checkpoint()
            before = layer.block_size
            layer.update(k[:, :, pos : pos + 70], v[:, :, pos : pos + 70])
            layer.rollback(token)
            assert layer.block_size == before
        layer.release_chunk()
        assert layer.get_seq_length() == pos
        if pos:
            check_contract(layer)
            assert cfg.block_size // 2 <= layer.block_size <= cfg.block_size
            torch.testing.assert_close(layer.reconstruct()[0], k[:, :, :pos], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.reconstruct()[1], v[:, :, :pos], atol=1e-5, rtol=1e-5)


def test_memory_report_cold_ratio_uses_the_layers_own_block_length():
    """A re-blocked layer's cold tier is charged against nb * T' exact tokens, not nb * T."""
    model = tiny_model("llama")
    cfg = SpectralConfig(
        block_size=64,
        rank_keys=8,
        rank_values=8,
        hot_size=8,
        landmarks=4,
        outliers_per_block=2,
        compress_tail=True,
    )
    cache = SpectralCache(model, cfg)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 300)), **cache_kwargs(model, cache))
    layer = cache.layers[0]
    assert layer.block_size != cfg.block_size  # the prompt was re-blocked
    entry = cache.memory_report()["layers"][0]
    per_token = 2 * layer.num_kv_heads * layer.head_dim * 4  # K and V, float32
    assert entry["cold_dynamic_bytes"] == per_token * layer.num_blocks * layer.block_size
