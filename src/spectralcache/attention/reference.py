"""Reference attention over a compressed layer (``SpectralLayerState``), in plain torch.

This is the definition the fused kernels of a later issue must match, so it favours
clarity over cleverness, but it is also the CPU fast path: every tier is handled with a
few batched matmuls (no Python loop over tokens or blocks; pre-RoPE keys loop over
*tiles* of many blocks only to bound memory).

Two parts, merged exactly by their log-sum-exps (:func:`merge_partials`):

* **the exact current chunk** (cache indices ``chunk_start .. seq_len - 1``, the K/V this
  forward call added) runs through a fused SDPA kernel (:func:`sdpa_with_lse`: FlashAttention
  / memory-efficient on CUDA, the flash kernel on CPU) that also returns its log-sum-exp. A
  first prefill (nothing cached before the chunk) is plain SDPA. Decode and short chunks,
  and softcapped models (SDPA has no softcap), attend the chunk as one more exact tier of
  the torch softmax below instead.
* **the tiers before the chunk**: one softmax spans the exact tiers and a tile of cold
  blocks. Scores are computed per tier in float32, the row maximum is taken over all of
  them, and their exponentials share one denominator, so the result is exactly softmax
  attention over their union; further tiles of cold blocks (decoded to float32 a few
  thousand tokens at a time on CPU, see ``_block_tiles``) are merged in by log-sum-exp:

  * exact tiers (landmarks, outliers, hot buffer): ``q·kᵀ`` and ``p·v``;
  * cold blocks, keys post-RoPE: ``(q·B_Kᵀ)·C_Kᵀ`` with the per-row scale applied after
    the product; keys pre-RoPE: each tile of blocks is reconstructed, rotated to its cache
    indices (``cache/rope.py``) and scored;
  * cold blocks, values always latent: ``(p·C_V)·B_V`` with the per-row value scale
    folded into ``p``, one matmul that also sums over blocks.
  * identity codec (``key_basis`` / ``value_basis`` None): the scaled coefficient rows are the
    keys / values themselves, so the basis product is skipped (``q·C_Kᵀ``, ``Σ_blocks p·C_V``).

Optionally (``tier_backend="dense_sdpa"``) a prefill chunk reads the tiers through SDPA as
well, from K/V rebuilt densely for that one call.

Masking is by *cache index* (the order tokens entered the cache, padding included),
which is what the attention mask's last dimension indexes, so left padding works for
every tier: each tier gathers the mask columns of its own cache indices. Tokens at
cache indices ``>= chunk_start`` are read from the exact chunk only; the tiers'
copies of them (the cache may already have compressed them) are masked out. A row that
sees no key at all returns zeros and log-sum-exp ``-inf``, never NaN.

GQA: queries are viewed as ``[B, H_kv, groups * q, D]`` so keys and values are never
repeated per query head (the CUDA LSE kernels get K/V repeated; that copy is small next
to the attention it feeds).

Decode reads no tensor on the host (no ``.item()``, ``bool(t)``, ``.tolist()``): every size
comes from host integers of the state (``seq_len``, ``hot_start``, ``chunk_start``,
``ColdBlocks.num_blocks``), so a CUDA decode step never waits for the device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spectralcache.cache.rope import rotate_block_keys
from spectralcache.cache.state import ColdBlocks, SpectralLayerState

__all__ = [
    "dense_attention",
    "dense_reference",
    "merge_partials",
    "reconstruct_dense_kv",
    "sdpa_with_lse",
    "spectral_attention",
]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- coefficients


def _unpack_int4(packed: torch.Tensor, rank: int) -> torch.Tensor:
    """Unpack coefficients stored two per byte, via the quantization module that packed them."""
    from spectralcache.linalg import quant

    return quant.unpack_int4(packed, rank)


def _coeffs_float(coeffs: torch.Tensor, bits: int, rank: int) -> torch.Tensor:
    """Integer (or 16-bit float) coefficients as float32, *without* their row scale."""
    if bits == 4:
        coeffs = _unpack_int4(coeffs, rank)
    return coeffs.float()


# --------------------------------------------------------------------------- masks


class _MaskColumns:
    """Turns the attention mask into additive float32 biases for arbitrary cache indices.

    ``attention_mask`` is what transformers passes: ``[B, 1, q, kv_len]`` bool (True =
    attend), an additive float mask of that shape, or None (then causality is applied
    here: query ``i`` sits at cache index ``seq_len - q + i``). Masked entries become
    ``-inf`` so a fully masked row is detectable (and produces zeros, not NaN).
    Entries of a float mask at or below half its dtype's minimum count as masked.
    """

    def __init__(
        self,
        attention_mask: torch.Tensor | None,
        batch: int,
        q_len: int,
        seq_len: int,
        tier_end: int,
        device: torch.device,
        q_first: int | None = None,
    ) -> None:
        self.q_len = q_len
        self.tier_end = tier_end  # cache indices >= tier_end are served by the chunk only
        self.mask = None
        q_first = seq_len - q_len if q_first is None else q_first
        self.q_first = q_first
        self.q_pos = torch.arange(q_first, q_first + q_len, device=device)
        if attention_mask is None:
            return
        if attention_mask.dim() != 4:
            raise ValueError(
                f"attention_mask must be 4D [batch, 1, q_len, kv_len], got shape {tuple(attention_mask.shape)}"
            )
        mb, mh, mq, mk = attention_mask.shape
        if mb not in (1, batch) or mh != 1 or mq != q_len:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not fit batch={batch}, q_len={q_len}"
                " (expected [batch, 1, q_len, kv_len])"
            )
        if mk < seq_len:
            raise ValueError(
                f"attention_mask covers {mk} cache positions but the layer holds {seq_len} tokens"
            )
        if attention_mask.dtype == torch.bool:
            self.mask = attention_mask
        elif attention_mask.is_floating_point():
            self.mask = attention_mask
        else:
            raise TypeError(f"attention_mask must be bool or floating, got {attention_mask.dtype}")
        self.mask = self.mask.to(device)

    def _from_values(self, cols: torch.Tensor) -> torch.Tensor:
        if cols.dtype == torch.bool:
            zero = torch.zeros((), dtype=torch.float32, device=cols.device)
            return torch.where(cols, zero, _NEG_INF)
        floor = torch.finfo(cols.dtype).min / 2
        return torch.where(cols > floor, cols.float(), _NEG_INF)

    def all_visible(self, end: int) -> bool:
        """True when no mask is given and every cache index below ``end`` is seen by every query
        (the decode case): the tier then needs no bias at all."""
        return self.mask is None and end <= self.tier_end and end - 1 <= self.q_first

    def shared(self, idx: torch.Tensor, end: int | None = None) -> torch.Tensor | None:
        """Bias for cache indices ``idx`` [n] shared by all heads -> [B|1, 1, q, n].

        ``end`` (optional) is an upper bound of ``idx``; None is returned when nothing below
        it is masked."""
        if end is not None and self.all_visible(end):
            return None
        valid = idx < self.tier_end
        if self.mask is None:
            keep = (idx[None, :] <= self.q_pos[:, None]) & valid[None, :]
            zero = torch.zeros((), dtype=torch.float32, device=idx.device)
            return torch.where(keep, zero, _NEG_INF)[None, None]
        bias = self._from_values(self.mask.index_select(-1, idx))
        return bias.masked_fill(~valid, _NEG_INF)

    def per_head(self, idx: torch.Tensor, end: int | None = None) -> torch.Tensor | None:
        """Bias for per-(batch, head) cache indices ``idx`` [B, H, n] -> [B, H, q, n] (None as in ``shared``)."""
        if end is not None and self.all_visible(end):
            return None
        b, h, n = idx.shape
        valid = (idx < self.tier_end)[:, :, None, :]
        if self.mask is None:
            keep = (idx[:, :, None, :] <= self.q_pos[:, None]) & valid
            zero = torch.zeros((), dtype=torch.float32, device=idx.device)
            return torch.where(keep, zero, _NEG_INF)
        mask = self.mask.expand(b, h, self.q_len, self.mask.shape[-1])
        cols = torch.gather(mask, -1, idx[:, :, None, :].expand(b, h, self.q_len, n))
        return self._from_values(cols).masked_fill(~valid, _NEG_INF)


# --------------------------------------------------------------------------- compressed tiers


def _softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def _coeffs_scaled(
    coeffs: torch.Tensor,
    scales: torch.Tensor | None,
    bits: int,
    rank: int,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Coefficient rows times their per-row scale (plus the per-channel zero points of
    ``key_zero_point`` keys, which are stored only beside per-channel scales), float32.

    Convert, then scale in place: measured 2x faster on CPU than ``int8 * float32`` with type
    promotion and broadcasting."""
    from spectralcache.linalg.quant import expand_col_groups  # key_group_size: [..., G, D]

    if bits == 4:
        coeffs = _unpack_int4(coeffs, rank)
    out = coeffs.float()
    rows = out.shape[-2]
    if scales is not None:
        out.mul_(expand_col_groups(scales, rows))
    return out if offsets is None else out.add_(expand_col_groups(offsets, rows).float())


