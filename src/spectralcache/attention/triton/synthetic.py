"""Random ``SpectralLayerState`` objects at any shape, for kernel tests and benchmarks.

The tensors have the exact dtypes and layouts of ``cache/state.py`` (int8 / packed int4 /
16-bit coefficients, float16 row scales, bases or identity codec, exact outliers with distinct
in-block indices, landmarks | cold blocks | hot buffer | optional chunk), and the cold and hot
tensors are *views into larger capacity buffers* as the cache keeps them, so a reader that
ignores strides is caught. Values are random (no SVD), which is all attention needs: the
kernel must compute the same function as the torch reference on any valid state.
"""

from __future__ import annotations

import torch

from spectralcache.cache.state import ColdBlocks, SpectralLayerState

__all__ = ["random_state", "rope_inv_freq"]


def rope_inv_freq(rot_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Standard RoPE inverse frequencies for the leading ``rot_dim`` dims (float32)."""
    return 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)


def _capacity_view(x: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    """``x`` copied into a buffer with ``extra`` more slots along ``dim``; returns the view of ``x``'s part."""
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] += extra
    buf = torch.full(shape, 0, dtype=x.dtype, device=x.device)
    view = buf.narrow(dim, 0, x.shape[dim])
    view.copy_(x)
    return view


def random_state(
    *,
    batch: int = 1,
    kv_heads: int = 2,
    head_dim: int = 32,
    landmarks: int = 4,
    block_size: int = 16,
    blocks: int = 3,
    outliers: int = 2,
    hot: int = 5,
    chunk: int | None = 1,
    key_space: str = "post_rope",
    key_bits: int = 8,
    value_bits: int | None = None,
    rank_keys: int = 8,
    rank_values: int = 12,
    identity_keys: bool = False,
    identity_values: bool = False,
    channel_keys: bool = False,
    key_zero_point: bool = False,
    dtype: torch.dtype = torch.float32,
    basis_dtype: torch.dtype | None = None,
    rot_dim: int | None = None,
    spare_capacity: int = 2,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SpectralLayerState:
    """A random layer state; the last ``chunk`` cache indices are also the current chunk.

    ``spare_capacity`` extra block / token slots make the cold and hot tensors strided views.
    ``rot_dim`` (pre-RoPE only) is the number of rotated leading dims (default head_dim).
    ``channel_keys``: identity keys with one scale per channel and block (``key_codec="channel"``,
    ``key_scales [B, H, nb, 1, D]``), channel scales spread over three decades as real keys' are.
    ``key_zero_point`` (with ``channel_keys``): a float32 zero point per channel and block as well
    (``key_offsets [B, H, nb, 1, D]``, ``key_zero_point=True``), the key integers over every level
    (``[-8, 7]`` / ``[-128, 127]``, the most negative included) and the offsets spread like real
    post-RoPE keys': most channels near zero, about one in eight (RoPE's slow channels, which barely
    turn over a block) offset by 3 to 20 times its channel's half range, either sign.
    """
    if channel_keys and key_bits == 16:
        raise ValueError("channel_keys needs 4- or 8-bit keys (16-bit keys have no scales)")
    if key_zero_point and not channel_keys:
        raise ValueError("key_zero_point needs channel_keys (zero points are per-channel offsets)")
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, d, t, nb = batch, kv_heads, head_dim, block_size, blocks
    value_bits = key_bits if value_bits is None else value_bits
    basis_dtype = (dtype if key_bits == 16 else torch.float16) if basis_dtype is None else basis_dtype
    identity_keys = identity_keys or channel_keys
    rk = d if identity_keys else rank_keys
    rv = d if identity_values else rank_values

    def rn(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).to(dt).to(device)

    def coeffs(rank: int, bits: int, full_range: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # full_range: every level of the width (zero-point keys), else the symmetric [-qmax, qmax]
        shape = (b, h, nb, t, rank)
        if bits == 16:
            return rn(*shape, scale=0.5), None
        scales = (torch.rand((b, h, nb, t, 1), generator=g) * 0.05 + 0.01).half().to(device)
        if bits == 8:
            lo = -128 if full_range else -127
            return torch.randint(lo, 128, shape, generator=g, dtype=torch.int8).to(device), scales
        from spectralcache.linalg import quant

        ints = torch.randint(-8 if full_range else -7, 8, shape, generator=g, dtype=torch.int8)
        return quant.pack_int4(ints).to(device), scales * 8

    def basis(rank: int) -> torch.Tensor:
        return rn(b, h, nb, rank, d, scale=rank**-0.5, dt=basis_dtype)

    hot_start = landmarks + nb * t
    seq_len = hot_start + hot
    cold = None
    sc = spare_capacity
    if nb:
        kc, ks = coeffs(rk, key_bits, full_range=key_zero_point)
        ko = None
        if channel_keys:
            spread = 10.0 ** (3.0 * torch.rand((b, h, nb, 1, d), generator=g) - 2.0)  # 0.01 .. 10
            ks = (spread / (7.0 if key_bits == 4 else 127.0)).half().to(device)
        if key_zero_point:
            # offsets in units of the channel's half range: ~N(0, 1) for most channels, 3..20 for
            # about one channel in eight (a far-from-zero channel, either sign)
            far = torch.rand((b, h, nb, 1, d), generator=g) < 0.125
            mag = torch.where(
                far,
                3.0 + 17.0 * torch.rand((b, h, nb, 1, d), generator=g),
                torch.randn((b, h, nb, 1, d), generator=g),
            )
            sign = torch.where(torch.rand((b, h, nb, 1, d), generator=g) < 0.5, -1.0, 1.0)
            ko = (mag * sign * spread).float().to(device)
        vc, vs = coeffs(rv, value_bits)
        fields = dict(
            key_coeffs=kc,
            key_scales=ks,
            key_offsets=ko,
            key_basis=None if identity_keys else basis(rk),
            value_coeffs=vc,
            value_scales=vs,
            value_basis=None if identity_values else basis(rv),
            outlier_keys=rn(b, h, nb, outliers, d, scale=2.0),
            outlier_values=rn(b, h, nb, outliers, d),
            outlier_index=torch.rand(b, h, nb, t, generator=g)
            .argsort(-1)[..., :outliers]
            .contiguous()
            .to(device),
        )
        fields = {k: None if v is None else _capacity_view(v, 2, sc) for k, v in fields.items()}
        cold = ColdBlocks(
            **fields,
            block_starts=(torch.arange(nb) * t + landmarks).to(device),
            block_size=t,
            coeff_bits=key_bits,
            rank_keys=rk,
            rank_values=rv,
            value_coeff_bits=None if value_bits == key_bits else value_bits,
        )
    chunk_keys = chunk_values = None
    chunk_start = seq_len
    if chunk is not None:
        chunk_start = seq_len - chunk
        chunk_keys, chunk_values = rn(b, h, chunk, d), rn(b, h, chunk, d)
    inv_freq = None
    if key_space == "pre_rope":
        inv_freq = rope_inv_freq(d if rot_dim is None else rot_dim).to(device)
    state = SpectralLayerState(
        layer_idx=0,
        seq_len=seq_len,
        landmark_keys=rn(b, h, landmarks, d),
        landmark_values=rn(b, h, landmarks, d),
        cold=cold,
        hot_keys=_capacity_view(rn(b, h, hot, d), 2, sc),
        hot_values=_capacity_view(rn(b, h, hot, d), 2, sc),
        hot_start=hot_start,
        chunk_keys=chunk_keys,
        chunk_values=chunk_values,
        chunk_start=chunk_start,
        key_space=key_space,
        rope_inv_freq=inv_freq,
    )
    return state
