"""Outside baselines for the evaluation, as transformers ``Cache`` objects on the real model.

Two families, each compared with SpectralCache at matched measured memory:

* **KV quantization** (KIVI-style, what ``transformers.QuantizedCache`` does): the
  full-attention layers store keys and values as grouped asymmetric int4 / int2 with a
  small full-precision residual buffer of the most recent tokens.
  ``transformers.QuantizedCache`` itself refuses hybrid models: on Gemma 3 (sliding +
  full layers) its constructor raises ``ValueError("`QuantizedCache` is only supported
  for models with only full attention layers. We found the following invalid layer
  types: {'sliding_attention'}")`` (transformers 5.23, any backend). So
  :class:`QuantizedFullAttentionCache` keeps the sliding layers as transformers'
  ``DynamicSlidingWindowLayer`` (they are already bounded by the window) and puts a
  quantized layer on each full-attention layer. The quantized layer is either
  transformers' own ``HQQQuantizedLayer`` / ``QuantoQuantizedLayer`` (backend ``"hqq"`` /
  ``"quanto"``, the exact layers ``QuantizedCache`` would have used) or
  :class:`PackedQuantizedLayer` (backend ``"packed"``), our dependency-free quantizer:
  per-token groups of ``group_size`` channels, min/max asymmetric, codes bit-packed into
  ``uint8`` (two int4 or four int2 codes per byte), float16 scale and minimum per group.
  That grouping is the one quanto uses with ``axis=0`` (transformers' default).

* **StreamingLLM** (sinks + recent window): :class:`SinkWindowLayer` on the
  full-attention layers keeps the first ``n_sink`` tokens and the last ``window`` tokens.
  Eviction is *post-RoPE without re-rotation*: kept keys keep the rotation of their
  original position and new tokens are rotated at their true position, exactly like
  kvpress' ``StreamingLLMPress`` (not like transformers' removed ``SinkCache``, which
  re-rotated the kept keys to close the gap). A forward call always attends to the full
  states it was given (so a one-shot prefill is exact, like kvpress compressing after the
  prefill) and eviction happens when the call's states are stored.

Every tensor a cache holds is reachable: layers expose ``nbytes_held()`` and
:func:`cache_nbytes` sums them, so the runner can report measured bytes, not a formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    HQQQuantizedLayer,
    QuantizedCache,
    QuantizedLayer,
    QuantoQuantizedLayer,
)

from spectralcache.cache.memory import held_bytes

__all__ = [
    "QUANTIZED_CACHE_REFUSAL_PREFIX",
    "PackedGroups",
    "PackedQuantizedLayer",
    "QuantizedFullAttentionCache",
    "SinkWindowCache",
    "SinkWindowLayer",
    "baseline_factory",
    "cache_nbytes",
    "dequantize_groups",
    "layer_nbytes",
    "make_quantized_cache",
    "make_sink_window_cache",
    "pack_codes",
    "quantize_groups",
    "transformers_quantized_cache_refusal",
    "unpack_codes",
]

SUPPORTED_BITS = (2, 4)
BACKENDS = ("packed", "hqq", "quanto")
QUANTIZED_CACHE_REFUSAL_PREFIX = (
    "`QuantizedCache` is only supported for models with only full attention layers"
)


# --------------------------------------------------------------------------------------
# Bit packing and grouped quantization (the "packed" backend)
# --------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along the last dim into ``uint8``.

    Code ``j`` of each byte sits at bit offset ``j * bits`` (little end first), so a
    byte holds ``8 // bits`` codes. The last dim must be a multiple of ``8 // bits``.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    per_byte = 8 // bits
    n = codes.shape[-1]
    if n % per_byte:
        raise ValueError(f"last dim {n} is not a multiple of {per_byte} (codes per byte at {bits} bits)")
    grouped = codes.reshape(*codes.shape[:-1], n // per_byte, per_byte)
    packed = torch.zeros(grouped.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(per_byte):
        packed |= grouped[..., j] << (j * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` bytes back to one code per element."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


@dataclass
class PackedGroups:
    """Grouped asymmetric integer storage of a ``[B, H, T, D]`` tensor.

    ``data`` is ``uint8`` ``[B, H, T, D * bits / 8]`` (real packed integers, not floats
    holding integers); ``scale`` and ``minimum`` are float16 ``[B, H, T, D / group_size]``.
    Element ``x`` of group ``g`` is ``code * scale[g] + minimum[g]``.
    """

    data: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group_size: int
    head_dim: int

    @property
    def num_tokens(self) -> int:
        return int(self.data.shape[-2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.minimum))

    def map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedGroups:
        """Apply a token/batch-wise selection ``fn`` to every stored tensor.

        Groups are per token, so slicing or gathering tokens (crop, beam reorder) is
        exact on the packed form; nothing is re-quantized.
        """
        return PackedGroups(
            fn(self.data), fn(self.scale), fn(self.minimum), self.bits, self.group_size, self.head_dim
        )


def _group_size_for(head_dim: int, group_size: int, bits: int) -> int:
    g = min(group_size, head_dim)
    if g <= 0 or head_dim % g:
        raise ValueError(f"group_size {group_size} must divide head_dim {head_dim}")
    if head_dim % (8 // bits):
        raise ValueError(f"head_dim {head_dim} must be a multiple of {8 // bits} to pack {bits}-bit codes")
    return g


def quantize_groups(x: torch.Tensor, bits: int, group_size: int) -> PackedGroups:
    """Quantize ``x`` ``[..., T, D]`` per token in groups of ``group_size`` channels.

    Scale and minimum are rounded to float16 *before* the codes are computed, so that the
    stored metadata reproduces exactly the grid the codes were chosen on.
    """
    _check_bits(bits)
    if x.dim() < 2:
        raise ValueError(f"expected a [..., T, D] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    head_dim = int(x.shape[-1])
    g = _group_size_for(head_dim, group_size, bits)
    levels = (1 << bits) - 1
    xg = x.float().reshape(*x.shape[:-1], head_dim // g, g)
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
    minimum = lo.to(torch.float16)
    scale = ((hi - minimum.float()) / levels).to(torch.float16)
    # A constant group (or one whose range underflows float16) has no usable step: all codes 0.
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(lo))
    codes = torch.round((xg - minimum.float().unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, levels)
    codes = codes.to(torch.uint8).reshape(*x.shape[:-1], head_dim)
    return PackedGroups(pack_codes(codes, bits), scale, minimum, bits, g, head_dim)


def dequantize_groups(q: PackedGroups, dtype: torch.dtype) -> torch.Tensor:
    """Reconstruct ``[..., T, D]`` in ``dtype`` from :class:`PackedGroups`."""
    codes = unpack_codes(q.data, q.bits).float()
    codes = codes.reshape(*codes.shape[:-1], q.head_dim // q.group_size, q.group_size)
    x = codes * q.scale.float().unsqueeze(-1) + q.minimum.float().unsqueeze(-1)
    return x.reshape(*x.shape[:-2], q.head_dim).to(dtype)


def _cat_packed(a: PackedGroups | None, b: PackedGroups) -> PackedGroups:
    if a is None or a.num_tokens == 0:
        return b
    return PackedGroups(
        torch.cat([a.data, b.data], dim=-2),
        torch.cat([a.scale, b.scale], dim=-2),
        torch.cat([a.minimum, b.minimum], dim=-2),
        a.bits,
        a.group_size,
        a.head_dim,
    )


# --------------------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------------------


def _tensor_nbytes(obj: Any, seen: set[int]) -> int:
    """Bytes of every tensor reachable from ``obj`` (subclass tensors are unwrapped).

    quanto's quantized tensors are wrapper subclasses whose real storage lives in inner
    tensors named by ``__tensor_flatten__``; HQQ keeps a packed ``uint8`` tensor plus a
    dict of metadata tensors. Each storage is counted once.
    """
    if obj is None:
        return 0
    if isinstance(obj, PackedGroups):
        return obj.nbytes()
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_nbytes(getattr(obj, n), seen) for n in names)
        key = id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_nbytes(v, seen) for v in obj)
    return 0


def layer_nbytes(layer: Any) -> int:
    """Bytes of one cache layer's data (quantized storage, residuals, windows).

    Layers of this module measure themselves with ``nbytes_held`` (held storages, via
    :func:`spectralcache.cache.memory.held_bytes`). For transformers' own layers this counts
    the tensors' elements, not the storage a view pins (a ``DynamicSlidingWindowLayer`` keeps
    a view of its last full concatenation, so what it holds depends on the call history); the
    eval runner's measured bytes use ``methods.kv_bytes_by_layer`` (held storages) instead."""
    if hasattr(layer, "nbytes_held"):
        return int(layer.nbytes_held())
    seen: set[int] = set()
    total = _tensor_nbytes(getattr(layer, "keys", None), seen)
    total += _tensor_nbytes(getattr(layer, "values", None), seen)
    total += _tensor_nbytes(getattr(layer, "_quantized_keys", None), seen)
    total += _tensor_nbytes(getattr(layer, "_quantized_values", None), seen)
    return total