@dataclass
class _ColdPrep:
    """A tile of cold blocks decoded to float32 (once per call when query tiles share it).

    Per-row scales are applied where it is cheaper, the same products in float32 either way:
    folded into the coefficient matrices (one pass over ``[nb, T, r]``) when a query tile has
    more rows than the rank (prefill), else on the scores / probabilities (one pass over
    ``[nb, rows, T]``: decode has a handful of rows).
    """

    lo: int  # blocks lo:hi of the cold tier
    hi: int
    key_coeffs: torch.Tensor  # [B, H, nb, T, rk] float32 (scaled unless key_scales is set)
    key_scales: torch.Tensor | None  # [B, H, nb, 1, T] float32: multiply the scores
    key_basis_t: torch.Tensor | None  # post-RoPE low-rank: [B, H, D, nb*rk] float32
    keys: torch.Tensor | None  # pre-RoPE, rebuilt and rotated: [B, H, nb, T, D] float32
    value_coeffs: torch.Tensor  # [B, H, nb, T, rv] float32 (scaled unless value_scales is set)
    value_scales: torch.Tensor | None  # [B, H, nb, 1, T] float32: multiply the probabilities
    value_basis: torch.Tensor | None  # [B, H, nb*rv, D] float32 (None = identity codec)
    is_outlier: torch.Tensor  # [B, H, nb, T] bool: rows attended through their exact copy
    starts: torch.Tensor  # [nb] cache index of each block's first token


# Decoded cold tiles stay under this many float32 elements when several query tiles share them
# (prefill); otherwise blocks are decoded tile by tile (see ``_block_tiles``).
_SHARED_PREP_MAX_ELEMENTS = 1 << 28


