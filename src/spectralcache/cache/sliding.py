"""The sliding-window layer of a SpectralCache: transformers' own, plus a graphed decode step.

Sliding-window layers (Gemma 2/3, Mistral-style) are never compressed: they hold at most
``sliding_window - 1`` tokens. :class:`SlidingWindowLayer` *is* transformers'
``DynamicSlidingWindowLayer`` -- every eager call (update, masks, crop, batch ops) is the
inherited one, bit-identical -- and adds what :class:`~spectralcache.GraphedDecoder` needs to
replay a decode step from a CUDA graph, which the inherited update (a new ``torch.cat`` each
step) cannot be:

* **A fixed window buffer.** ``graph_prepare`` gives the layer two buffers ``[B, H, W, D]``
  (``W = sliding_window``) whose rows ``1..W-1`` hold the last ``W - 1`` tokens in order, and
  makes ``keys`` / ``values`` those views -- the very tensors the inherited update would hold,
  so eager calls go on from them unchanged.
* **The graphed write.** While ``_graph_slot`` is set, ``update`` shifts each buffer left by one
  row in place (``roll`` + ``copy_``: device ops, no host value baked in) and writes the token to
  the last row; attention then reads the ``W`` rows = the ``W - 1`` previous tokens and this one,
  in order -- what the inherited update returns for a full window.
* **Why no mask is read.** transformers builds the sliding mask from the cache index on the
  device and the window's offset as a host int; a replay would keep the offset of the capture
  step and mask live keys. With a full window and one query token every one of the ``W`` rows is
  in the window and at or before the query, so the graphed step attends with no mask (the
  attention function recognises the step's keys: :meth:`pending_chunk_keys`). A window that is
  not full yet is not graphed (``graph_unready_reason``): the decoder runs those steps eagerly.
* **Atomic steps.** ``checkpoint`` snapshots the attributes and counts the in-place shifts that
  ran eagerly (capture records them without running them); ``rollback`` shifts back as many
  rows -- the rows ``1..W-1`` return exactly, row 0 is never read -- and restores the attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

__all__ = ["SlidingCheckpoint", "SlidingWindowLayer"]


@dataclass(frozen=True)
class SlidingCheckpoint:
    layer: SlidingWindowLayer
    attrs: dict[str, Any]
    shifts: int


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class SlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' ``DynamicSlidingWindowLayer`` whose one-token decode step can also run inside
    a captured CUDA graph (module docstring)."""

    # set by GraphedDecoder for the duration of a graphed step (any non-None object)
    _graph_slot: Any = None
    # never registered in transformers' layer-type mapping (a subclass naming a type would be)
    _layer_type = None

    def __init__(self, sliding_window: int, **kwargs: Any) -> None:
        super().__init__(sliding_window=sliding_window, **kwargs)
        self._window_k: torch.Tensor | None = None
        self._window_v: torch.Tensor | None = None
        self._shifts = 0  # in-place shifts run eagerly so far (rollback undoes the newer ones)
        self._pending: torch.Tensor | None = None  # the graphed step's keys until attention read them

    # ------------------------------------------------------------------ eager
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._graph_slot is None:
            return super().update(key_states, value_states, *args, **kwargs)
        return self._update_graph(key_states, value_states)

    # ------------------------------------------------------------------ atomic forwards
    def checkpoint(self) -> SlidingCheckpoint:
        """The attributes (references: the inherited update replaces tensors, never writes into
        them) and the count of in-place shifts, which :meth:`rollback` undoes."""
        return SlidingCheckpoint(self, dict(vars(self)), self._shifts)

    def rollback(self, token: SlidingCheckpoint) -> None:
        if not isinstance(token, SlidingCheckpoint) or token.layer is not self:
            raise ValueError("SlidingWindowLayer.rollback needs a checkpoint taken on this layer")
        undo = self._shifts - token.shifts
        if undo < 0:
            raise RuntimeError("SlidingWindowLayer: this checkpoint is newer than the layer's state")
        if undo:
            # shifting right by `undo` rows puts rows 1..W-1 back; row 0 (never read) keeps a newer token
            for buf in (self._window_k, self._window_v):
                buf.copy_(buf.roll(undo, dims=-2))
        self.__dict__.clear()
        self.__dict__.update(token.attrs)

    # ------------------------------------------------------------------ graphed decoding
    def graph_unready_reason(self) -> str | None:
        """Why the next decode token cannot go through a graphed step (None: it can)."""
        w = self.sliding_window
        if not self.is_initialized or self.cumulative_length == 0:
            return "the layer is empty (prefill first)"
        if getattr(self, "record_past", False):  # transformers >= 5.2x
            return "it records past states for a crop (assisted decoding)"
        if self.cumulative_length < w - 1:
            return f"its sliding window is not full yet ({self.cumulative_length} of {w - 1} tokens)"
        if self.keys.shape[-2] != w - 1:
            return f"it holds {self.keys.shape[-2]} tokens, not the window's {w - 1}"
        return None

    def graph_prepare(self, tokens_ahead: int = 0) -> None:
        """Make ``keys`` / ``values`` rows ``1..W-1`` of the fixed window buffers (eager; a copy
        only when an eager call replaced them since, e.g. the prefill or an eager step)."""
        reason = self.graph_unready_reason()
        if reason is not None:
            raise RuntimeError(f"sliding layer: not ready for a graphed decode step: {reason}")
        k, v = self.keys, self.values
        b, h, _, d = k.shape
        want = (b, h, self.sliding_window, d)
        if self._window_k is None or tuple(self._window_k.shape) != want or not _same_kind(self._window_k, k):
            # fresh buffers (a checkpoint keeps references to the old ones)
            self._window_k = k.new_empty(want)
            self._window_v = v.new_empty(want)
        wk, wv = self._window_k, self._window_v
        if not (_is_rows_from_one(k, wk) and _is_rows_from_one(v, wv)):
            wk[:, :, 1:].copy_(k)
            wv[:, :, 1:].copy_(v)
            self.keys, self.values = wk[:, :, 1:], wv[:, :, 1:]

    def graph_advance(self) -> int:
        """Host counters of one graphed decode token (after :meth:`graph_prepare`)."""
        if self._window_k is None or not _is_rows_from_one(self.keys, self._window_k):
            raise RuntimeError("sliding layer: graph_advance without graph_prepare")
        self.cumulative_length += 1
        return 0

    def graph_layout(self) -> tuple:
        """The buffers a captured step baked in (held, so an id is never reused while it lives)."""
        return (self._window_k, self._window_v)

    def _update_graph(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-2] != 1:
            raise RuntimeError(
                f"sliding layer: a graphed decode step takes one token, got {key_states.shape[-2]}"
            )
        for buf, new in ((self._window_k, key_states), (self._window_v, value_states)):
            buf.copy_(buf.roll(-1, dims=-2))
            buf[:, :, -1:].copy_(new)
        if not _capturing():
            self._shifts += 1
        self._pending = self._window_k
        return self._window_k, self._window_v

    # the attention function's handshake (attention/interface.py): the graphed step's keys
    @property
    def has_pending_chunk(self) -> bool:
        return self._pending is not None

    @property
    def pending_chunk_keys(self) -> torch.Tensor | None:
        return self._pending

    def release_chunk(self) -> None:
        self._pending = None


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device


def _is_rows_from_one(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``view`` is ``buf[:, :, 1:]``."""
    return (
        view.data_ptr() == buf[:, :, 1:].data_ptr()
        and view.shape == buf[:, :, 1:].shape
        and view.stride() == buf.stride()
    )
