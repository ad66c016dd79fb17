"""``SpectralLayer``: one compressed decoder layer's cache (landmarks | cold blocks | hot buffer).

Token flow: the first ``landmarks`` tokens ever cached go to the landmark tier (exact, never
compressed); later tokens enter the hot buffer. Whenever the hot buffer holds at least
``hot_size + block_size`` tokens, its oldest ``n * block_size`` tokens (as many whole blocks as
possible while ``hot_size`` stay hot) are compressed in one batched call and appended to the
cold tier, whose tensors are stacked ``[B, H, nb, ...]`` so attention never loops over blocks.

The current call's exact K/V (the "chunk") are kept only until this layer's attention has run:
the attention function calls :meth:`SpectralLayer.release_chunk`; the next ``update``,
``crop`` or ``reset`` drops it anyway.

``update`` returns the exact chunk ``(key_states, value_states)`` it was given, *not* the whole
cache: the spectral attention reads :meth:`state` instead. A stock attention function handed
these tensors would see only the new tokens; with a mask sized by :meth:`get_mask_sizes`
(``seq_len + q``) SDPA then fails on the shape mismatch instead of silently attending to a
truncated context.

All stored tensors are compact (contiguous, own storage), so ``untyped_storage().nbytes()`` is
the data actually held (see ``SpectralCache.memory_report``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from spectralcache.cache.block import CompressedBlocks, compress_blocks, reconstruct
from spectralcache.cache.rope import RopeRotator
from spectralcache.cache.state import ColdBlocks, SpectralLayerState
from spectralcache.config import SpectralConfig

__all__ = ["SpectralLayer"]

_COLD_FIELDS = (
    "key_coeffs",
    "key_scales",
    "key_basis",
    "value_coeffs",
    "value_scales",
    "value_basis",
    "outlier_keys",
    "outlier_values",
    "outlier_index",
)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SpectralLayer(CacheLayerMixin):
    """Compressed cache of one full-attention layer (KV heads only; GQA heads never repeated)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        config: SpectralConfig,
        layer_idx: int = 0,
        *,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        rotator: RopeRotator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, SpectralConfig):
            raise TypeError(f"SpectralLayer needs a SpectralConfig, got {type(config).__name__}")
        if config.key_space == "pre_rope" and rotator is None:
            raise ValueError(
                "key_space='pre_rope' needs a RopeRotator (built from the model's rotary embedding)"
            )
        if head_dim is not None:
            config.check_ranks(head_dim)
        self.config = config
        self.layer_idx = layer_idx
        self.expected_head_dim = head_dim
        self.expected_kv_heads = num_kv_heads
        self.rotator = rotator
        # stats: (blocks compressed, seconds) per compression call
        self.compression_calls: list[tuple[int, float]] = []
        self._clear()

    # ------------------------------------------------------------------ bookkeeping
    def _clear(self) -> None:
        self.keys = None
        self.values = None
        self.is_initialized = False
        self._seq_len = 0
        self._lm_k: torch.Tensor | None = None
        self._lm_v: torch.Tensor | None = None
        self._cold: dict[str, torch.Tensor | None] | None = None
        self._block_starts: torch.Tensor | None = None
        self._hot_k: torch.Tensor | None = None
        self._hot_v: torch.Tensor | None = None
        self._hot_start = 0
        self._chunk_k: torch.Tensor | None = None
        self._chunk_v: torch.Tensor | None = None
        self._chunk_start = 0

    def __repr__(self) -> str:
        return (
            f"SpectralLayer(layer_idx={self.layer_idx}, seq_len={self._seq_len}, "
            f"blocks={self.num_blocks}, hot={self.hot_len})"
        )

    @property
    def num_blocks(self) -> int:
        return 0 if self._block_starts is None else int(self._block_starts.numel())

    @property
    def hot_len(self) -> int:
        return 0 if self._hot_k is None else int(self._hot_k.shape[-2])

    @property
    def num_landmarks(self) -> int:
        return 0 if self._lm_k is None else int(self._lm_k.shape[-2])

    @property
    def ranks(self) -> tuple[int, int]:
        if self.head_dim is None:
            raise RuntimeError("layer not initialized")
        return self.config.ranks_for(self.head_dim)

    @property
    def pending_chunk_keys(self) -> torch.Tensor | None:
        """The key tensor the last ``update`` returned, until ``release_chunk``."""
        return self._chunk_k

    @property
    def has_pending_chunk(self) -> bool:
        """True between ``update`` and ``release_chunk`` (i.e. while attention may still read it)."""
        return self._chunk_k is not None

    # ------------------------------------------------------------------ validation
    def _validate(self, key_states: Any, value_states: Any) -> None:
        for name, x in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"layer {self.layer_idx}: {name} must be a torch.Tensor, got {type(x).__name__}"
                )
            if x.ndim != 4:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} must be [batch, kv_heads, tokens, head_dim], "
                    f"got shape {tuple(x.shape)}"
                )
            if x.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"layer {self.layer_idx}: {name} has unsupported dtype {x.dtype}")
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"layer {self.layer_idx}: key_states {tuple(key_states.shape)} and value_states "
                f"{tuple(value_states.shape)} must have the same shape"
            )
        if key_states.dtype != value_states.dtype:
            raise ValueError(
                f"layer {self.layer_idx}: key_states dtype {key_states.dtype} != value_states dtype {value_states.dtype}"
            )
        if key_states.device != value_states.device:
            raise ValueError(f"layer {self.layer_idx}: key_states and value_states are on different devices")
        b, h, _, d = key_states.shape
        if self.expected_head_dim is not None and d != self.expected_head_dim:
            raise ValueError(
                f"layer {self.layer_idx}: head_dim {d} != the model's head_dim {self.expected_head_dim}"
            )
        if self.expected_kv_heads is not None and h != self.expected_kv_heads:
            raise ValueError(
                f"layer {self.layer_idx}: {h} heads given but the model has {self.expected_kv_heads} KV heads "
                "(pass KV heads only, never GQA-repeated heads)"
            )
        if self.is_initialized:
            if d != self.head_dim or h != self.num_kv_heads:
                raise ValueError(
                    f"layer {self.layer_idx}: got [.., {h} heads, .., head_dim {d}] but the cache holds "
                    f"{self.num_kv_heads} heads of head_dim {self.head_dim}"
                )
            if self._seq_len > 0 and b != self.batch_size:
                raise ValueError(f"layer {self.layer_idx}: batch {b} != cached batch {self.batch_size}")
            if key_states.dtype != self.dtype:
                raise ValueError(
                    f"layer {self.layer_idx}: dtype {key_states.dtype} != cached dtype {self.dtype}"
                )
            if key_states.device != self.device:
                raise ValueError(
                    f"layer {self.layer_idx}: device {key_states.device} != cached device {self.device}"
                )
        if d < 2:
            raise ValueError(f"layer {self.layer_idx}: head_dim must be >= 2, got {d}")
        rk, rv = self.config.ranks_for(d)
        if max(rk, rv) > d:
            raise ValueError(f"layer {self.layer_idx}: ranks ({rk}, {rv}) exceed head_dim {d}")
        # one host sync for both tensors
        if not bool(torch.isfinite(key_states).all() & torch.isfinite(value_states).all()):
            raise ValueError(
                f"layer {self.layer_idx}: key/value states contain NaN or inf; the cache was not changed"
            )

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_kv_heads, _, self.head_dim = key_states.shape
        empty = key_states.new_zeros(self.batch_size, self.num_kv_heads, 0, self.head_dim)
        self._lm_k, self._lm_v = empty, empty.clone()
        self._hot_k, self._hot_v = empty.clone(), empty.clone()
        self._hot_start = 0
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, q, D]`` post-RoPE keys / values; compress whole blocks when due.

        Validates first (NaN/inf, shapes, heads, batch, dtype, device) and computes every new
        tier before assigning any of them, so a failure leaves the cache unchanged.
        Returns the exact chunk (the given tensors); attention reads :meth:`state`.
        """
        self._validate(key_states, value_states)
        if not self.is_initialized or self._seq_len == 0:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        cfg = self.config
        start = self._seq_len

        # landmarks
        n_lm = min(max(cfg.landmarks - self.num_landmarks, 0), q)
        lm_k, lm_v = self._lm_k, self._lm_v
        if n_lm:
            lm_k = torch.cat([lm_k, key_states[:, :, :n_lm]], dim=-2)
            lm_v = torch.cat([lm_v, value_states[:, :, :n_lm]], dim=-2)
        hot_k = torch.cat([self._hot_k, key_states[:, :, n_lm:]], dim=-2)
        hot_v = torch.cat([self._hot_v, value_states[:, :, n_lm:]], dim=-2)
        # Invariant: landmarks [0, L') | blocks [L', L' + nb*T) | hot; hot only holds tokens once
        # the landmarks are full, so the hot buffer starts right after the last block.
        hot_start = lm_k.shape[-2] + self.num_blocks * cfg.block_size

        cold, starts = self._cold, self._block_starts
        t = cfg.block_size
        n_new = (hot_k.shape[-2] - cfg.hot_size) // t if hot_k.shape[-2] >= cfg.hot_size + t else 0
        if n_new > 0:
            blocks = self._compress(hot_k[:, :, : n_new * t], hot_v[:, :, : n_new * t], hot_start)
            new_starts = hot_start + t * torch.arange(n_new, device=hot_k.device, dtype=torch.int64)
            cold, starts = self._append_blocks(blocks, new_starts)
            hot_k = hot_k[:, :, n_new * t :].clone()
            hot_v = hot_v[:, :, n_new * t :].clone()
            hot_start += n_new * t

        # commit (nothing above mutated self)
        self._lm_k, self._lm_v = lm_k, lm_v
        self._hot_k, self._hot_v = hot_k, hot_v
        self._hot_start = hot_start
        self._cold, self._block_starts = cold, starts
        self._chunk_k, self._chunk_v = key_states, value_states
        self._chunk_start = start
        self._seq_len = start + q
        return key_states, value_states

    def release_chunk(self) -> None:
        """Drop the current call's exact K/V (called by attention once it has run)."""
        self._chunk_k = self._chunk_v = None

    def get_seq_length(self) -> int:
        return self._seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask indexes cache indices 0 .. seq_len + q - 1 (every token ever cached).
        return self._seq_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def offload(self) -> None:
        self._map_batch_tensors(lambda x: x.to("cpu", non_blocking=True), include_starts=True)

    def prefetch(self) -> None:
        if self.is_initialized:
            device = self.device
            self._map_batch_tensors(lambda x: x.to(device, non_blocking=True), include_starts=True)

    # ------------------------------------------------------------------ batch ops
    def _map_batch_tensors(self, fn, include_starts: bool = False) -> None:
        """Apply ``fn`` to every batch-first tensor (building all results before assigning)."""
        if not self.is_initialized:
            return
        new: dict[str, Any] = {}
        for name in ("_lm_k", "_lm_v", "_hot_k", "_hot_v", "_chunk_k", "_chunk_v"):
            x = getattr(self, name)
            new[name] = None if x is None else fn(x)
        cold = None
        if self._cold is not None:
            cold = {k: None if v is None else fn(v) for k, v in self._cold.items()}
        starts = self._block_starts
        if include_starts and starts is not None:
            starts = fn(starts)
        for name, value in new.items():
            setattr(self, name, value)
        self._cold = cold
        self._block_starts = starts

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized and self._seq_len > 0:
            idx = beam_idx.to(self.device)
            self._map_batch_tensors(lambda x: x.index_select(0, idx))
            self.batch_size = int(self._hot_k.shape[0])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self._seq_len > 0:
            self._map_batch_tensors(lambda x: x.repeat_interleave(repeats, dim=0))
            self.batch_size = int(self._hot_k.shape[0])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._seq_len > 0:
            if isinstance(indices, torch.Tensor):
                indices = indices.to(self.device)
            self._map_batch_tensors(lambda x: x[indices, ...].contiguous())
            self.batch_size = int(self._hot_k.shape[0])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative int, as ``DynamicLayer``).

        Tokens in the hot buffer or landmarks are sliced off. Cropping into the cold tier drops
        every block that reaches past the new length; the kept head of a partially cropped block
        is put back into the hot buffer as its *reconstruction* (outliers exact, the rest from the
        low-rank representation, re-rotated for pre-RoPE), so no exact copy is pretended. Those
        tokens are compressed again when the hot buffer next fills.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as for DynamicLayer"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.release_chunk()
        new_len = max(self._seq_len + tokens_to_remove, 0)
        t = self.config.block_size
        if new_len >= self._hot_start:
            keep = new_len - self._hot_start
            hot_k, hot_v = self._hot_k[:, :, :keep].clone(), self._hot_v[:, :, :keep].clone()
            lm_k, lm_v = self._lm_k, self._lm_v
            cold, starts, hot_start = self._cold, self._block_starts, self._hot_start
        elif self.num_blocks and new_len >= int(self._block_starts[0]):
            first_block = int(self._block_starts[0])
            n_keep = (new_len - first_block) // t  # whole blocks kept
            partial = new_len - first_block - n_keep * t
            hot_start = first_block + n_keep * t
            empty = self._hot_k[:, :, :0].clone()
            hot_k, hot_v = empty, empty.clone()
            if partial:
                block = self._block_as_compressed(n_keep, n_keep + 1)
                rotate = self._rotate_fn(self._block_starts[n_keep : n_keep + 1])
                rec_k, rec_v = reconstruct(block, rotate)  # [B,H,1,T,D]
                hot_k = rec_k[:, :, 0, :partial].to(self.dtype).contiguous()
                hot_v = rec_v[:, :, 0, :partial].to(self.dtype).contiguous()
            cold, starts = self._slice_blocks(n_keep)
            lm_k, lm_v = self._lm_k, self._lm_v
        else:
            lm_k = self._lm_k[:, :, :new_len].clone()
            lm_v = self._lm_v[:, :, :new_len].clone()
            empty = self._hot_k[:, :, :0].clone()
            hot_k, hot_v = empty, empty.clone()
            cold, starts, hot_start = None, None, lm_k.shape[-2]
        self._lm_k, self._lm_v = lm_k, lm_v
        self._hot_k, self._hot_v = hot_k, hot_v
        self._cold, self._block_starts = cold, starts
        self._hot_start = hot_start
        self._seq_len = new_len

    # ------------------------------------------------------------------ compression
    def _rotate_fn(self, block_starts: torch.Tensor):
        if self.config.key_space != "pre_rope":
            return None
        rotator = self.rotator
        return lambda keys: rotator.rotate_block_keys(keys, block_starts)

    def _compress(self, keys: torch.Tensor, values: torch.Tensor, first_index: int) -> CompressedBlocks:
        """Compress ``[B, H, n*T, D]`` tokens starting at cache index ``first_index``."""
        b, h, n_tok, d = keys.shape
        t = self.config.block_size
        nb = n_tok // t
        kb = keys.reshape(b, h, nb, t, d)
        vb = values.reshape(b, h, nb, t, d)
        fit_keys = kb
        if self.config.key_space == "pre_rope":
            positions = first_index + torch.arange(n_tok, device=keys.device, dtype=torch.int64)
            fit_keys = self.rotator.unrotate(keys.float(), positions).reshape(b, h, nb, t, d)
        rk, rv = self.config.ranks_for(d)
        sync = keys.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(keys.device)
        t0 = time.perf_counter()
        blocks = compress_blocks(fit_keys, vb, self.config, rk, rv, exact_keys=kb)
        if sync:
            torch.cuda.synchronize(keys.device)
        self.compression_calls.append((nb, time.perf_counter() - t0))
        return blocks

    def _append_blocks(
        self, blocks: CompressedBlocks, new_starts: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
        fresh = blocks.tensors()
        if self._cold is None:
            cold = {k: None if v is None else v.contiguous() for k, v in fresh.items()}
            return cold, new_starts
        cold = {}
        for k in _COLD_FIELDS:
            old, new = self._cold[k], fresh[k]
            cold[k] = None if old is None else torch.cat([old, new], dim=2)
        return cold, torch.cat([self._block_starts, new_starts])

    def _slice_blocks(self, n_keep: int) -> tuple[dict[str, torch.Tensor | None] | None, torch.Tensor | None]:
        if n_keep == 0:
            return None, None
        cold = {k: None if v is None else v[:, :, :n_keep].clone() for k, v in self._cold.items()}
        return cold, self._block_starts[:n_keep].clone()

    def _block_as_compressed(self, lo: int = 0, hi: int | None = None) -> CompressedBlocks:
        rk, rv = self.ranks
        c = self._cold
        sl = slice(lo, hi)
        return CompressedBlocks(
            **{k: None if c[k] is None else c[k][:, :, sl] for k in _COLD_FIELDS},
            coeff_bits=self.config.coeff_bits,
            rank_keys=rk,
            rank_values=rv,
            value_coeff_bits=self.config.value_coeff_bits,
        )

    # ------------------------------------------------------------------ state
    def state(self) -> SpectralLayerState:
        """The compressed state as the attention function reads it (see ``cache/state.py``)."""
        if not self.is_initialized:
            raise RuntimeError(f"layer {self.layer_idx}: state() before the first update")
        cold = None
        if self._cold is not None:
            rk, rv = self.ranks
            c = self._cold
            cold = ColdBlocks(
                key_coeffs=c["key_coeffs"],
                key_scales=c["key_scales"],
                key_basis=c["key_basis"],
                value_coeffs=c["value_coeffs"],
                value_scales=c["value_scales"],
                value_basis=c["value_basis"],
                outlier_keys=c["outlier_keys"],
                outlier_values=c["outlier_values"],
                outlier_index=c["outlier_index"],
                block_starts=self._block_starts,
                block_size=self.config.block_size,
                coeff_bits=self.config.coeff_bits,
                rank_keys=rk,
                rank_values=rv,
                value_coeff_bits=self.config.value_coeff_bits,
            )
        rotate = None
        if self.config.key_space == "pre_rope":
            rotate = self.rotator.rotate_block_keys
        return SpectralLayerState(
            layer_idx=self.layer_idx,
            seq_len=self._seq_len,
            landmark_keys=self._lm_k,
            landmark_values=self._lm_v,
            cold=cold,
            hot_keys=self._hot_k,
            hot_values=self._hot_v,
            hot_start=self._hot_start,
            chunk_keys=self._chunk_k,
            chunk_values=self._chunk_v,
            chunk_start=self._chunk_start if self._chunk_k is not None else self._seq_len,
            key_space=self.config.key_space,
            rotate_block_keys=rotate,
        )

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference decode of every cached token, ``[B, H, seq_len, D]`` in cache-index order
        (landmarks, cold blocks with outliers exact, hot). For tests and debugging only."""
        if not self.is_initialized:
            raise RuntimeError(f"layer {self.layer_idx}: reconstruct() before the first update")
        ks = [self._lm_k.to(dtype)]
        vs = [self._lm_v.to(dtype)]
        if self._cold is not None:
            block = self._block_as_compressed()
            rk_, rv_ = reconstruct(block, self._rotate_fn(self._block_starts), dtype)
            b, h, nb, t, d = rk_.shape
            ks.append(rk_.reshape(b, h, nb * t, d))
            vs.append(rv_.reshape(b, h, nb * t, d))
        ks.append(self._hot_k.to(dtype))
        vs.append(self._hot_v.to(dtype))
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    # ------------------------------------------------------------------ memory
    def tier_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensors held per tier (for ``memory_report``)."""
        tiers: dict[str, list[torch.Tensor]] = {
            "landmarks": [],
            "coefficients": [],
            "scales": [],
            "bases": [],
            "outliers": [],
            "outlier_index": [],
            "block_starts": [],
            "hot": [],
            "chunk": [],
        }
        if not self.is_initialized:
            return tiers
        tiers["landmarks"] = [self._lm_k, self._lm_v]
        tiers["hot"] = [self._hot_k, self._hot_v]
        if self._chunk_k is not None:
            tiers["chunk"] = [self._chunk_k, self._chunk_v]
        if self._cold is not None:
            c = self._cold
            tiers["coefficients"] = [c["key_coeffs"], c["value_coeffs"]]
            tiers["scales"] = [x for x in (c["key_scales"], c["value_scales"]) if x is not None]
            # an identity codec stores no basis (None)
            tiers["bases"] = [x for x in (c["key_basis"], c["value_basis"]) if x is not None]
            tiers["outliers"] = [c["outlier_keys"], c["outlier_values"]]
            tiers["outlier_index"] = [c["outlier_index"]]
            tiers["block_starts"] = [self._block_starts]
        return tiers