def _prepare_cold(state: SpectralLayerState, lo: int, hi: int, rows: int) -> _ColdPrep:
    """Decode cold blocks ``lo:hi`` for query tiles of ``rows`` rows per KV head (see ``_ColdPrep``)."""
    cold = state.cold
    device = state.hot_keys.device
    bsz, n_kv, _, head_dim = state.hot_keys.shape
    sel = slice(lo, hi)
    n_blocks = hi - lo
    t = cold.block_size
    starts = cold.block_starts[sel].to(device)
    pre_rope = state.key_space == "pre_rope"
    # pre-RoPE keys are rebuilt row by row anyway: the scale goes in there; per-channel scales
    # (key_codec="channel") cannot be applied to the scores, so they are always folded in
    fold_keys = pre_rope or rows > cold.rank_keys or cold.key_scales_per_channel
    key_scales = _opt(cold.key_scales, sel)
    key_coeffs = _coeffs_scaled(
        cold.key_coeffs[:, :, sel],
        key_scales if fold_keys else None,
        cold.coeff_bits,
        cold.rank_keys,
        _opt(cold.key_offsets, sel),  # zero points come with channel scales, always folded
    )
    if fold_keys or key_scales is None:
        key_scales = None
    else:
        key_scales = key_scales.float().transpose(-1, -2)
    key_basis = None if cold.key_basis is None else cold.key_basis[:, :, sel].float()  # [B,H,nb,rk,D]
    key_basis_t = keys = None
    if pre_rope:
        keys = key_coeffs if key_basis is None else key_coeffs @ key_basis
        keys = rotate_block_keys(keys, starts, state.rope_inv_freq).float()
    elif key_basis is not None:
        key_basis_t = key_basis.reshape(bsz, n_kv, n_blocks * cold.rank_keys, head_dim).transpose(-1, -2)
    fold_values = rows > cold.rank_values
    value_scales = _opt(cold.value_scales, sel)
    value_coeffs = _coeffs_scaled(
        cold.value_coeffs[:, :, sel], value_scales if fold_values else None, cold.value_bits, cold.rank_values
    )
    if fold_values or value_scales is None:
        value_scales = None
    else:
        value_scales = value_scales.float().transpose(-1, -2)
    value_basis = None
    if cold.value_basis is not None:
        value_basis = cold.value_basis[:, :, sel].float().reshape(bsz, n_kv, n_blocks * cold.rank_values, -1)
    is_outlier = torch.zeros(bsz, n_kv, n_blocks, t, dtype=torch.bool, device=device)
    is_outlier.scatter_(-1, cold.outlier_index[:, :, sel], True)
    return _ColdPrep(
        lo,
        hi,
        key_coeffs,
        key_scales,
        key_basis_t,
        keys,
        value_coeffs,
        value_scales,
        value_basis,
        is_outlier,
        starts,
    )


def _block_tiles(
    state: SpectralLayerState, n_blocks: int, query_tiles: int, rows: int, tile_tokens: int | None
) -> list:
    """How the first ``n_blocks`` cold blocks are read: ``[_ColdPrep]`` decoded once for every query
    tile (prefill, when it fits), else ``[(lo, hi), ...]`` ranges of blocks decoded per query tile
    (``tile_tokens`` tokens each; default: ~2**20 decoded floats per tile on CPU, 2**26 on CUDA).

    Why tiles: on CPU a large fresh float32 tensor costs page faults. Measured on the 2-core box
    (1 thread, decode at 32K tokens, 8 KV heads, head_dim 128): 51 ms per call decoding every
    block at once, 22 ms in 1K-token tiles; at 8K tokens with 2 KV heads, head_dim 64 one tile
    is best (0.8 ms) — hence a budget in floats, not tokens. On CUDA the caching allocator
    makes one big tile cheap and each tile costs kernel launches. Tiles also bound the memory
    of rebuilt pre-RoPE keys."""
    if not n_blocks:
        return []
    cold = state.cold
    bsz, n_kv, _, head_dim = state.hot_keys.shape
    per_token = (head_dim if state.key_space == "pre_rope" else cold.rank_keys) + cold.rank_values
    if query_tiles > 1 and bsz * n_kv * n_blocks * cold.block_size * per_token <= _SHARED_PREP_MAX_ELEMENTS:
        return [_prepare_cold(state, 0, n_blocks, rows)]
    if tile_tokens is None:
        budget = 1 << 26 if state.hot_keys.device.type == "cuda" else 1 << 20
        tile_tokens = budget // (bsz * n_kv * per_token)
    per_tile = max(1, tile_tokens // cold.block_size)
    return [(lo, min(n_blocks, lo + per_tile)) for lo in range(0, n_blocks, per_tile)]


def _opt(x: torch.Tensor | None, sel: slice) -> torch.Tensor | None:
    return None if x is None else x[:, :, sel]


def _cold_scores(qs: torch.Tensor, prep: _ColdPrep, state: SpectralLayerState) -> torch.Tensor:
    """Scaled query [B, H, R, D] against the prepared cold blocks -> [B, H, nb, R, T] (a fresh tensor)."""
    nb, rk = prep.hi - prep.lo, state.cold.rank_keys
    bsz, n_kv, rows, _ = qs.shape
    if prep.keys is not None:  # pre-RoPE: rebuilt, rotated keys (scales folded in)
        return qs[:, :, None] @ prep.keys.transpose(-1, -2)
    if prep.key_basis_t is None:  # identity basis: the coefficient rows are the keys, q·Cᵀ per block
        scores = qs[:, :, None] @ prep.key_coeffs.transpose(-1, -2)  # [B,H,nb,R,T]
    else:  # (q·B_Kᵀ) for every block in one matmul: [B,H,R,D] @ [B,H,D,nb*rk], then ·C_Kᵀ per block
        proj = (qs @ prep.key_basis_t).reshape(bsz, n_kv, rows, nb, rk).transpose(2, 3)  # [B,H,nb,R,rk]
        scores = proj @ prep.key_coeffs.transpose(-1, -2)  # [B,H,nb,R,T]
    return scores if prep.key_scales is None else scores.mul_(prep.key_scales)


def _cold_values(p: torch.Tensor, prep: _ColdPrep, rank_values: int) -> torch.Tensor:
    """Latent value read: probabilities [B, H, nb, R, T] -> sum over blocks of (p·C_V)·B_V, [B, H, R, D]."""
    if prep.value_scales is not None:
        p = p.mul_(prep.value_scales)  # p is the caller's own tensor, no longer needed unscaled
    latent = p @ prep.value_coeffs  # [B,H,nb,R,rv]
    if prep.value_basis is None:  # identity basis: the latent read is the output
        return latent.sum(dim=2)
    bsz, n_kv, nb, rows, _ = latent.shape
    latent = latent.transpose(2, 3).reshape(bsz, n_kv, rows, nb * rank_values)
    return latent @ prep.value_basis  # one matmul also sums the blocks


# --------------------------------------------------------------------------- merging partial results


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial softmax-attention results over disjoint key sets.

    ``out_x`` [..., q, D] is softmax attention over key set X alone and ``lse_x`` [..., q]
    the natural-log log-sum-exp of its (scaled, softcapped, masked) scores. The result is
    attention over the union, ``(e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b})``,
    and its log-sum-exp ``logaddexp(lse_a, lse_b)``; both float32.

    ``lse = -inf`` marks an empty part (no visible key): its ``out`` is ignored, even if it is
    NaN or inf. When both parts are empty the row is empty too: ``out`` is 0 and ``lse`` is
    ``-inf`` (the same convention as :func:`spectral_attention` for a fully masked row), so
    merges can be chained without producing NaN.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    ref = torch.where(torch.isfinite(lse), lse, 0.0)  # both empty: weights exp(-inf - 0) = 0
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    # where(), not a product: an empty part's out may be garbage, and 0 * NaN is NaN
    out = torch.where(w_a > 0, out_a.float() * w_a, 0.0) + torch.where(w_b > 0, out_b.float() * w_b, 0.0)
    return out, lse


