import itertools
import math

import pytest
import torch

from spectralcache.cache.block import compress_blocks, reconstruct
from spectralcache.config import SpectralConfig, get_preset, list_presets

T, D = 64, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank(lead, rank, noise=1e-3, seed=0, t=T, d=D):
    """Blocks with a decaying rank-``rank`` spectrum plus small noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(*lead, t, rank, generator=g)
    s = torch.logspace(0, -1.5, rank)
    v = torch.linalg.qr(torch.randn(*lead, d, rank, generator=g)).Q.mT
    return (u * s) @ v * 3 + noise * torch.randn(*lead, t, d, generator=g)


def cfg(**kw):
    base = dict(block_size=T, rank_keys=8, rank_values=8, hot_size=4, landmarks=2, outliers_per_block=4)
    base.update(kw)
    return SpectralConfig(**base)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_error_decreases_with_rank(method):
    k = low_rank((2, 3), rank=24, noise=1e-3, seed=1)
    v = low_rank((2, 3), rank=24, noise=1e-3, seed=2)
    errs = []
    for r in (2, 4, 8, 16, 24):
        c = cfg(rank_keys=r, rank_values=r, outliers_per_block=0, svd_method=method, coeff_bits=16)
        rk, rv = reconstruct(compress_blocks(k, v, c, r, r))
        errs.append((rel_err(rk, k), rel_err(rv, v)))
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in itertools.pairwise(errs)), errs
    assert errs[-1][0] < 1e-2  # rank 24 captures the rank-24 signal up to the noise


def test_randomized_close_to_exact_on_decaying_spectrum():
    k = low_rank((4,), rank=32, noise=1e-3, seed=3)
    c = cfg(outliers_per_block=0, coeff_bits=16, rank_keys=8, rank_values=8)
    e_rand = rel_err(reconstruct(compress_blocks(k, k, c, 8, 8))[0], k)
    e_exact = rel_err(reconstruct(compress_blocks(k, k, c.replace(svd_method="exact"), 8, 8))[0], k)
    assert e_exact <= e_rand <= 1.05 * e_exact + 1e-4


def test_full_rank_unquantized_is_exact():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 3, T, D, generator=g)
    v = torch.randn(2, 2, 3, T, D, generator=g)
    c = get_preset("lossless").replace(block_size=T)
    rk_, rv_ = c.ranks_for(D)
    blocks = compress_blocks(k, v, c, rk_, rv_)
    assert blocks.key_coeffs.dtype == torch.float32 and blocks.key_scales is None
    rk, rv = reconstruct(blocks)
    torch.testing.assert_close(rk, k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, v, rtol=1e-5, atol=1e-5)


def test_needle_is_picked_and_kept_exact():
    """A token in a direction the block's dominant subspace misses, with modest energy."""
    lead = (2, 2)
    k = low_rank(lead, rank=6, noise=1e-3, seed=4)
    v = low_rank(lead, rank=6, noise=1e-3, seed=5)
    # orthogonal complement direction of each block's key span, with 1/3 of a typical token's norm
    _, _, vh = torch.linalg.svd(k, full_matrices=True)
    direction = vh[..., -1, :]  # [2, 2, D] (outside the top-6 span)
    typical = k.norm(dim=-1).mean(-1, keepdim=True)
    needle_pos = torch.tensor([[5, 40], [17, 63]])
    for i in range(2):
        for j in range(2):
            p = int(needle_pos[i, j])
            # energy well below the 6th singular value, well above the noise
            k[i, j, p] = direction[i, j] * typical[i, j] / 10
            v[i, j, p] = -v[i, j, p] * 3  # value also unusual in magnitude
    c = cfg(rank_keys=6, rank_values=6, outliers_per_block=2)
    blocks = compress_blocks(k, v, c, 6, 6)
    rk, rv = reconstruct(blocks)
    for i in range(2):
        for j in range(2):
            p = int(needle_pos[i, j])
            assert p in blocks.outlier_index[i, j].tolist()
            torch.testing.assert_close(rk[i, j, p], k[i, j, p], rtol=0, atol=1e-6)
            torch.testing.assert_close(rv[i, j, p], v[i, j, p], rtol=0, atol=1e-6)
    # without the outlier, the needle's key would have been lost almost entirely
    nb = compress_blocks(k, v, c.replace(outliers_per_block=0), 6, 6)
    lost = reconstruct(nb)[0][0, 0, 5]
    assert (lost - k[0, 0, 5]).norm() > 0.5 * k[0, 0, 5].norm()


