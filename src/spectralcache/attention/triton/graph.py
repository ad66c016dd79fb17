"""Replay one layer's decode attention from a CUDA graph across decode steps.

A launch of :func:`decode_attention` bakes in the addresses of every state tensor and, in its
normal mode, the per-step sizes (sequence length, hot-window length, block count...). With
``device_sizes`` the kernel reads the sizes from a small int32 device tensor instead, and the
grid covers the layer's *capacity* (programs past the live blocks / tokens write empty
partials), so a captured graph stays valid while the layer only appends in place:

* new tokens written after the hot window (the layer's decode path), blocks appended into the
  cold buffers' spare capacity, the hot window's start advancing after a compression: the
  same buffers, new sizes -> :meth:`DecodeGraphSizes.update` writes them, then replay;
* any buffer reallocated (cold capacity grown, hot buffer compacted -- every
  ``SpectralLayer.hot_slack`` decode steps with the default slack --, ``crop``, batch ops, ``to``),
  a different chunk tensor (the query / chunk / output must be the graph's static tensors), or
  sizes beyond the recorded capacity: :meth:`update` raises :class:`StaleDecodeGraph`; recapture.

Usage::

    sizes = DecodeGraphSizes(state, q_len=1)          # records addresses and capacity
    sizes.update(state)
    decode_attention(q, state, out=out, **sizes.launch_kwargs())      # compile outside capture
    with torch.cuda.graph(g):
        decode_attention(q, state, out=out, **sizes.launch_kwargs())
    ...                                                # next step: layer.update(k_static, v_static)
    sizes.update(layer.state()); g.replay()
"""

from __future__ import annotations

import torch

from spectralcache.attention.triton.decode import SIZE_FIELDS, decode_sizes
from spectralcache.cache.state import ColdBlocks, SpectralLayerState

__all__ = ["DecodeGraphSizes", "StaleDecodeGraph"]


class StaleDecodeGraph(ValueError):
    """The state no longer fits the recorded launch (a buffer moved, or capacity ran out)."""


def _rows_from(x: torch.Tensor) -> int:
    """Rows (dim 2) a ``[B, H, rows, ...]`` capacity buffer holds from ``x``'s first row on
    (the layer's buffers are contiguous, so a head spans ``stride(1) // stride(2)`` rows)."""
    per_head = x.stride(1) // x.stride(2) if x.stride(2) else x.shape[2]
    return per_head - (x.storage_offset() % max(x.stride(1), 1)) // max(x.stride(2), 1)


def _sig(x: torch.Tensor | None) -> tuple | None:
    return None if x is None or x.numel() == 0 else (x.data_ptr(), x.stride(), x.dtype)


class DecodeGraphSizes:
    """Device-side per-step sizes of one layer's decode attention, and the layout they apply to.

    ``capacity_blocks`` / ``capacity_exact`` default to what the state's buffers hold from the
    recorded addresses on: the cold buffers' block capacity, and landmarks + hot rows + the
    chunk. ``tensor`` is the int32 ``[len(SIZE_FIELDS)]`` tensor the kernel reads."""

    def __init__(
        self,
        state: SpectralLayerState,
        q_len: int,
        *,
        capacity_blocks: int | None = None,
        capacity_exact: int | None = None,
    ) -> None:
        self.q_len = int(q_len)
        device = state.hot_keys.device
        self.tensor = torch.zeros(len(SIZE_FIELDS), dtype=torch.int32, device=device)
        cold = state.cold
        if capacity_blocks is None:
            capacity_blocks = 0
            if cold is not None and cold.num_blocks:
                starts = cold.block_starts
                capacity_blocks = (
                    starts.untyped_storage().nbytes() // starts.element_size() - starts.storage_offset()
                )
        self._hot_rows = _rows_from(state.hot_keys)
        land_rows = _rows_from(state.landmark_keys) if state.landmark_keys.numel() else 0
        n_chunk = 0 if state.chunk_keys is None else int(state.chunk_keys.shape[2])
        if capacity_exact is None:
            capacity_exact = land_rows + self._hot_rows + n_chunk
        self.capacity_blocks = int(capacity_blocks)
        self.capacity_exact = int(capacity_exact)
        self._land_rows = land_rows
        self._hot_ptr = state.hot_keys.data_ptr()
        self._hot_v_ptr = state.hot_values.data_ptr()
        self._row_bytes = state.hot_keys.stride(2) * state.hot_keys.element_size()
        self._fixed = self._fixed_layout(state)

    @staticmethod
    def _fixed_layout(state: SpectralLayerState) -> tuple:
        """Addresses, strides and dtypes the launch bakes in, apart from the hot window's start."""
        cold = state.cold
        cold_sig: tuple = ()
        if cold is not None and cold.num_blocks:
            cold_sig = (
                tuple(_sig(getattr(cold, name)) for name in ColdBlocks.tensor_fields()),
                cold.block_size, cold.coeff_bits, cold.value_bits, cold.rank_keys, cold.rank_values,
            )  # fmt: skip
        return (
            cold_sig,
            _sig(state.landmark_keys),
            _sig(state.landmark_values),
            state.hot_keys.stride(),
            state.hot_values.stride(),
            state.hot_keys.dtype,
            _sig(state.chunk_keys),
            _sig(state.chunk_values),
            state.key_space,
            _sig(state.rope_inv_freq),
        )

    def launch_kwargs(self) -> dict:
        """Keyword arguments of ``decode_attention`` for the recorded launch."""
        return {
            "device_sizes": self.tensor,
            "capacity_blocks": self.capacity_blocks,
            "capacity_exact": self.capacity_exact,
        }

    def values(self, state: SpectralLayerState) -> list[int]:
        """The sizes of ``state`` for the recorded launch; :class:`StaleDecodeGraph` if it does not fit."""
        if self._fixed_layout(state) != self._fixed:
            raise StaleDecodeGraph(
                "a state buffer moved or changed layout since the launch was recorded "
                "(cold / landmark / chunk addresses, strides or dtypes): recapture"
            )
        delta = state.hot_keys.data_ptr() - self._hot_ptr
        if (
            delta < 0
            or delta % self._row_bytes
            or (state.hot_values.data_ptr() - self._hot_v_ptr != delta and state.hot_values.numel())
        ):
            raise StaleDecodeGraph("the hot buffer moved since the launch was recorded: recapture")
        hot_lo = delta // self._row_bytes if state.hot_keys.numel() else 0
        vals = decode_sizes(state, self.q_len, hot_lo)
        size = dict(zip(SIZE_FIELDS, vals))
        n_exact = size["n_land"] + size["n_hot"] + size["n_chunk"]
        if (
            size["n_blocks"] > self.capacity_blocks
            or n_exact > self.capacity_exact
            or hot_lo + size["n_hot"] > self._hot_rows
            or size["n_land"] > self._land_rows
        ):
            raise StaleDecodeGraph(
                f"state ({size['n_blocks']} blocks, {n_exact} exact tokens, hot rows "
                f"{hot_lo}..{hot_lo + size['n_hot']}) exceeds the recorded capacity "
                f"({self.capacity_blocks} blocks, {self.capacity_exact} exact, {self._hot_rows} hot rows): "
                "recapture"
            )
        return vals

    def update(self, state: SpectralLayerState) -> None:
        """Write ``state``'s sizes into :attr:`tensor` (stream-ordered; no host synchronization)."""
        host = torch.tensor(self.values(state), dtype=torch.int32)
        # pageable host -> device, non_blocking: staged at once, so the host tensor may go
        self.tensor.copy_(host, non_blocking=self.tensor.is_cuda)