# --------------------------------------------------------------------------- the exact chunk via SDPA

# The chunk goes through SDPA when it has at least this many (query, chunk key) pairs; below it
# (decode, short chunks) attending it inside the one-softmax tier path costs less than an extra
# kernel launch plus the merge.
_SDPA_MIN_PAIRS = 4096
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _range_bias(
    attention_mask: torch.Tensor | None,
    q_first: int,
    q_len: int,
    key_start: int,
    key_end: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mask of queries at cache indices ``q_first ..`` against keys ``key_start .. key_end - 1``.

    Returns ``(bias, visible)``: an additive ``[B|1, 1, q, n]`` bias in ``dtype`` (``-inf`` =
    masked) or None when nothing is masked, and a ``[B|1, 1, q]`` bool of rows that see at
    least one of these keys (None = every row does).
    """
    if attention_mask is None:  # causal by cache index
        if q_first >= key_end - 1:
            return None, None
        q_pos = torch.arange(q_first, q_first + q_len, device=device)
        keep = (torch.arange(key_start, key_end, device=device)[None, :] <= q_pos[:, None])[None, None]
    else:
        cols = attention_mask[..., key_start:key_end].to(device)
        if cols.dtype != torch.bool:
            keep = cols > torch.finfo(cols.dtype).min / 2
            return torch.where(keep, cols.to(dtype), _NEG_INF), keep.any(dim=-1)
        keep = cols
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(keep, zero, _NEG_INF), keep.any(dim=-1)


def _chunk_bias(
    attention_mask: torch.Tensor | None,
    q_first: int,
    q_len: int,
    chunk_start: int,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool, torch.Tensor | None]:
    """What SDPA needs to attend queries at cache indices ``q_first ..`` to the chunk:
    ``(bias, is_causal, visible)`` as in :func:`_range_bias`, with SDPA's own causal flag
    instead of a bias when the queries *are* the chunk (top-left and bottom-right alignment
    then agree)."""
    if attention_mask is None and q_first == chunk_start and q_len == seq_len - chunk_start:
        return None, True, None
    bias, visible = _range_bias(attention_mask, q_first, q_len, chunk_start, seq_len, dtype, device)
    return bias, False, visible


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, n, D] -> [B, Hkv * groups, n, D], query head h reading KV head h // groups."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _aligned_bias(bias: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """The memory-efficient CUDA kernel wants the bias as ``[batch, heads, q, n]`` (broadcast by
    stride 0 is fine, a size-1 batch is not: "attn_bias: wrong shape (batch dimension)", seen on
    the H100) with rows 16-element aligned."""
    _, _, q, n = bias.shape
    padded = bias.new_empty(bias.shape[0], 1, q, (n + 15) // 16 * 16)[..., :n]
    padded.copy_(bias)
    return padded.expand(batch, heads, q, n)


def sdpa_with_lse(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, str] | None:
    """Softmax attention of ``query`` [B, Hq, q, D] over ``keys`` / ``values`` [B, Hkv, n, D] by a
    fused SDPA kernel, with its natural-log log-sum-exp of the scaled scores [B, Hq, q] float32.

    ``bias`` is an additive mask in the query dtype (``-inf`` = masked), ``is_causal`` SDPA's
    top-left causal flag. Returns ``(out, lse, backend)`` or None when no fused kernel applies
    here (the caller then uses the torch path). Backends: CPU ``flash_cpu`` (the only fused CPU
    kernel, mask supported, GQA native); CUDA ``flash`` (fp16/bf16, no mask) or ``efficient``
    (any mask, fp32 too), K/V repeated per query head (cheap next to attention); ``sdpa`` = the
    public function (CUDA, ``need_lse=False``: torch picks its fastest backend, no LSE).
    Rows whose keys are all masked come back arbitrary (the caller masks them).
    """
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    aten = torch.ops.aten
    try:
        if query.device.type == "cpu":
            if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
                return None
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                query, keys, values, 0.0, is_causal, attn_mask=bias, scale=scale
            )
            return out, lse, "flash_cpu"
        if query.device.type != "cuda":
            return None
        head_dim = query.shape[-1]
        if not need_lse:
            if bias is None:
                out = F.scaled_dot_product_attention(
                    query, keys, values, is_causal=is_causal, scale=scale, enable_gqa=groups > 1
                )
            else:  # GQA with a mask would fall back to the math kernel: repeat instead
                out = F.scaled_dot_product_attention(
                    query, _repeat_kv(keys, groups), _repeat_kv(values, groups), attn_mask=bias, scale=scale
                )
            return out, None, "sdpa"
        keys, values = _repeat_kv(keys, groups), _repeat_kv(values, groups)
        half = query.dtype in (torch.float16, torch.bfloat16)
        if bias is None and half and head_dim % 8 == 0 and head_dim <= 256:
            res = aten._scaled_dot_product_flash_attention(
                query, keys, values, 0.0, is_causal, False, scale=scale
            )
            return res[0], res[1][..., : query.shape[2]], "flash"
        if head_dim % (8 if half else 4) == 0:
            attn_bias = None if bias is None else _aligned_bias(bias, query.shape[0], query.shape[1])
            res = aten._scaled_dot_product_efficient_attention(
                query, keys, values, attn_bias, True, 0.0, is_causal, scale=scale
            )
            return res[0], res[1][..., : query.shape[2]], "efficient"
    except RuntimeError as exc:  # a kernel refusing these shapes: the torch path is always right
        _warn_once(
            f"sdpa:{query.device.type}:{query.dtype}",
            f"spectral attention: fused SDPA failed ({exc}); using the torch path",
        )
    return None


def _attend_chunk_sdpa(
    query: torch.Tensor,
    state: SpectralLayerState,
    attention_mask: torch.Tensor | None,
    q_first: int,
    scale: float,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Queries against the exact chunk through SDPA: (out [B, Hq, q, D] query dtype, lse or None)."""
    q_len = query.shape[2]
    seq_len = int(state.seq_len)
    bias, is_causal, visible = _chunk_bias(
        attention_mask, q_first, q_len, state.chunk_start, seq_len, query.dtype, query.device
    )
    res = sdpa_with_lse(
        query,
        state.chunk_keys,
        state.chunk_values,
        bias=bias,
        is_causal=is_causal,
        scale=scale,
        need_lse=need_lse,
    )
    if res is None:
        return None
    out, lse, _ = res
    if visible is not None:  # rows that see no chunk key: empty part (kernels disagree on what they return)
        out = torch.where(visible[..., None], out, 0.0).to(query.dtype)
        if lse is not None:
            lse = torch.where(visible, lse, _NEG_INF)
    return out, lse


# --------------------------------------------------------------------------- the tiers as dense K/V (option)

# Dense K/V of the tiers are rebuilt for SDPA only below this many elements (K and V together).
_DENSE_TIERS_MAX_ELEMENTS = 1 << 30


def _tiers_dense_kv(
    state: SpectralLayerState, tier_end: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K/V of cache indices ``[0, tier_end)`` rebuilt from the tiers as dense ``[B, H, n, D]``
    tensors in ``dtype`` (cold rows ``C·B`` with scales, pre-RoPE keys rotated, outlier rows
    replaced by their exact copies). None when the tiers do not tile ``[0, tier_end)``
    contiguously (landmarks | blocks | hot, as ``cache/state.py`` lays them out) or when the
    result would exceed ``_DENSE_TIERS_MAX_ELEMENTS``."""
    bsz, n_kv, _, head_dim = state.hot_keys.shape
    if 2 * bsz * n_kv * tier_end * head_dim > _DENSE_TIERS_MAX_ELEMENTS:
        return None
    device = state.hot_keys.device
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    pos = min(state.landmark_keys.shape[2], tier_end)
    if pos > 0:
        keys.append(state.landmark_keys[:, :, :pos])
        values.append(state.landmark_values[:, :, :pos])
    n_blocks = _cold_blocks_before(state, tier_end)
    if n_blocks:
        cold = state.cold
        t = cold.block_size
        first = state.hot_start - cold.num_blocks * t
        if first != pos:
            return None
        sel = slice(0, n_blocks)
        k = _coeffs_scaled(
            cold.key_coeffs[:, :, sel],
            _opt(cold.key_scales, sel),
            cold.coeff_bits,
            cold.rank_keys,
            _opt(cold.key_offsets, sel),
        )
        if cold.key_basis is not None:
            k = k @ cold.key_basis[:, :, sel].float()
        if state.key_space == "pre_rope":
            k = rotate_block_keys(k, cold.block_starts[sel].to(device), state.rope_inv_freq).float()
        v = _coeffs_scaled(
            cold.value_coeffs[:, :, sel], _opt(cold.value_scales, sel), cold.value_bits, cold.rank_values
        )
        if cold.value_basis is not None:
            v = v @ cold.value_basis[:, :, sel].float()
        oidx = cold.outlier_index[:, :, sel]
        if oidx.shape[-1]:
            idx = oidx[..., None].expand(*oidx.shape, head_dim)
            # out of place: with 16-bit float32 coefficients and no basis, k / v are the cache's own tensors
            k = k.scatter(3, idx, cold.outlier_keys[:, :, sel].float())
            v = v.scatter(3, idx, cold.outlier_values[:, :, sel].float())
        take = min(n_blocks * t, tier_end - first)
        keys.append(k.reshape(bsz, n_kv, n_blocks * t, head_dim)[:, :, :take])
        values.append(v.reshape(bsz, n_kv, n_blocks * t, head_dim)[:, :, :take])
        pos = first + take
    n_hot = min(state.hot_keys.shape[2], tier_end - state.hot_start)
    if n_hot > 0:
        if state.hot_start != pos:
            return None
        keys.append(state.hot_keys[:, :, :n_hot])
        values.append(state.hot_values[:, :, :n_hot])
        pos += n_hot
    if pos != tier_end or not keys:
        return None
    return torch.cat([x.to(dtype) for x in keys], dim=2), torch.cat([x.to(dtype) for x in values], dim=2)


def _attend_tiers_dense_sdpa(
    query: torch.Tensor,
    state: SpectralLayerState,
    attention_mask: torch.Tensor | None,
    q_first: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tiers before the chunk, rebuilt to dense K/V for this call only and attended by SDPA:
    (out [B, Hq, q, D] float32, lse [B, Hq, q]), or None when that does not apply."""
    tier_end = int(state.chunk_start)
    kv = _tiers_dense_kv(state, tier_end, query.dtype)
    if kv is None:
        return None
    bias, visible = _range_bias(
        attention_mask, q_first, query.shape[2], 0, tier_end, query.dtype, query.device
    )
    res = sdpa_with_lse(query, kv[0], kv[1], bias=bias, is_causal=False, scale=scale)
    if res is None:
        return None
    out, lse, _ = res
    out = out.float()
    if visible is not None:
        out = torch.where(visible[..., None], out, 0.0)
        lse = torch.where(visible, lse, _NEG_INF)
    return out, lse


# --------------------------------------------------------------------------- attention


def spectral_attention(
    query: torch.Tensor,
    state: SpectralLayerState,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    softcap: float | None = None,
    tile_tokens: int | None = None,
    max_score_elements: int | None = None,
    return_lse: bool = False,
    chunk_backend: str = "auto",
    tier_backend: str = "compressed",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` [B, Hq, q, D] over a compressed layer, without decompressing it.

    Returns [B, Hq, q, D] in the query's dtype (and, with ``return_lse``, the natural-log
    log-sum-exp of the scaled scores, [B, Hq, q] float32, ``-inf`` for a row that sees no key).
    Rows with no visible key (e.g. a padding query) return zeros instead of NaN.

    Two parts, merged exactly by their log-sum-exps (:func:`merge_partials`):

    * the tiers before the chunk (cache indices < ``chunk_start``: landmarks, cold blocks and
      outliers, hot buffer) in float32 torch, split into query tiles so the score matrix stays
      under ``max_score_elements`` (default 2**23 on CPU, 2**26 on CUDA; decode is one tile);
      ``tile_tokens`` (default: sized by device, see ``_block_tiles``) is how many cold tokens
      are decoded to float32 at a time when query tiles do not share one decode;
    * the exact current chunk through a fused SDPA kernel (:func:`sdpa_with_lse`). When nothing
      precedes the chunk (a first prefill) this is plain SDPA.

    ``chunk_backend``: ``"auto"`` uses SDPA (without softcap: SDPA has none) for a first
    prefill of any size and for chunks of at least ``_SDPA_MIN_PAIRS`` (query, key) pairs;
    ``"sdpa"`` always when a kernel exists; ``"torch"`` never (the chunk is then one more exact
    tier of the one float32 softmax).

    ``tier_backend``: ``"compressed"`` (default) reads the tiers in the compressed space as
    above. ``"dense_sdpa"`` (only together with an SDPA chunk) instead rebuilds the tiers'
    K/V densely for this call (one layer's past, transient) and attends them with SDPA too:
    an option for long chunked prefills where fused kernels beat the float32 tile loop; it
    falls back to ``"compressed"`` where it does not apply (softcap, size limit).
    """
    bsz, n_q_heads, q_len, head_dim, _ = state.check_query(query)
    if chunk_backend not in ("auto", "sdpa", "torch"):
        raise ValueError(f"chunk_backend must be 'auto', 'sdpa' or 'torch', got {chunk_backend!r}")
    if tier_backend not in ("compressed", "dense_sdpa"):
        raise ValueError(f"tier_backend must be 'compressed' or 'dense_sdpa', got {tier_backend!r}")
    seq_len = int(state.seq_len)
    q_first = seq_len - q_len
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[2] != q_len):
        raise ValueError(
            f"attention_mask must be 4D [batch, 1, q_len={q_len}, kv_len], got shape {tuple(attention_mask.shape)}"
        )
    if max_score_elements is None:
        max_score_elements = 1 << 26 if query.device.type == "cuda" else 1 << 23
    has_chunk = state.chunk_keys is not None
    if has_chunk:
        n_chunk = state.chunk_keys.shape[2]
        if state.chunk_start + n_chunk != seq_len:
            raise ValueError(
                f"chunk covers cache indices {state.chunk_start}..{state.chunk_start + n_chunk - 1}"
                f" but the layer holds {seq_len} tokens"
            )
        # validates the mask's shape before any kernel sees it
        _MaskColumns(attention_mask, bsz, q_len, seq_len, seq_len, query.device, q_first)
    scale = head_dim**-0.5 if scaling is None else float(scaling)
    use_sdpa = (
        has_chunk
        and softcap is None
        and chunk_backend != "torch"
        and (
            chunk_backend == "sdpa"
            or state.chunk_start == 0  # a first prefill is SDPA alone: exactly what DynamicCache computes
            or q_len * state.chunk_keys.shape[2] >= _SDPA_MIN_PAIRS
        )
    )
    chunk_part = None
    if use_sdpa:
        only_chunk = state.chunk_start == 0  # nothing precedes the chunk: plain SDPA
        chunk_part = _attend_chunk_sdpa(
            query, state, attention_mask, q_first, scale, need_lse=return_lse or not only_chunk
        )
        if chunk_part is not None and only_chunk:
            out, lse = chunk_part
            return (out, lse) if return_lse else out
    include_chunk = chunk_part is None
    if tier_backend == "dense_sdpa" and chunk_part is not None:
        tiers = _attend_tiers_dense_sdpa(query, state, attention_mask, q_first, scale)
        if tiers is not None:
            out, lse = merge_partials(tiers[0], tiers[1], chunk_part[0], chunk_part[1])
            out = out.to(query.dtype)
            return (out, lse) if return_lse else out
    tier_end = seq_len if include_chunk else int(state.chunk_start)
    per_query_row = bsz * n_q_heads * max(tier_end, 1)
    q_tile = max(1, max_score_elements // per_query_row)
    n_blocks = _cold_blocks_before(state, int(state.chunk_start) if has_chunk else seq_len)
    rows = (n_q_heads // state.hot_keys.shape[1]) * min(q_tile, q_len)
    block_tiles = _block_tiles(state, n_blocks, -(-q_len // q_tile), rows, tile_tokens)
    outs, lses = [], []
    for lo in range(0, q_len, q_tile):
        hi = min(q_len, lo + q_tile)
        mask = None if attention_mask is None else attention_mask[:, :, lo:hi]
        q = query[:, :, lo:hi]
        o, s = _attend_tiers(q, state, mask, q_first + lo, scale, softcap, include_chunk, block_tiles)
        outs.append(o)
        lses.append(s)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    if chunk_part is not None:
        out, lse = merge_partials(out, lse, chunk_part[0], chunk_part[1])
    out = out.to(query.dtype)
    return (out, lse) if return_lse else out


def _cold_blocks_before(state: SpectralLayerState, tier_end: int) -> int:
    """How many cold blocks start before cache index ``tier_end``, from host integers only.

    The contract (``cache/state.py``) lays the blocks out contiguously, ending where the hot
    buffer starts: block ``n`` covers ``[hot_start - (nb - n) * T, hot_start - (nb - n - 1) * T)``.
    Reading ``block_starts`` instead would synchronize the device at every decode step.
    """
    cold = state.cold
    if cold is None:
        return 0
    nb = cold.num_blocks
    if nb == 0:
        return 0
    t = cold.block_size
    first = state.hot_start - nb * t
    return max(0, min(nb, -((first - tier_end) // t)))  # ceil((tier_end - first) / t), clamped


def _attend_tiers(
    query: torch.Tensor,
    state: SpectralLayerState,
    attention_mask: torch.Tensor | None,
    q_first: int,
    scale: float,
    softcap: float | None,
    include_chunk: bool,
    block_tiles: list,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query tile (queries at cache indices ``q_first ..``) against the tiers before the
    chunk, plus the chunk itself when ``include_chunk``.

    One float32 softmax spans the exact tiers and the first tile of cold blocks; further cold
    tiles (``block_tiles``, see :func:`_block_tiles`) are merged in by log-sum-exp.
    Returns (out [B, Hq, q, D] float32, lse [B, Hq, q] float32, ``-inf`` where no key is seen).
    No host synchronization: every size used here is a host integer of the state.
    """
    bsz, n_q_heads, q_len, head_dim, n_kv = state.check_query(query)
    groups = n_q_heads // n_kv
    rows = groups * q_len
    device = query.device
    seq_len = int(state.seq_len)
    has_chunk = include_chunk and state.chunk_keys is not None
    tier_end = int(state.chunk_start) if state.chunk_keys is not None else seq_len
    masks = _MaskColumns(attention_mask, bsz, q_len, seq_len, tier_end, device, q_first)

    # [B, H, groups*q, D]: query heads of one KV head are consecutive (same as repeat_kv).
    qs_scaled = query.float().reshape(bsz, n_kv, rows, head_dim) * scale

    def exact_scores(keys: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = _softcap(qs_scaled @ keys.float().transpose(-1, -2), softcap)  # [B,H,R,n], a fresh tensor
        if bias is not None:
            s.view(bsz, n_kv, groups, q_len, -1).add_(bias.unsqueeze(2))
        return s

    exact: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scores [B,H,R,n], values [B,H,n,D])

    # exact tiers are cut at tier_end (host integers): their tokens from the chunk on are the chunk's
    n_land = min(state.landmark_keys.shape[2], tier_end)
    if n_land > 0:
        idx = torch.arange(n_land, device=device)
        lm_k, lm_v = state.landmark_keys[:, :, :n_land], state.landmark_values[:, :, :n_land]
        exact.append((exact_scores(lm_k, masks.shared(idx, n_land)), lm_v))

    cold = state.cold
    # blocks that start at or after the chunk are served by the chunk entirely
    n_blocks = _cold_blocks_before(state, tier_end)
    if n_blocks:
        first = state.hot_start - cold.num_blocks * cold.block_size  # host: blocks are contiguous
        cold_end = first + n_blocks * cold.block_size
        starts = cold.block_starts[:n_blocks].to(device)
        oidx = cold.outlier_index[:, :, :n_blocks]
        if oidx.shape[-1]:
            o_idx = (starts[None, None, :, None] + oidx).reshape(bsz, n_kv, -1)
            o_keys = cold.outlier_keys[:, :, :n_blocks].reshape(bsz, n_kv, -1, head_dim)
            o_vals = cold.outlier_values[:, :, :n_blocks].reshape(bsz, n_kv, -1, head_dim)
            exact.append((exact_scores(o_keys, masks.per_head(o_idx, cold_end)), o_vals))

    n_hot = min(state.hot_keys.shape[2], tier_end - state.hot_start)
    if n_hot > 0:
        idx = torch.arange(state.hot_start, state.hot_start + n_hot, device=device)
        hot_k, hot_v = state.hot_keys[:, :, :n_hot], state.hot_values[:, :, :n_hot]
        exact.append((exact_scores(hot_k, masks.shared(idx, state.hot_start + n_hot)), hot_v))

    if has_chunk:
        chunk_masks = _MaskColumns(attention_mask, bsz, q_len, seq_len, seq_len, device, q_first)
        idx = torch.arange(state.chunk_start, seq_len, device=device)
        exact.append((exact_scores(state.chunk_keys, chunk_masks.shared(idx, seq_len)), state.chunk_values))

    def cold_tile_scores(prep: _ColdPrep) -> torch.Tensor:
        """Masked scores of one tile of cold blocks, [B, H, nb, R, T]."""
        t = cold.block_size
        nb = prep.hi - prep.lo
        s = _softcap(_cold_scores(qs_scaled, prep, state), softcap)  # fresh: edited in place
        idx = (prep.starts[:, None] + torch.arange(t, device=device)).reshape(-1)
        bias = masks.shared(idx, first + prep.hi * t)  # [B|1, 1, q, nb*T] or None
        if bias is not None:
            s.view(bsz, n_kv, nb, groups, q_len, t).add_(
                bias.reshape(bias.shape[0], 1, q_len, nb, t).permute(0, 1, 3, 2, 4).unsqueeze(3)
            )
        # rows kept exact as outliers are attended through their exact copy, not here
        return s.masked_fill_(prep.is_outlier[:, :, :, None, :], _NEG_INF)

    if not exact and not block_tiles:  # nothing before the chunk (and the chunk attended elsewhere)
        out = torch.zeros(bsz, n_q_heads, q_len, head_dim, device=device)
        return out, torch.full((bsz, n_q_heads, q_len), _NEG_INF, device=device)
    tiles = [t if isinstance(t, _ColdPrep) else _prepare_cold(state, *t, rows) for t in block_tiles[:1]]
    out, lse = _softmax_part(exact, [(cold_tile_scores(p), p) for p in tiles], rows, head_dim, cold)
    for rng in block_tiles[1:]:
        prep = rng if isinstance(rng, _ColdPrep) else _prepare_cold(state, *rng, rows)
        o, s = _softmax_part([], [(cold_tile_scores(prep), prep)], rows, head_dim, cold)
        out, lse = merge_partials(out, lse, o, s)
    return out.reshape(bsz, n_q_heads, q_len, head_dim), lse.reshape(bsz, n_q_heads, q_len)


def _softmax_part(
    exact: list[tuple[torch.Tensor, torch.Tensor]],
    cold_parts: list[tuple[torch.Tensor, _ColdPrep]],
    rows: int,
    head_dim: int,
    cold: ColdBlocks | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One float32 softmax over exact tiers (scores [B,H,R,n], values) and cold tiles (scores
    [B,H,nb,R,T]); the scores become probabilities in place (they are the caller's own tensors).
    Returns (out [B, H, R, D], lse [B, H, R]); rows that see nothing: (0, -inf)."""
    some = exact[0][0] if exact else cold_parts[0][0]
    bsz, n_kv, device = some.shape[0], some.shape[1], some.device
    row_max = torch.full((bsz, n_kv, rows, 1), _NEG_INF, device=device)
    for s, _ in exact:
        row_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
    for s, _ in cold_parts:
        row_max = torch.maximum(row_max, s.amax(dim=(2, 4)).unsqueeze(-1))
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # fully masked rows: exp(-inf)=0

    denom = torch.zeros(bsz, n_kv, rows, 1, device=device)
    out = torch.zeros(bsz, n_kv, rows, head_dim, device=device)
    for s, v in exact:
        p = s.sub_(row_max).exp_()
        denom += p.sum(dim=-1, keepdim=True)
        out += p @ v.float()
    for s, prep in cold_parts:
        p = s.sub_(row_max.unsqueeze(2)).exp_()
        denom += p.sum(dim=-1).sum(dim=2).unsqueeze(-1)
        out += _cold_values(p, prep, cold.rank_values)
    seen = denom > 0
    out = torch.where(seen, out / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    lse = torch.where(seen, row_max + torch.log(denom), _NEG_INF)
    return out, lse.squeeze(-1)


# --------------------------------------------------------------------------- dense references


def _block_rows(
    coeffs: torch.Tensor,
    scales: torch.Tensor | None,
    basis: torch.Tensor | None,
    bits: int,
    rank: int,
    offsets: torch.Tensor | None = None,
):
    from spectralcache.linalg.quant import expand_col_groups  # key_group_size: [..., G, D]

    c = _coeffs_float(coeffs, bits, rank)
    rows = c.shape[-2]
    if scales is not None:
        c = c * expand_col_groups(scales, rows).float()
    if offsets is not None:
        c = c + expand_col_groups(offsets, rows).float()
    return c if basis is None else c @ basis.float()  # [B,H,nb,T,D]


def reconstruct_dense_kv(state: SpectralLayerState) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's K/V as full float32 tensors [B, H, seq_len, D], indexed by cache index.

    Test-only: this is exactly the decompression the attention path avoids. Indices
    ``>= chunk_start`` come from the chunk; the rest from landmarks, blocks (outlier rows
    replaced by their exact copies, pre-RoPE keys rotated) and the hot buffer. Raises if
    some index is covered by no tier.
    """
    bsz, n_kv, _, head_dim = state.hot_keys.shape
    seq_len = int(state.seq_len)
    device = state.hot_keys.device
    keys = torch.zeros(bsz, n_kv, seq_len, head_dim, device=device)
    values = torch.zeros_like(keys)
    covered = torch.zeros(seq_len, dtype=torch.bool, device=device)

    n_land = state.landmark_keys.shape[2]
    keys[:, :, :n_land] = state.landmark_keys.float()
    values[:, :, :n_land] = state.landmark_values.float()
    covered[:n_land] = True

    cold = state.cold
    if cold is not None and cold.num_blocks:
        k = _block_rows(
            cold.key_coeffs,
            cold.key_scales,
            cold.key_basis,
            cold.coeff_bits,
            cold.rank_keys,
            cold.key_offsets,
        )
        if state.key_space == "pre_rope":
            k = rotate_block_keys(k, cold.block_starts, state.rope_inv_freq).float()
        v = _block_rows(
            cold.value_coeffs, cold.value_scales, cold.value_basis, cold.value_bits, cold.rank_values
        )
        oi = cold.outlier_index[..., None].expand(*cold.outlier_index.shape, head_dim)
        k = k.scatter(3, oi, cold.outlier_keys.float())
        v = v.scatter(3, oi, cold.outlier_values.float())
        for n, start in enumerate(cold.block_starts.tolist()):
            keys[:, :, start : start + cold.block_size] = k[:, :, n]
            values[:, :, start : start + cold.block_size] = v[:, :, n]
            covered[start : start + cold.block_size] = True

    n_hot = state.hot_keys.shape[2]
    hs = state.hot_start
    keys[:, :, hs : hs + n_hot] = state.hot_keys.float()
    values[:, :, hs : hs + n_hot] = state.hot_values.float()
    covered[hs : hs + n_hot] = True

    if state.chunk_keys is not None:
        cs = state.chunk_start
        keys[:, :, cs:] = state.chunk_keys.float()
        values[:, :, cs:] = state.chunk_values.float()
        covered[cs:] = True
    if not bool(covered.all()):
        missing = torch.nonzero(~covered).flatten()[:8].tolist()
        raise ValueError(f"cache indices not covered by any tier, e.g. {missing}")
    return keys, values


def dense_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain softmax attention in float32 ([B, Hq, q, D] over [B, Hkv, kv, D]) with GQA by repetition.

    A ``None`` mask means causal with the queries at the last ``q`` positions. Also the
    fallback for uncompressed layers that need logit softcapping (which SDPA lacks).
    """
    _, n_q_heads, q_len, head_dim = query.shape
    n_kv, kv_len = keys.shape[1], keys.shape[2]
    groups = n_q_heads // n_kv
    k = keys.float().repeat_interleave(groups, dim=1)
    v = values.float().repeat_interleave(groups, dim=1)
    scale = head_dim**-0.5 if scaling is None else float(scaling)
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        keep = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~keep, _NEG_INF)
    else:
        m = attention_mask[..., :kv_len]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, _NEG_INF)
        else:
            scores = torch.where(m > torch.finfo(m.dtype).min / 2, scores + m.float(), _NEG_INF)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.where(denom > 0, (p @ v) / denom.clamp_min(math.ulp(0.0)), 0.0)
    return out.to(query.dtype)


def dense_reference(
    query: torch.Tensor,
    state: SpectralLayerState,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decompress the whole layer and run plain attention: what ``spectral_attention`` must equal."""
    state.check_query(query)
    keys, values = reconstruct_dense_kv(state)
    return dense_attention(query, keys, values, attention_mask, scaling=scaling, softcap=softcap)
