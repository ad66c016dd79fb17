"""The compressed state of one cache layer, as the attention function reads it.

This is the contract between ``cache/`` (which writes it) and ``attention/`` (which
reads it). Everything is a plain tensor, batch first, KV heads only (GQA heads are
never repeated). Cache indices count tokens in the order they entered the cache
(0 = first token ever stored, padding included); they are what the attention mask's
last dimension indexes.

Tiers, in cache-index order::

    landmarks [0, L) | cold blocks [L, L + nb*T) | hot buffer [hot_start, seq_len)

Within each cold block, ``outliers_per_block`` tokens are kept exact; their low-rank
rows must be ignored by attention (they are attended through the exact copy).

Shapes (B batch, H KV heads, D head_dim, T block size, nb blocks, rk/rv ranks,
o outliers per block, L landmarks stored so far, h hot tokens):

- ``landmark_keys`` / ``landmark_values``: [B, H, L, D], model dtype, post-RoPE.
- ``ColdBlocks.key_coeffs``: [B, H, nb, T, rk] int8 (coeff_bits=8); uint8 packed
  [B, H, nb, T, ceil(rk/2)] (coeff_bits=4, two values per byte as ``linalg/quant.py``
  packs them); model dtype (coeff_bits=16).
- ``ColdBlocks.key_scales``: [B, H, nb, T, 1] float16, per-row scale (None when 16 bits);
  coefficient row t of block n is ``key_coeffs[..., n, t, :] * key_scales[..., n, t, :]``.
  With ``key_codec="channel"`` it is [B, H, nb, 1, D] instead, one scale per channel of the
  block, and row t is ``key_coeffs[..., n, t, :] * key_scales[..., n, 0, :]`` (the same
  broadcast; ``ColdBlocks.key_scales_per_channel`` tells them apart: per-row scales always end
  in 1). A reader that applies a per-row scale after the dot product must decode such rows first.
  With ``key_group_size`` it is [B, H, nb, G, D]: G groups of ``L = ceil(T / G)`` rows (the last
  one shorter), row t scaled by ``key_scales[..., n, t // L, :]`` (``quant.expand_col_groups``);
  ``key_offsets`` likewise. The torch reference reads any G; the Triton decode kernel G = 1 only
  (it refuses other states).
- ``ColdBlocks.key_offsets``: ``None``, or with ``key_zero_point`` (``key_codec="channel"``
  only) [B, H, nb, 1, D] float32, one zero point per channel of the block: row t of block n is
  then ``key_coeffs[..., n, t, :] * key_scales[..., n, 0, :] + key_offsets[..., n, 0, :]``, and the
  4-bit integers span [-8, 7] (int8: [-128, 127]). A post-RoPE reader adds ``q·key_offsets[n]`` to
  every score of block n; a pre-RoPE reader adds the offsets to the rebuilt rows before rotating.
- ``ColdBlocks.key_basis``: [B, H, nb, rk, D] (storage dtype: ``SpectralConfig.basis_dtype``);
  the block's keys are ``coeffs @ basis``. ``None`` means the identity basis
  (``key_codec="identity"``): then ``rk == D`` and the (scaled) coefficient rows *are* the keys.
- values likewise with rv, stored with ``value_bits`` (= ``value_coeff_bits``, or
  ``coeff_bits`` when that is None). Values always stay latent in attention: ``(p @ C_V) @ B_V``,
  or just ``p @ C_V`` when ``value_basis`` is None.
- ``ColdBlocks.outlier_keys`` / ``outlier_values``: [B, H, nb, o, D] exact, model dtype,
  post-RoPE.
- ``ColdBlocks.outlier_index``: [B, H, nb, o] int64, index inside the block (0..T-1), sorted.
- ``ColdBlocks.value_scales_flag_outliers`` (stop 24): when True, ``value_scales`` is per row and holds
  -1 at every outlier row (``compress_blocks`` writes it; the compressed row there is never read), every
  other row's scale >= 0: a reader may find the outlier rows of a tile from the scales it loads anyway
  (the Triton decode kernel's OUT_FLAG) instead of from ``outlier_index``. False (synthetic states, 16-bit
  values): the scales carry no flag.
- ``ColdBlocks.block_starts``: [nb] int64 on the cache's device, cache index of each block's
  first token. ``ColdBlocks.num_blocks`` is a host int (from the shape: no device sync).
- ``hot_keys`` / ``hot_values``: [B, H, h, D] exact, model dtype, post-RoPE; cache indices
  ``hot_start .. hot_start + h - 1``.
- ``chunk_keys`` / ``chunk_values`` (may be None): [B, H, q, D] exact K/V of the tokens added by
  the *current* forward call (cache indices ``chunk_start .. seq_len - 1``), the very tensors
  ``update`` was given. They are kept only until this layer's attention has run, so that a
  prefill chunk attends to itself exactly while earlier chunks are read compressed. Attention
  uses the tiers for cache indices < ``chunk_start`` and the chunk for the rest.
- ``rope_inv_freq``: [rot_dim / 2] float32 on the cache's device (``pre_rope`` only, else None).
- ``seq_len``, ``hot_start``, ``chunk_start``, ``layer_idx``: host ints; ``key_space``: str.

Views and strides: the layer keeps every tier in preallocated capacity buffers (the cold tier
``[B, H, capacity, ...]``, grown geometrically; the hot buffer ``[B, H, capacity, D]`` with a
live window; the landmarks ``[B, H, landmarks, D]``), and the state's tensors are *views* of
them (e.g. ``key_coeffs = buffer[:, :, :nb]``, ``hot_keys = buffer[:, :, lo:hi]``). The shapes
are exactly as above, but only the innermost two dims are guaranteed dense -- row-major, except
``value_coeffs`` of packed int4 identity rows (the default preset's values), stored
tokens-contiguous since stop 21: memory ``[B, H, capacity, D/2, T_row]``, the ``[..., T, D/2]``
tensor a transposed view of its first ``T`` columns (``stride(-2) == 1``; ``T_row`` = ``T`` rounded up
to a multiple of 16 since stop 22, so each row starts 16-byte aligned whatever the block length;
``cache.layer.stores_values_tokens_contiguous`` says when), and, in that layout, ``value_scales``, whose
blocks start ``T_row`` tokens apart since stop 23 (memory ``[B, H, capacity, T_row, 1]``, the padding zero:
``cache.layer.padded_token_rows``). Readers (torch reference, Triton kernels) must use strides and must not assume
``.is_contiguous()``.
A state is a snapshot: it stays valid until the layer's next ``update`` (which only writes
past the views' ends, or into fresh buffers) and is invalidated by ``crop`` / batch ops.

``key_space == "pre_rope"`` means the cold blocks' low-rank keys are un-rotated; the
attention function re-rotates the reconstructed tile before scoring with
``cache.rope.rotate_block_keys(keys, block_starts, rope_inv_freq)``: rotate-half ("NeoX")
layout over the leading ``rot_dim = 2 * len(rope_inv_freq)`` dims, angle
``float32(cache_index) * rope_inv_freq``, keys rotated by R(+angle). Every exact tier (landmarks,
outliers, hot, chunk) is always stored post-RoPE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ColdBlocks", "SpectralLayerState"]


@dataclass
class ColdBlocks:
    key_coeffs: torch.Tensor
    key_scales: torch.Tensor | None
    key_basis: torch.Tensor | None  # None = identity basis (rank_keys == head_dim)
    value_coeffs: torch.Tensor
    value_scales: torch.Tensor | None
    value_basis: torch.Tensor | None  # None = identity basis (rank_values == head_dim)
    outlier_keys: torch.Tensor
    outlier_values: torch.Tensor
    outlier_index: torch.Tensor
    block_starts: torch.Tensor
    block_size: int
    coeff_bits: int
    rank_keys: int
    rank_values: int
    # storage width of the value coefficients when it differs from coeff_bits (None: the same)
    value_coeff_bits: int | None = None
    key_offsets: torch.Tensor | None = None  # per-channel zero points (key_zero_point), else None
    # value_scales hold -1 at the outlier rows (every other scale >= 0): see the module docstring
    value_scales_flag_outliers: bool = False

    @property
    def value_bits(self) -> int:
        return self.coeff_bits if self.value_coeff_bits is None else self.value_coeff_bits

    @property
    def key_scales_per_channel(self) -> bool:
        """Whether ``key_scales`` holds one scale per channel (``[..., nb, 1, D]``,
        ``key_codec="channel"``) rather than one per row (``[..., nb, T, 1]``)."""
        return self.key_scales is not None and self.key_scales.shape[-1] != 1

    @property
    def num_blocks(self) -> int:
        # numel() is metadata: no device synchronization
        return int(self.block_starts.numel())

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        """Names of the tensor fields (the one list, derived from the dataclass itself)."""
        return tuple(f.name for f in dataclasses.fields(cls) if "Tensor" in str(f.type))

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The tensor fields by name (``None`` for an identity codec's basis / 16-bit scales)."""
        return {name: getattr(self, name) for name in self.tensor_fields()}

    def map_tensors(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> ColdBlocks:
        """A copy with ``fn(name, tensor)`` applied to every tensor field that is not None."""
        return dataclasses.replace(
            self, **{name: None if t is None else fn(name, t) for name, t in self.tensors().items()}
        )

    def blocks(self, lo: int, hi: int) -> ColdBlocks:
        """Views of blocks ``lo:hi`` (layout ``[B, H, nb, ...]``, ``block_starts [nb]``)."""
        return self.map_tensors(lambda name, t: t[lo:hi] if name == "block_starts" else t[:, :, lo:hi])


@dataclass
class SpectralLayerState:
    layer_idx: int
    seq_len: int
    landmark_keys: torch.Tensor
    landmark_values: torch.Tensor
    cold: ColdBlocks | None
    hot_keys: torch.Tensor
    hot_values: torch.Tensor
    hot_start: int
    chunk_keys: torch.Tensor | None
    chunk_values: torch.Tensor | None
    chunk_start: int
    key_space: str
    # pre_rope only: the model's RoPE inverse frequencies, [rot_dim / 2] float32 on the cache's
    # device (rotation: see the module docstring and ``cache.rope.rotate_block_keys``).
    rope_inv_freq: torch.Tensor | None = None

    def check_query(self, query: torch.Tensor) -> tuple[int, int, int, int, int]:
        """Check ``query [B, Hq, q, D]`` against this state (what every reader needs to hold);
        returns ``(B, Hq, q, D, H_kv)``. Readers add their own limits (dtypes, row counts)."""
        if query.dim() != 4:
            raise ValueError(f"query must be [batch, heads, q_len, head_dim], got shape {tuple(query.shape)}")
        if not query.is_floating_point():
            raise TypeError(f"query must be a floating tensor, got {query.dtype}")
        bsz, n_q_heads, q_len, head_dim = query.shape
        if self.hot_keys.dim() != 4:
            raise ValueError(f"state.hot_keys must be [B, H, h, D], got shape {tuple(self.hot_keys.shape)}")
        kb, n_kv, _, kd = self.hot_keys.shape
        if kb != bsz:
            raise ValueError(f"query batch {bsz} does not match the cached batch {kb}")
        if kd != head_dim:
            raise ValueError(f"query head_dim {head_dim} does not match the cached head_dim {kd}")
        if n_q_heads % n_kv:
            raise ValueError(f"{n_q_heads} query heads are not a multiple of {n_kv} KV heads")
        if self.key_space not in ("pre_rope", "post_rope"):
            raise ValueError(f"unknown key_space {self.key_space!r}")
        if self.cold is not None and self.key_space == "pre_rope" and self.rope_inv_freq is None:
            raise ValueError(
                "pre_rope cold blocks need state.rope_inv_freq (the model's RoPE inverse frequencies)"
            )
        return bsz, n_q_heads, q_len, head_dim, n_kv
