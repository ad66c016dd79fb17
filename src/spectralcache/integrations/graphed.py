"""Greedy decoding with a SpectralCache where each one-token forward replays a CUDA graph.

::

    cache = SpectralCache(model, "default")
    tokens = spectralcache.graphed_generate(model, input_ids, cache, max_new_tokens=64)

    # or step by step (the bench's teacher-forced decode):
    decoder = spectralcache.GraphedDecoder(model, cache, max_new_tokens=64)
    logits = decoder.prefill(input_ids)          # eager forward over the prompt
    logits = decoder.step(next_ids)              # [B, vocab]; a replay once captured

Why a step can be captured, and what runs outside it (docs/graphed_decode.md has the long form):

* **Static inputs.** ``input_ids`` [B, 1], ``position_ids`` / ``cache_position`` and every
  layer's per-step sizes live in device buffers of fixed address; before each step the host
  writes the new values into one staging buffer and copies it with **one** non-blocking
  host-to-device copy (layers x ``SIZE_FIELDS`` int32 sizes, the layers' write rows and the
  position, packed). The graph reads them; no host int of the step is baked in.
* **Cache writes at a device index.** While a step runs, each :class:`SpectralLayer` has a
  :class:`GraphSlot`; its ``update`` writes the token with ``index_copy_`` at the row the slot's
  device scalar names (``SpectralLayer._append_graph``), and attention runs the Triton decode
  kernel with device-side sizes over the layer's *capacity* (``decode_attention(...,
  device_sizes=...)``, :class:`~spectralcache.attention.triton.graph.DecodeGraphSizes`).
* **Host work between replays, eagerly.** ``SpectralLayer.graph_prepare`` compresses the block
  a token makes due (NaN check + randomized SVD: host-synchronising) *before* the step -- the
  very block the eager path compresses with that token -- and keeps the hot window at row 0 of
  a fixed-capacity buffer (compacted in place), so its address survives; cold buffers grow
  ahead by ``max_new_tokens`` worth of blocks. ``SpectralLayer.graph_advance`` moves the host
  counters. The graph is captured again only when a buffer it recorded moved (the first
  compression of a prompt shorter than a block, a cold-buffer reallocation, anything that
  reallocates -- ``crop`` into the cold tier, batch ops, ``to``); the step before a capture
  runs the same code eagerly (it compiles the kernels and warms cuBLAS).
* **Atomic steps.** The model's forward hooks (atomic forwards, bypass guard) are host
  bookkeeping that a replay would skip, so the decoder calls ``model.forward`` (hooks
  bypassed) and provides the guarantee itself: every layer is checkpointed after
  ``graph_prepare`` and before ``graph_advance``; if the step raises (Python, capture, replay),
  every layer is rolled back, so the cache is as before the step (``graph_advance`` only moves
  counters, and the write lands past every live window). The cache's own per-forward
  bookkeeping is opened and closed around each eager or capturing call as the hooks would.

* **Sliding-window layers** (Gemma 2/3: never compressed) are :class:`~spectralcache.cache.sliding.
  SlidingWindowLayer` objects: transformers' own layer, whose graphed step shifts a fixed window
  buffer in place and attends over its ``W`` rows without a mask (``cache/sliding.py`` says why that
  is exact). Until every sliding window is full (and, in a padded batch, until the padding has left
  it) steps run eagerly.

What it refuses (``ValueError`` / ``RuntimeError`` naming the problem; the cache unchanged):
full-attention layers left uncompressed and chunked-attention layers (transformers' layers grow by
concatenation: not capturable), ``hot_size == 0``, right padding, a model in training mode or not attending with
spectral attention. A left-padded batch (``attention_mask`` at :meth:`GraphedDecoder.prefill`)
decodes through a mask by cache index of fixed address (grown, and the graph captured again,
only past ``max_new_tokens``) and per-row position ids. Before the landmarks are full (prompt shorter than ``landmarks``) a step
runs the plain eager forward. Without CUDA, ``mode="auto"`` decodes with plain eager forwards
(identical to calling the model); ``mode="static"`` runs the graph-mode step *without*
capture (device-index writes, device sizes, fixed buffers -- the Triton kernel through its
interpreter on CPU), which is what the CPU tests compare with the eager path.

Logits equal the eager path's up to the attention implementation: the eager path attends a
layer whose tiers are all exact with SDPA and compressed layers with the same Triton kernel on
CUDA (the torch reference on CPU); the graphed step always uses the kernel.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["GraphSlot", "GraphedDecoder", "graphed_generate"]

MODES = ("auto", "graph", "static", "eager")


@dataclass
class GraphSlot:
    """One layer's part of a graphed step: device views into the decoder's static buffer."""

    sizes: torch.Tensor  # int32 [len(SIZE_FIELDS)]: what the kernel reads (device_sizes)
    write_row: torch.Tensor  # int64 [1]: the hot row this step's token is written to
    capacity_blocks: int
    capacity_exact: int
    # padded batches: bool [B, 1, 1, positions] by cache index (True = attend), fixed address;
    # None: no padding (the kernel applies causality by cache index itself)
    mask: torch.Tensor | None = None

    def attend(
        self, query: torch.Tensor, layer: Any, scaling: float | None, softcap: float | None
    ) -> torch.Tensor:
        """The step's attention over ``layer`` (called by the ``"spectral"`` attention function)."""
        from spectralcache.attention.triton.decode import decode_attention

        return decode_attention(
            query,
            layer.graph_state(),
            self.mask,
            scaling,
            softcap,
            device_sizes=self.sizes,
            capacity_blocks=self.capacity_blocks,
            capacity_exact=self.capacity_exact,
        )