def test_large_norm_token_is_an_outlier():
    """An attention-sink-like token (10x key norm) has the largest *absolute* int8 error (the
    per-row scale follows the row maximum), so the score, which ranks absolute residuals, keeps it."""
    g = torch.Generator().manual_seed(6)
    k = torch.randn(1, T, D, generator=g)
    v = torch.randn(1, T, D, generator=g)
    k[0, 9] *= 10
    blocks = compress_blocks(k, v, cfg(rank_keys=D, rank_values=D, outliers_per_block=1), D, D)
    assert blocks.outlier_index[0].tolist() == [9]


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_storage_dtypes_and_shapes(bits):
    k = low_rank((2, 3), rank=4, seed=8).to(torch.bfloat16)
    v = low_rank((2, 3), rank=4, seed=9).to(torch.bfloat16)
    c = cfg(coeff_bits=bits, rank_keys=5, rank_values=7)
    b = compress_blocks(k, v, c, 5, 7)
    if bits == 8:
        assert b.key_coeffs.dtype == torch.int8 and b.key_coeffs.shape == (2, 3, T, 5)
        assert b.value_coeffs.shape == (2, 3, T, 7)
    elif bits == 4:
        assert b.key_coeffs.dtype == torch.uint8 and b.key_coeffs.shape == (2, 3, T, 3)
        assert b.value_coeffs.shape == (2, 3, T, 4)
    else:
        assert b.key_coeffs.dtype == torch.bfloat16 and b.key_scales is None
    if bits != 16:
        assert b.key_scales.dtype == torch.float16 and b.key_scales.shape == (2, 3, T, 1)
    assert b.key_basis.dtype == torch.bfloat16 and b.key_basis.shape == (2, 3, 5, D)
    assert b.outlier_keys.dtype == torch.bfloat16 and b.outlier_keys.shape == (2, 3, 4, D)
    assert b.outlier_index.dtype == torch.int64 and b.outlier_index.shape == (2, 3, 4)
    assert (b.outlier_index.diff(dim=-1) > 0).all()
    for t in b.tensors().values():  # fields derived from the ColdBlocks dataclass
        if t is not None:
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    err = rel_err(reconstruct(b)[0], k.float())
    assert err < {4: 0.2, 8: 0.02, 16: 0.01}[bits]


def test_fp32_model_gets_fp16_basis_when_quantized():
    k = low_rank((2,), rank=8, seed=10)
    b = compress_blocks(k, k, cfg(), 8, 8)
    assert b.key_basis.dtype == torch.float16 and b.outlier_keys.dtype == torch.float32