def cache_nbytes(cache: Cache) -> dict[str, int]:
    """Measured KV bytes of a cache: total, full-attention layers, sliding layers."""
    full = sliding = 0
    for layer in cache.layers:
        n = layer_nbytes(layer)
        if getattr(layer, "is_sliding", False):
            sliding += n
        else:
            full += n
    return {"total": full + sliding, "full_attention": full, "sliding": sliding}


# --------------------------------------------------------------------------------------
# Quantized full-attention layers
# --------------------------------------------------------------------------------------


class PackedQuantizedLayer(QuantizedLayer):
    """transformers' ``QuantizedLayer`` protocol with our packed int4/int2 storage.

    Same residual scheme as transformers: the first call quantizes everything it gets;
    later tokens collect in a full-precision residual buffer and are flushed into the
    quantized store when it would reach ``residual_length``. Because groups are per
    token, a flush quantizes only the residual and appends it (transformers re-quantizes
    the whole history, which with per-token groups yields the same codes).
    """

    def __init__(self, nbits: int = 4, q_group_size: int = 64, residual_length: int = 128):
        _check_bits(nbits)
        if q_group_size <= 0:
            raise ValueError(f"q_group_size must be positive, got {q_group_size}")
        if residual_length < 1:
            raise ValueError(f"residual_length must be >= 1, got {residual_length}")
        super().__init__(
            nbits=nbits,
            axis_key=-1,
            axis_value=-1,
            q_group_size=q_group_size,
            residual_length=residual_length,
        )

    def _quantize(self, tensor: torch.Tensor, axis: int = -1) -> PackedGroups:
        return quantize_groups(tensor, self.nbits, self.q_group_size)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # transformers >= 5.2x no longer records the dtype on the layer; dequantization needs it.
        self.dtype = key_states.dtype

    def _dequantize(self, q_tensor: PackedGroups) -> torch.Tensor:
        return dequantize_groups(q_tensor, self.dtype)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"key/value shapes differ: {tuple(key_states.shape)} vs {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            # Validate before touching any state so bad input leaves the layer empty.
            _group_size_for(int(key_states.shape[-1]), self.q_group_size, self.nbits)
            self.lazy_initialization(key_states, value_states)
            self._quantized_keys = self._quantize(key_states.contiguous())
            self._quantized_values = self._quantize(value_states.contiguous())
            self.cumulative_length += key_states.shape[-2]
            return key_states, value_states

        dequant_keys = self._dequantize(self._quantized_keys)
        dequant_values = self._dequantize(self._quantized_values)
        keys_to_return = torch.cat([dequant_keys, self.keys, key_states], dim=-2)
        values_to_return = torch.cat([dequant_values, self.values, value_states], dim=-2)
        residual_keys = torch.cat([self.keys, key_states], dim=-2)
        residual_values = torch.cat([self.values, value_states], dim=-2)
        if residual_keys.shape[-2] >= self.residual_length:
            self._quantized_keys = _cat_packed(
                self._quantized_keys, self._quantize(residual_keys.contiguous())
            )
            self._quantized_values = _cat_packed(
                self._quantized_values, self._quantize(residual_values.contiguous())
            )
            # Fresh empty tensors, not views: a view would keep the residual's storage alive.
            self.keys = residual_keys.new_empty((*residual_keys.shape[:-2], 0, residual_keys.shape[-1]))
            self.values = residual_values.new_empty(
                (*residual_values.shape[:-2], 0, residual_values.shape[-1])
            )
        else:
            self.keys, self.values = residual_keys, residual_values
        self.cumulative_length += key_states.shape[-2]
        return keys_to_return, values_to_return

    def _map_storage(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._quantized_keys is not None:
            self._quantized_keys = self._quantized_keys.map_tokens(fn)
            self._quantized_values = self._quantized_values.map_tokens(fn)
        if self.keys is not None and self.keys.dim() == 4:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_storage(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_storage(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_storage(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = abs(int(tokens_to_remove))
        if n == 0 or not self.is_initialized:
            return
        if n > self.cumulative_length:
            raise ValueError(f"cannot crop {n} tokens from a layer holding {self.cumulative_length}")
        residual = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        from_residual = min(n, residual)
        # .clone(): a sliced view would keep the cropped tokens' storage allocated.
        if from_residual:
            self.keys = self.keys[..., : residual - from_residual, :].clone()
            self.values = self.values[..., : residual - from_residual, :].clone()
        rest = n - from_residual
        if rest:
            keep = self._quantized_keys.num_tokens - rest
            self._quantized_keys = self._quantized_keys.map_tokens(lambda t: t[..., :keep, :].clone())
            self._quantized_values = self._quantized_values.map_tokens(lambda t: t[..., :keep, :].clone())
        self.cumulative_length -= n

    def nbytes_held(self) -> int:
        return held_bytes(self._quantized_keys, self._quantized_values, self.keys, self.values)


def transformers_quantized_cache_refusal(config: Any, backend: str = "hqq", nbits: int = 4) -> str | None:
    """Try ``transformers.QuantizedCache`` on ``config``; return its refusal text, or None.

    Used to record, per run, the exact reason the stock cache cannot be used.
    """
    try:
        QuantizedCache(backend=backend, config=config, nbits=nbits)
    except (ValueError, ImportError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _quantized_layer(backend: str, nbits: int, q_group_size: int, residual_length: int) -> QuantizedLayer:
    if backend == "packed":
        return PackedQuantizedLayer(nbits=nbits, q_group_size=q_group_size, residual_length=residual_length)
    # transformers' layers: axis 0 and group size as QuantizedCache's defaults use them.
    cls = {"hqq": HQQQuantizedLayer, "quanto": QuantoQuantizedLayer}[backend]
    return cls(
        nbits=nbits, axis_key=0, axis_value=0, q_group_size=q_group_size, residual_length=residual_length
    )


class QuantizedFullAttentionCache(DynamicCache):
    """``DynamicCache`` whose full-attention layers are quantized; sliding layers untouched.

    ``refusal`` holds the exact error ``transformers.QuantizedCache`` raised for this model
    (None when the model has only full-attention layers and the stock cache would work).
    """

    def __init__(
        self,
        config: Any,
        nbits: int = 4,
        q_group_size: int = 64,
        residual_length: int = 128,
        backend: str = "packed",
    ):
        _check_bits(nbits)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(config=config)
        self.backend = backend
        self.nbits = nbits
        self.refusal = transformers_quantized_cache_refusal(config, backend="hqq", nbits=nbits)
        if self.refusal is not None and not self.refusal.startswith("ValueError"):
            self.refusal = None  # only a missing optional backend; the layer types are fine
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:
                self.layers[i] = _quantized_layer(backend, nbits, q_group_size, residual_length)
            elif not isinstance(layer, DynamicSlidingWindowLayer):
                raise ValueError(f"layer {i}: unsupported cache layer type {type(layer).__name__}")

    def nbytes_held(self) -> int:
        return cache_nbytes(self)["total"]


# --------------------------------------------------------------------------------------
# StreamingLLM: attention sinks + recent window
# --------------------------------------------------------------------------------------


class SinkWindowLayer(DynamicLayer):
    """Full-attention layer keeping ``n_sink`` first tokens + the last ``window`` tokens.

    ``get_seq_length`` reports every token seen (so positions and RoPE stay the true
    ones), while ``get_mask_sizes`` reports what is stored, with an offset that aligns the
    stored recent tokens with their true positions; the sinks then sit at earlier
    positions, which every later query sees anyway, so the causal mask is unchanged.
    """

    is_croppable = False

    def __init__(self, n_sink: int = 4, window: int = 1024):
        super().__init__()
        if n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {n_sink}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.n_sink = int(n_sink)
        self.window = int(window)
        self.cumulative_length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"key/value shapes differ: {tuple(key_states.shape)} vs {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        full_keys = torch.cat([self.keys, key_states], dim=-2)
        full_values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        # The sinks are the first tokens ever seen: they are the head of the stored tensor
        # as long as at least n_sink tokens have been stored.
        capacity = self.n_sink + self.window
        if full_keys.shape[-2] > capacity:
            self.keys = torch.cat(
                [full_keys[..., : self.n_sink, :], full_keys[..., -self.window :, :]], dim=-2
            )
            self.values = torch.cat(
                [full_values[..., : self.n_sink, :], full_values[..., -self.window :, :]], dim=-2
            )
        else:
            self.keys, self.values = full_keys, full_values
        return full_keys, full_values

    def stored_length(self) -> int:
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        return int(self.keys.shape[-2])

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkWindowLayer evicts tokens and cannot be cropped back")

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def nbytes_held(self) -> int:
        if not self.is_initialized:
            return 0
        return held_bytes(self.keys, self.values)


class SinkWindowCache(DynamicCache):
    """``DynamicCache`` whose full-attention layers are :class:`SinkWindowLayer`."""

    def __init__(self, config: Any, n_sink: int = 4, window: int = 1024):
        super().__init__(config=config)
        self.n_sink, self.window = n_sink, window
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:
                self.layers[i] = SinkWindowLayer(n_sink=n_sink, window=window)
            elif not isinstance(layer, DynamicSlidingWindowLayer):
                raise ValueError(f"layer {i}: unsupported cache layer type {type(layer).__name__}")

    def nbytes_held(self) -> int:
        return cache_nbytes(self)["total"]


# --------------------------------------------------------------------------------------
# Factories for the runner
# --------------------------------------------------------------------------------------


def _config_of(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"expected a transformers model with a .config, got {type(model).__name__}")
    return config


def make_quantized_cache(
    model: Any, nbits: int = 4, q_group_size: int = 64, residual_length: int = 128, backend: str = "packed"
) -> Cache:
    """transformers' ``QuantizedCache`` where the model allows it, else the hybrid cache.

    With backend ``"packed"`` the hybrid cache is used for every model (one quantizer
    for all comparisons); with ``"hqq"``/``"quanto"`` the stock ``QuantizedCache`` is
    returned for full-attention-only models.
    """
    config = _config_of(model)
    if backend in ("hqq", "quanto") and transformers_quantized_cache_refusal(config, backend, nbits) is None:
        return QuantizedCache(
            backend=backend,
            config=config,
            nbits=nbits,
            q_group_size=q_group_size,
            residual_length=residual_length,
        )
    return QuantizedFullAttentionCache(
        config, nbits=nbits, q_group_size=q_group_size, residual_length=residual_length, backend=backend
    )


def make_sink_window_cache(model: Any, n_sink: int = 4, window: int = 1024) -> Cache:
    """StreamingLLM-style cache (sinks + recent window) on the full-attention layers."""
    return SinkWindowCache(_config_of(model), n_sink=n_sink, window=window)


def baseline_factory(spec: str) -> Callable[[Any], Cache]:
    """Parse a method spec into ``make_cache(model) -> Cache``.

    Specs: ``kivi-int4`` / ``kivi-int2`` (packed backend), ``kivi-int4-hqq``,
    ``kivi-int2-quanto``, optional ``-g<group>-r<residual>`` suffixes; ``sinks-w<W>``
    optionally ``-s<n_sink>`` (default 4 sinks). Examples: ``kivi-int4``,
    ``kivi-int2-hqq-g64-r128``, ``sinks-w512``, ``sinks-w816-s4``.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"baseline spec must be a non-empty string, got {spec!r}")
    parts = spec.lower().split("-")
    head, rest = parts[0], parts[1:]
    if head == "kivi":
        if not rest or rest[0] not in ("int4", "int2"):
            raise ValueError(f"{spec!r}: expected kivi-int4 or kivi-int2")
        nbits = int(rest[0][3:])
        backend, group, residual = "packed", 64, 128
        for p in rest[1:]:
            if p in BACKENDS:
                backend = p
            elif p[:1] == "g" and p[1:].isdigit():
                group = int(p[1:])
            elif p[:1] == "r" and p[1:].isdigit():
                residual = int(p[1:])
            else:
                raise ValueError(f"{spec!r}: unknown option {p!r}")
        return lambda model: make_quantized_cache(
            model, nbits=nbits, q_group_size=group, residual_length=residual, backend=backend
        )
    if head == "sinks":
        window, n_sink = None, 4
        for p in rest:
            if p[:1] == "w" and p[1:].isdigit():
                window = int(p[1:])
            elif p[:1] == "s" and p[1:].isdigit():
                n_sink = int(p[1:])
            else:
                raise ValueError(f"{spec!r}: unknown option {p!r}")
        if window is None:
            raise ValueError(f"{spec!r}: a window is required, e.g. sinks-w512")
        return lambda model: make_sink_window_cache(model, n_sink=n_sink, window=window)
    raise ValueError(f"unknown baseline {spec!r}; expected kivi-int4|kivi-int2[...] or sinks-w<W>[-s<n>]")