def _layout_key(layer: Any) -> tuple:
    """What a captured step baked in about ``layer``: its buffers (held, so that an id is never
    reused while the graph lives) and whether it has cold blocks (the kernel records their
    buffers only then)."""
    if getattr(layer, "is_sliding", False):
        return layer.graph_layout()
    return (layer._hot_k, layer._hot_v, layer._lm_k, layer._lm_v, layer._cold, layer._nb > 0)


def _same_layout(a: list[tuple] | None, b: list[tuple]) -> bool:
    if a is None or len(a) != len(b):
        return False
    return all(x is y or (isinstance(x, bool) and x == y) for ka, kb in zip(a, b) for x, y in zip(ka, kb))


class GraphedDecoder:
    """Prefill eagerly, then decode one token per step from a captured CUDA graph.

    Args:
        model: a transformers causal LM (eval mode) on one CUDA device (or CPU for ``static`` /
            ``eager``) attending with spectral attention (``SpectralCache(model, ...)`` enables it).
        cache: a :class:`~spectralcache.cache.cache.SpectralCache` whose every layer is compressed.
        max_new_tokens: tokens this decoder will decode at most (cold buffers are grown ahead for
            them, so later compressions append in place and the graph is kept); 0: no reserve.
        mode: ``"auto"`` (graph on CUDA, eager elsewhere), ``"graph"``, ``"static"`` (the graph
            step without capture), ``"eager"`` (plain model forwards).

    Counters: ``captures``, ``replays``, ``static_steps``, ``eager_steps``.
    """

    def __init__(self, model: Any, cache: Any, *, max_new_tokens: int = 0, mode: str = "auto") -> None:
        from spectralcache.cache.cache import SpectralCache
        from spectralcache.cache.layer import SpectralLayer
        from spectralcache.cache.sliding import SlidingWindowLayer
        from spectralcache.integrations.compat import cache_argument

        if mode not in MODES:
            raise ValueError(f"GraphedDecoder mode must be one of {MODES}, got {mode!r}")
        if not isinstance(cache, SpectralCache):
            raise TypeError(f"GraphedDecoder needs a SpectralCache, got {type(cache).__name__}")
        others = [
            i
            for i, layer in enumerate(cache.layers)
            if type(layer) not in (SpectralLayer, SlidingWindowLayer)
        ]
        if others and mode != "eager":
            raise ValueError(
                f"GraphedDecoder: layers {others} are not compressed (transformers' own layers grow "
                "by concatenation, which a CUDA graph cannot replay); compress every full-attention "
                "layer (SpectralConfig.compress_layers=None) or use mode='eager'"
            )
        if cache.config.key_group_size is not None and mode != "eager":
            raise ValueError(
                "GraphedDecoder: SpectralConfig.key_group_size is read by the torch reference only "
                "(the decode kernel a graph replays reads one key scale row per block); use mode='eager'"
            )
        if cache.config.hot_size < 1 and mode != "eager":
            raise ValueError("GraphedDecoder: SpectralConfig.hot_size must be >= 1 (a due block must not "
                             "include the incoming token)")  # fmt: skip
        if getattr(model, "training", False):
            raise ValueError("GraphedDecoder: call model.eval() first (decoding runs in eval mode)")
        from spectralcache.integrations.transformers import is_enabled

        if mode != "eager" and not is_enabled(model):
            raise ValueError(
                "GraphedDecoder: the model does not attend with spectral attention; call "
                "spectralcache.enable(model) (SpectralCache(model, ...) does it)"
            )
        device = next(model.parameters()).device
        if mode == "auto":
            mode = "graph" if device.type == "cuda" else "eager"
        if mode == "graph" and device.type != "cuda":
            raise RuntimeError(f"GraphedDecoder mode='graph' needs the model on CUDA, it is on {device}")
        if mode in ("graph", "static"):
            from spectralcache.attention.triton.dispatch import resolve_backend, triton_available

            if resolve_backend(cache.config.attention_backend) == "torch":
                raise ValueError(
                    f"GraphedDecoder mode={mode!r} attends with the Triton decode kernel, but the torch "
                    "reference was requested (SpectralConfig.attention_backend or "
                    "$SPECTRALCACHE_ATTENTION_BACKEND); use mode='eager' for it"
                )
            if not triton_available():
                raise RuntimeError(f"GraphedDecoder mode={mode!r} needs Triton (the decode kernel)")
            if device.type != "cuda":
                from spectralcache.attention.triton.decode import interpreter_enabled

                if not interpreter_enabled():
                    raise RuntimeError(
                        "GraphedDecoder mode='static' on CPU needs TRITON_INTERPRET=1 (set before "
                        "importing spectralcache) to run the decode kernel"
                    )
        self.model, self.cache, self.mode, self.device = model, cache, mode, device
        self.max_new_tokens = int(max_new_tokens)
        self._kw = cache_argument(model)
        params = inspect.signature(type(model).forward).parameters
        self._pass_cache_position = "cache_position" in params
        self.layers: list[Any] = list(cache.layers)
        # the compressed layers carry the step's sizes; the first one also its position and batch
        self._compressed = [type(layer) is SpectralLayer for layer in self.layers]
        self._ref = next(layer for layer in self.layers if type(layer) is SpectralLayer)
        # the widest sliding window (0: none): a padded row's padding must have left it (``_unready``)
        self._widest_window = max(
            (layer.sliding_window for layer in self.layers if getattr(layer, "is_sliding", False)), default=0
        )
        self._pad_end = 0  # padded batch: cache indices below it hold padding in some row
        self.captures = self.replays = self.static_steps = self.eager_steps = 0
        self._decoded = 0
        self._batch: int | None = None
        self._graph: Any = None
        self._graph_layout: list[tuple] | None = None
        self._warm_layout: list[tuple] | None = None
        self._slots: list[GraphSlot] | None = None
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits [B, V], next ids [B, 1])
        # padded batches: the attention mask by cache index ([B, 1, 1, positions] bool, True past
        # the prompt) and each row's position id minus its cache index ([B] int64, <= 0)
        self._mask: torch.Tensor | None = None
        self._row_offset: torch.Tensor | None = None

    # ------------------------------------------------------------------ static buffers
    def _allocate(self, batch: int) -> None:
        from spectralcache.attention.triton.decode import SIZE_FIELDS

        self._batch = batch
        n, f = len(self.layers), len(SIZE_FIELDS)
        size_bytes = -(-n * f * 4 // 8) * 8  # int32 sizes, padded so the int64 part is aligned
        total = size_bytes + (n + 1) * 8  # int64: write row per layer, then the position
        self._host = torch.zeros(total, dtype=torch.uint8)
        host = self._host.numpy()
        self._host_sizes = host[: n * f * 4].view(np.int32).reshape(n, f)
        self._host_i64 = host[size_bytes:].view(np.int64)
        self._dev = torch.zeros(total, dtype=torch.uint8, device=self.device)
        self._sizes = self._dev[: n * f * 4].view(torch.int32).view(n, f)
        i64 = self._dev[size_bytes:].view(torch.int64)
        self._rows = [i64[i : i + 1] for i in range(n)]
        self._cache_position = i64[n : n + 1]
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._field = {name: i for i, name in enumerate(SIZE_FIELDS)}

    def _fill_host(self, rows: list[int]) -> None:
        """This step's sizes (what ``decode_sizes`` gives for ``graph_state()``, hot window at
        row 0 of the recorded buffer), write rows and position into the staging buffer."""
        fld, sizes = self._field, self._host_sizes
        for i, layer in enumerate(self.layers):
            if not self._compressed[i]:
                continue  # a sliding layer: its step reads no sizes
            seq = layer._seq_len
            r = sizes[i]
            r[fld["n_land"]] = layer._n_lm
            r[fld["hot_start"]] = layer._hot_start
            r[fld["n_hot"]] = layer._hot_hi - layer._hot_lo
            r[fld["chunk_start"]] = seq
            r[fld["n_chunk"]] = 0
            r[fld["q_first"]] = seq - 1
            r[fld["seq_len"]] = seq
            r[fld["tier_end"]] = seq
            r[fld["n_blocks"]] = layer._nb
            r[fld["hot_lo"]] = layer._hot_lo  # 0: graph_prepare keeps the window at row 0
        self._host_i64[: len(rows)] = rows
        self._host_i64[len(rows)] = self._ref._seq_len - 1

    def host_sizes(self) -> np.ndarray:
        """The sizes staged for the current step ``[layers, len(SIZE_FIELDS)]`` (tests compare
        them with ``DecodeGraphSizes.values``)."""
        return self._host_sizes.copy()

    def _make_slots(self) -> list[GraphSlot]:
        from spectralcache.attention.triton.graph import DecodeGraphSizes

        slots = []
        for i, layer in enumerate(self.layers):
            if not self._compressed[i]:
                # a sliding layer only needs to know it is in a graphed step
                slots.append(GraphSlot(self._sizes[i], self._rows[i], 0, 0))
                continue
            rec = DecodeGraphSizes(layer.graph_state(), q_len=1)
            slots.append(
                GraphSlot(self._sizes[i], self._rows[i], rec.capacity_blocks, rec.capacity_exact, self._mask)
            )
        return slots

    def _grow_mask(self, positions: int) -> None:
        """A padded batch's mask covers ``positions`` cache indices (new positions attend)."""
        old = self._mask
        if old is None or old.shape[-1] >= positions:
            return
        mask = torch.ones(
            old.shape[0], 1, 1, max(positions, 2 * old.shape[-1]), dtype=torch.bool, device=old.device
        )
        mask[..., : old.shape[-1]].copy_(old)
        self._mask = mask  # a new address: the layout key changes, the graph is captured again

    # ------------------------------------------------------------------ forwards
    def _call_kwargs(self) -> dict[str, Any]:
        positions = self._cache_position.view(1, 1)
        if self._row_offset is not None:  # padded rows: their positions lag the cache index
            positions = positions + self._row_offset.view(-1, 1)
        kw: dict[str, Any] = {
            "input_ids": self._ids,
            "position_ids": positions.expand(self._ids.shape[0], 1),
            "use_cache": True,
            self._kw: self.cache,
        }
        if self._pass_cache_position:
            kw["cache_position"] = self._cache_position
        return kw

    def _static_forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward (eager, or under capture): ``model.forward`` -- the hooks are host
        bookkeeping a replay would skip; the cache's per-forward bookkeeping is done here."""
        cache = self.cache
        cache._begin_forward()
        failed = True
        try:
            logits = self.model.forward(**self._call_kwargs()).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            failed = False
        finally:
            cache._end_forward(failed)
        return logits, nxt

    def _set_slots(self, slots: list[GraphSlot] | None) -> None:
        for layer, slot in zip(self.layers, slots or [None] * len(self.layers)):
            layer._graph_slot = slot

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Eager forward over the prompt (the model's own path, hooks included) into an empty
        cache; returns the last position's logits ``[B, vocab]``.

        ``attention_mask`` ``[B, T]`` (1 = token, 0 = padding; left padding, as ``generate``
        takes it): a padded batch. Position ids then count each row's tokens (``cumsum - 1``, as
        ``generate`` computes them) and every decode step attends through a mask by cache index
        of fixed address (the prompt's padding masked, every later position attended)."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if (padded or self._mask is not None) and self.cache.get_seq_length() != 0:
            raise ValueError("GraphedDecoder.prefill of a padded batch needs an empty cache (reset it first)")
        if not padded:
            self._mask = self._row_offset = None
            out = self.model(input_ids, use_cache=True, logits_to_keep=1, **{self._kw: self.cache})
            return out.logits[:, -1]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        keep = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if not bool(keep[:, -1].all()):
            raise ValueError("GraphedDecoder: padding must be on the left (every row's last token a token)")
        positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
        t = int(input_ids.shape[-1])
        self._pad_end = int((~keep).nonzero()[:, 1].max()) + 1  # a sliding window holding padding waits
        self._row_offset = positions[:, -1] - (t - 1)  # position id - cache index, per row
        self._mask = keep.view(keep.shape[0], 1, 1, t)
        self._grow_mask(t + max(self.max_new_tokens, 1) + 1)
        out = self.model(
            input_ids,
            attention_mask=keep.long(),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._kw: self.cache},
        )
        return out.logits[:, -1]

    def _eager_step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own forward for one token (mask and positions of a padded batch included)."""
        self.eager_steps += 1
        kw: dict[str, Any] = {}
        if self._mask is not None:
            seq = self.cache.get_seq_length()
            self._grow_mask(seq + 1)
            kw["attention_mask"] = self._mask[:, 0, 0, : seq + 1].long()
            kw["position_ids"] = (self._row_offset + seq).view(-1, 1)
        out = self.model(input_ids, use_cache=True, **kw, **{self._kw: self.cache})
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Decode one token per sequence: ``input_ids`` [B, 1] -> logits ``[B, vocab]``.

        In graph mode the returned tensor is the graph's static output: read or copy it before
        the next step."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"GraphedDecoder.step takes [batch, 1] token ids, got {tuple(input_ids.shape)}")
        if self.mode == "eager" or self._unready():
            # plain eager forward (e.g. landmarks not full yet): the model's own path
            self._decoded += 1
            return self._eager_step(input_ids)
        batch = int(input_ids.shape[0])
        if batch != self._ref.batch_size or (self._batch is not None and batch != self._batch):
            raise ValueError(f"GraphedDecoder: batch {batch} != the cache's batch {self._ref.batch_size}")
        if self._batch is None:
            self._allocate(batch)
        ahead = max(self.max_new_tokens - self._decoded, 1)
        for layer in self.layers:
            layer.graph_prepare(ahead)  # eager: compression, hot compaction (atomic per layer)
        if self._mask is not None:
            self._grow_mask(self._ref.get_seq_length() + ahead + 1)
        layout = [_layout_key(layer) for layer in self.layers]
        layout.append((self._mask,))
        tokens = [layer.checkpoint() for layer in self.layers]
        try:
            rows = [layer.graph_advance() for layer in self.layers]
            self._fill_host(rows)
            self._ids.copy_(input_ids, non_blocking=True)
            self._dev.copy_(self._host, non_blocking=True)  # one copy: every layer's sizes + position
            logits = self._run(layout)
        except BaseException:
            self._set_slots(None)
            for layer, token in zip(self.layers, tokens):
                layer.rollback(token)
            raise
        self._decoded += 1
        return logits

    def _unready(self) -> bool:
        """Whether the next step must run eagerly: a layer not ready (landmarks or a sliding window
        not full, ...) or, in a padded batch, padding still inside a sliding window (the graphed
        sliding step reads no mask)."""
        if any(layer.graph_unready_reason() for layer in self.layers):
            return True
        if self._mask is not None and self._widest_window:
            first_in_window = self._ref.get_seq_length() - self._widest_window + 1
            return first_in_window < self._pad_end
        return False

    def _run(self, layout: list[tuple]) -> torch.Tensor:
        if self.mode == "graph" and self._graph is not None and _same_layout(self._graph_layout, layout):
            self._graph.replay()
            self.replays += 1
            return self._outputs[0]
        self._graph = self._outputs = self._graph_layout = None  # recorded buffers may go
        slots = self._make_slots()
        self._set_slots(slots)
        try:
            if self.mode == "graph" and _same_layout(self._warm_layout, layout):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outputs = self._static_forward()
                self.captures += 1
                graph.replay()
                self.replays += 1
                self._graph, self._outputs, self._graph_layout = graph, outputs, layout
                return outputs[0]
            # the same step without capture: static mode, or the warm-up before a capture
            logits, _ = self._static_forward()
            self.static_steps += 1
            self._warm_layout = layout
            return logits
        finally:
            self._set_slots(None)

    def next_ids(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens ``[B, 1]`` for ``logits`` returned by :meth:`step` / :meth:`prefill`."""
        if self._outputs is not None and logits is self._outputs[0]:
            return self._outputs[1]  # computed inside the graph
        return logits.argmax(-1, keepdim=True)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy decoding: prefill ``input_ids`` [B, T] (left-padded rows: ``attention_mask``,
        see :meth:`prefill`), then ``max_new_tokens`` tokens.
        Returns ``[B, max_new_tokens]`` token ids (and, with ``return_logits``, each step's
        ``[B, vocab]`` logits, copied)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = self._decoded + max_new_tokens
        logits = self.prefill(input_ids, attention_mask)
        out = torch.empty(input_ids.shape[0], max_new_tokens, dtype=torch.long, device=input_ids.device)
        kept: list[torch.Tensor] = []
        nxt = logits.argmax(-1, keepdim=True)
        for i in range(max_new_tokens):
            out[:, i : i + 1].copy_(nxt)
            if return_logits:
                kept.append(logits.float().clone())
            if i == max_new_tokens - 1:
                break
            logits = self.step(nxt)
            nxt = self.next_ids(logits)
        return (out, kept) if return_logits else out


def graphed_generate(
    model: Any,
    input_ids: torch.Tensor,
    cache: Any,
    max_new_tokens: int,
    *,
    mode: str = "auto",
    attention_mask: torch.Tensor | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding of ``max_new_tokens`` tokens with ``cache``, each decode step replayed
    from a CUDA graph (see :class:`GraphedDecoder`); returns the new token ids ``[B, n]``."""
    decoder = GraphedDecoder(model, cache, max_new_tokens=max_new_tokens, mode=mode)
    return decoder.generate(
        input_ids, max_new_tokens, attention_mask=attention_mask, return_logits=return_logits
    )