def test_batching_does_not_change_the_result():
    k = low_rank((3, 2, 4), rank=10, noise=1e-2, seed=11)
    v = low_rank((3, 2, 4), rank=10, noise=1e-2, seed=12)
    c = cfg(rank_keys=6, rank_values=6)
    whole = reconstruct(compress_blocks(k, v, c, 6, 6))
    for n in range(4):
        part = reconstruct(compress_blocks(k[:, :, n : n + 1], v[:, :, n : n + 1], c, 6, 6))
        torch.testing.assert_close(part[0], whole[0][:, :, n : n + 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(part[1], whole[1][:, :, n : n + 1], rtol=1e-4, atol=1e-4)


def test_refit_never_hurts_the_low_rank_rows():
    """Eckart–Young on the block without its outlier rows: the refit basis is optimal for them."""
    k = low_rank((4,), rank=20, noise=1e-2, seed=13)
    v = low_rank((4,), rank=20, noise=1e-2, seed=14)
    k[:, ::9] *= 6  # some heavy rows that a plain fit spends rank on
    c = cfg(rank_keys=6, rank_values=6, outliers_per_block=8, coeff_bits=16, svd_method="exact")
    plain = compress_blocks(k, v, c.replace(refit_after_outliers=False), 6, 6)
    refit = compress_blocks(k, v, c.replace(refit_after_outliers=True), 6, 6)
    assert torch.equal(plain.outlier_index, refit.outlier_index)
    mask = torch.ones(4, T, dtype=torch.bool)
    mask.scatter_(1, plain.outlier_index, False)
    e_plain = (reconstruct(plain)[0] - k)[mask].norm()
    e_refit = (reconstruct(refit)[0] - k)[mask].norm()
    assert e_refit <= e_plain * (1 + 1e-5)


def test_pre_rope_exact_keys_are_stored_for_outliers():
    k_fit = low_rank((2,), rank=4, seed=15)
    k_exact = k_fit * 2  # stands for the post-RoPE keys
    b = compress_blocks(k_fit, k_fit, cfg(rank_keys=4, rank_values=4), 4, 4, exact_keys=k_exact)
    idx = b.outlier_index.unsqueeze(-1).expand(-1, -1, D)
    torch.testing.assert_close(b.outlier_keys, torch.gather(k_exact, 1, idx))


def test_input_errors():
    k = low_rank((1,), rank=4)
    with pytest.raises(ValueError, match="block has 32 tokens"):
        compress_blocks(k[:, :32], k[:, :32], cfg(), 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        compress_blocks(k, k[..., :16], cfg(), 4, 4)
    with pytest.raises(ValueError, match="exceed"):
        compress_blocks(k, k, cfg(), 33, 4)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_compresses(name):
    c = get_preset(name).replace(block_size=T, outliers_per_block=min(get_preset(name).outliers_per_block, 8))
    rk, rv = c.ranks_for(D)
    rk, rv = min(rk, D), min(rv, D)
    k = low_rank((2,), rank=12, seed=16)
    b = compress_blocks(k, k, c, rk, rv)
    err = rel_err(reconstruct(b)[0], k)
    assert math.isfinite(err) and err < 0.25


# --------------------------------------------------------------------------- identity codec


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("side", ["keys", "values", "both"])
def test_identity_codec_stores_rows_without_basis(bits, side):
    g = torch.Generator().manual_seed(20)
    k = torch.randn(2, 3, T, D, generator=g)
    v = torch.randn(2, 3, T, D, generator=g)
    c = cfg(
        coeff_bits=bits,
        key_codec="identity" if side in ("keys", "both") else "lowrank",
        value_codec="identity" if side in ("values", "both") else "lowrank",
    )
    rk_, rv_ = c.ranks_for(D)
    blocks = compress_blocks(k, v, c, rk_, rv_)
    rk, rv = reconstruct(blocks)
    # int8 per-row rounding: <= half a step of row max / 127 per element; int4 / 7
    tol = {16: 1e-6, 8: 0.01, 4: 0.12}[bits]
    if side in ("keys", "both"):
        assert blocks.key_basis is None and rk_ == D
        assert blocks.key_coeffs.shape[-2] == T
        assert rel_err(rk, k) < tol
    else:
        assert blocks.key_basis is not None and rel_err(rk, k) > 0.3  # rank 8 of a flat 32-dim block
    if side in ("values", "both"):
        assert blocks.value_basis is None and rv_ == D
        assert rel_err(rv, v) < tol
    else:
        assert blocks.value_basis is not None


def test_identity_codec_rank_must_be_head_dim():
    k = low_rank((1,), rank=4)
    with pytest.raises(ValueError, match="identity codec for keys"):
        compress_blocks(k, k, cfg(key_codec="identity"), 8, 8)


def test_needle_in_a_prose_like_block_survives_with_identity_keys():
    """Prose blocks have flat key spectra: a needle's key is no worse reconstructed than any
    other token's, so the outlier score cannot single it out and a low-rank fit blurs every
    token's key. A query that retrieves the needle exactly must still retrieve it from the
    stored block; with the low-rank codec at the same key bytes it does not."""
    from spectralcache.attention.reference import dense_attention

    g = torch.Generator().manual_seed(21)
    t, d = 128, 64
    k = torch.randn(1, 1, 1, t, d, generator=g)  # flat spectrum, like prose post-RoPE keys
    v = torch.randn(1, 1, 1, t, d, generator=g)
    needle = 77
    q = (k[0, 0, 0, needle] * 0.7).reshape(1, 1, 1, d)  # the needle wins about half the attention
    base = dict(block_size=t, hot_size=4, landmarks=2, outliers_per_block=4)

    def needle_weight(c):
        rk_, rv_ = c.ranks_for(d)
        rec_k, rec_v = reconstruct(compress_blocks(k, v, c, rk_, rv_))
        scores = (q @ rec_k[0, 0].transpose(-1, -2)) * d**-0.5
        w = scores.softmax(-1)[0, 0, 0, needle].item()
        out = dense_attention(q, rec_k[0, 0][None], rec_v[0, 0][None], None)
        return w, out

    w_exact = (q @ k[0, 0].transpose(-1, -2) * d**-0.5).softmax(-1)[0, 0, 0, needle].item()
    out_exact = dense_attention(q, k[0, 0][None], v[0, 0][None], None)
    assert w_exact > 0.5
    # identity int8 keys (rows + a scale each): retrieval intact
    w_id, out_id = needle_weight(SpectralConfig(**base, key_codec="identity", rank_values=32))
    assert abs(w_id - w_exact) < 0.01 * w_exact
    # rank-32 keys cost about the same bytes (32 int8 coefficients + a float16 basis per block
    # of 128 tokens: 32*128 + 2*32*64 = 8192 vs 64*128 = 8192) but lose the needle
    w_lr, out_lr = needle_weight(SpectralConfig(**base, rank_keys=32, rank_values=32))
    assert w_lr < 0.6 * w_exact
    assert (out_id - out_exact).norm() < 0.5 * (out_lr - out_exact).norm()


def test_value_coeff_bits_int4_values_int8_keys():
    g = torch.Generator().manual_seed(22)
    k = torch.randn(2, T, D, generator=g)
    v = torch.randn(2, T, D, generator=g)
    c = cfg(key_codec="identity", value_codec="identity", coeff_bits=8, value_coeff_bits=4)
    blocks = compress_blocks(k, v, c, D, D)
    assert blocks.key_coeffs.dtype == torch.int8 and blocks.key_coeffs.shape[-1] == D
    assert blocks.value_coeffs.dtype == torch.uint8 and blocks.value_coeffs.shape[-1] == D // 2
    assert blocks.value_bits == 4
    rk, rv = reconstruct(blocks)
    assert rel_err(rk, k) < 0.01
    assert 0.01 < rel_err(rv, v) < 0.12


def test_identity_codec_unquantized_owns_its_storage():
    """With the identity codec at 16 bits the stored rows equal the input; they must still be
    a copy (the cold tier may not alias or pin the hot buffer it was cut from)."""
    k = low_rank((1, 1, 1), rank=4, seed=17)
    v = low_rank((1, 1, 1), rank=4, seed=18)
    c = cfg(key_codec="identity", value_codec="identity", coeff_bits=16, outliers_per_block=0)
    b = compress_blocks(k, v, c, D, D)
    assert b.key_basis is None and b.value_basis is None
    assert b.key_coeffs.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    assert b.value_coeffs.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
    torch.testing.assert_close(reconstruct(b)[0], k, rtol=0, atol=0)


@pytest.mark.parametrize("refit", [False, True])
def test_one_batched_fit_per_side_for_every_block_of_every_head(monkeypatch, refit):
    """compress_blocks never loops over blocks or heads in Python: the randomized SVD and the
    quantizer see every block of every head (B*H*nb matrices) in one call per side."""
    from spectralcache.linalg import quant, rsvd

    seen: dict[str, list[tuple[int, ...]]] = {"svd": [], "quant": []}
    orig_svd, orig_quant = rsvd.randomized_svd, quant.quantize_rows

    def svd(m, *a, **kw):
        seen["svd"].append(tuple(m.shape))
        return orig_svd(m, *a, **kw)

    def qr(x, *a, **kw):
        seen["quant"].append(tuple(x.shape))
        return orig_quant(x, *a, **kw)

    monkeypatch.setattr(rsvd, "randomized_svd", svd)
    monkeypatch.setattr(quant, "quantize_rows", qr)
    k, v = low_rank((2, 3, 5), rank=6, seed=21), low_rank((2, 3, 5), rank=6, seed=22)
    b = compress_blocks(k, v, cfg(refit_after_outliers=refit), 8, 8)
    per_side = 2 if refit else 1  # refit fits each side once more, still batched
    assert seen["svd"] == [(30, T, D)] * (2 * per_side)
    assert seen["quant"] == [(30, T, 8)] * (2 * per_side)
    assert b.key_coeffs.shape == (2, 3, 5, T, 8) and b.num_blocks == 5


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_too_large_for_float16_scales_are_kept_exact(bits):
    """A finite row whose int8/int4 scale would overflow float16 is stored exactly as an outlier
    (and kept out of the fit), instead of making every later compression fail."""
    k, v = low_rank((2,), rank=6, seed=23), low_rank((2,), rank=6, seed=24)
    k[0, 10] = 3e38 / (torch.arange(D) + 1)  # float32-finite, far beyond 65504 * 127
    v[1, 20, 3] = 1e7
    c = cfg(coeff_bits=bits)
    b = compress_blocks(k, v, c, 8, 8)
    assert 10 in b.outlier_index[0].tolist() and 20 in b.outlier_index[1].tolist()
    rk, rv = reconstruct(b)
    assert torch.equal(rk[0, 10], k[0, 10]) and torch.equal(rv[1, 20], v[1, 20])
    for x in (b.key_scales, b.value_scales):
        assert torch.isfinite(x).all()
    # the other rows are fitted as if the huge rows were absent
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, 10] = mask[1, 20] = False
    assert rel_err(rk[mask], k[mask]) < {4: 0.2, 8: 0.02}[bits]
    # more such rows than outliers_per_block in one block: refused with a clear error
    k[0, :5] = 1e30
    with pytest.raises(ValueError, match=r"a block has 6 rows too large .* outliers_per_block=4"):
        compress_blocks(k, v, c, 8, 8)
