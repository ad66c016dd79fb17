"""The ``"spectral"`` attention implementation, as transformers' ``AttentionInterface`` calls it.

Handshake with the cache. ``SpectralCache.update`` returns, for a compressed layer, fresh
:class:`SpectralOnlyTensor` objects (sharing the chunk's memory) and registers the key one with
:func:`register_chunk`. The attention function finds the layer to read with :func:`lookup` on the
very ``key`` tensor it was handed, through a mapping keyed by that object's identity and held
weakly (an entry dies with its tensor): a layer of another cache, a stale layer (its chunk already
read, or a newer ``update`` since) or a layer of a cache updated in another thread is never found
for these K/V. Nothing is global per thread.

A compressed layer is read through its ``SpectralLayerState``: when every tier is exact (nothing
compressed yet, or lossless identity codecs), with the very SDPA call ``DynamicCache`` would make on
the concatenated exact K/V (bit-identical outputs in any dtype); otherwise with
:func:`spectral_attention`. Everything else (sliding-window layers, layers the config leaves
uncompressed, calls without a SpectralCache) takes transformers' own SDPA path, so switching a
model to ``"spectral"`` changes nothing for those layers.

Any other reader of a compressed layer's K/V (a model whose attention is not ``"spectral"``:
never enabled, ``disable()``d, an unpickled cache in a new process) would attend over the new
tokens only. :class:`SpectralOnlyTensor` refuses every tensor operation except metadata reads, so
such a read raises a clear error -- after rolling the cache back to its state before the forward
-- instead of returning wrong logits. An error raised by spectral attention itself (refused
options, bad shapes) rolls the cache back the same way.

The matching mask function is transformers' SDPA mask: a bool ``[B, 1, q, kv_len]``
mask indexed by cache index, or None where SDPA would use ``is_causal`` (then the
spectral path applies causality by cache index itself). Sliding-window layers thus get
exactly the mask SDPA would get.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from spectralcache.attention.reference import dense_attention
from spectralcache.attention.triton.dispatch import attend

__all__ = [
    "ATTENTION_NAME",
    "SpectralOnlyTensor",
    "lookup",
    "register",
    "register_chunk",
    "spectral_attention_forward",
    "spectral_mask",
    "spectral_only",
]

ATTENTION_NAME = "spectral"


# ---------------------------------------------------------------------------- cache <-> attention
class _Chunk(NamedTuple):
    tensor: weakref.ref  # the registered tensor (what ``update`` returned); its death drops the entry
    layer: weakref.ref  # the layer whose ``update`` returned it
    pending: weakref.ref | None  # the layer's pending chunk at registration (stale once it changes)
    abort: Callable[[], None] | None  # rolls the owning cache back to before the current forward


# id(tensor) -> entry. Keyed by identity (a tensor's ``==`` is elementwise, so tensors cannot be
# dict keys through weakref.WeakKeyDictionary); the weakref callback removes the entry when the
# tensor is freed, and lookups check that the referent is still the very object asked about.
_CHUNKS: dict[int, _Chunk] = {}
# layer -> its latest registration: an older tensor of the same layer is stale even if the layer's
# pending chunk happens to be the same object again (a caller re-using its input tensor)
_LATEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weak_callable(fn: Callable[[], None] | None) -> Callable[[], None] | None:
    if fn is None:
        return None
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        ref = weakref.WeakMethod(fn)

        def call() -> None:
            target = ref()
            if target is not None:
                target()

        return call
    return fn


def register_chunk(key: torch.Tensor, layer: Any, abort: Callable[[], None] | None = None) -> None:
    """Map ``key`` (the tensor a compressed layer's ``update`` returned) to ``layer``.

    The entry lives as long as ``key`` does and is valid while ``layer`` still holds the chunk
    it held at registration (``layer.pending_chunk_keys``). ``abort`` (held weakly when it is a
    bound method) is called before an error leaves the attention of this layer, so that the
    owning cache can roll back every layer this forward has changed.
    """
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"register_chunk needs the key tensor update returned, got {type(key).__name__}")
    tid = id(key)

    def forget(ref: weakref.ref, tid: int = tid) -> None:
        entry = _CHUNKS.get(tid)
        if entry is not None and entry.tensor is ref:
            _CHUNKS.pop(tid, None)

    pending = getattr(layer, "pending_chunk_keys", None)
    entry = _Chunk(
        weakref.ref(key, forget),
        weakref.ref(layer),
        None if pending is None else weakref.ref(pending),
        _weak_callable(abort),
    )
    _CHUNKS[tid] = entry
    _LATEST[layer] = entry


def _entry(key: Any) -> _Chunk | None:
    entry = _CHUNKS.get(id(key))
    if entry is None or entry.tensor() is not key:
        return None
    return entry


def lookup(key: Any) -> Any:
    """The compressed layer whose ``update`` returned ``key`` and has not been read since, or None.

    None for any tensor not returned by a SpectralCache ``update`` (uncompressed layers, other
    caches), once the layer's attention has run (``release_chunk``), after a newer ``update``,
    ``crop`` or ``reset`` of that layer, or once the layer is gone.
    """
    entry = _entry(key)
    if entry is None:
        return None
    layer = entry.layer()
    if layer is None or not getattr(layer, "has_pending_chunk", False) or _LATEST.get(layer) is not entry:
        return None
    pending = None if entry.pending is None else entry.pending()
    if pending is None or layer.pending_chunk_keys is not pending:
        return None
    return layer


def _abort(key: Any) -> None:
    entry = _entry(key)
    if entry is not None and entry.abort is not None:
        entry.abort()


# Metadata a stock attention function or a model may read from K/V without reading their values.
_METADATA_READS = frozenset(
    [
        getattr(torch.Tensor, name).__get__
        for name in (
            "shape",
            "dtype",
            "device",
            "ndim",
            "is_cuda",
            "is_cpu",
            "is_meta",
            "layout",
            "requires_grad",
            "is_sparse",
            "is_quantized",
            "is_nested",
        )
    ]
    + [
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.element_size,
        torch.Tensor.__repr__,
        torch.Tensor.__format__,
        torch.Tensor.__hash__,  # id-based, as for any tensor
        torch.Tensor.__len__,
        torch.Tensor.is_contiguous,
        torch.Tensor.stride,
        # never data_ptr: a kernel handed these tensors would read the new tokens only
    ]
)


class SpectralOnlyTensor(torch.Tensor):
    """The K/V a compressed layer's ``update`` returns: readable by spectral attention only.

    It shares the new tokens' memory, but a compressed layer's context is its state, not these
    tensors: any attention function other than the registered ``"spectral"`` one would attend
    over the new tokens alone. Every tensor operation except metadata reads (shape, dtype,
    device, ...) therefore rolls the owning cache back to its state before the forward and
    raises RuntimeError naming the layer and the fix.
    """

    _spectral_layer_idx: int = -1
    _spectral_abort: Callable[[], None] | None = None

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _METADATA_READS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        guard = _find_guard(args, kwargs)
        layer_idx = guard._spectral_layer_idx if guard is not None else -1
        if guard is not None and guard._spectral_abort is not None:
            guard._spectral_abort()
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
        raise RuntimeError(
            f"SpectralCache layer {layer_idx}: its keys/values were read by {name} instead of "
            f"spectral attention. A compressed layer holds its context in compressed form; the "
            f"tensors update() returns are only the new tokens, so any other attention function "
            f"would silently attend to them alone. The model must attend with "
            f"attn_implementation={ATTENTION_NAME!r}: call spectralcache.enable(model) (a cache "
            f"unpickled in a new process needs it too). Nothing was cached by this forward "
            f"(the cache was rolled back to its state before it)."
        )


def _find_guard(args: Any, kwargs: Any) -> SpectralOnlyTensor | None:
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, SpectralOnlyTensor):
            return value
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, SpectralOnlyTensor):
                    return item
    return None


def spectral_only(
    tensor: torch.Tensor, layer_idx: int, abort: Callable[[], None] | None = None
) -> SpectralOnlyTensor:
    """A :class:`SpectralOnlyTensor` sharing ``tensor``'s memory (no copy, autograd kept)."""
    guard = tensor.as_subclass(SpectralOnlyTensor)
    guard._spectral_layer_idx = layer_idx
    guard._spectral_abort = _weak_callable(abort)
    return guard


def _exact_kv(state: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every cached token of the layer exactly as the model produced it, ``[B, H, seq_len, D]``
    in the model dtype and cache-index order (what ``DynamicCache`` would hold), or None when a
    tier is stored inexactly (low-rank basis, quantized rows, pre-RoPE keys)."""
    chunk = state.chunk_keys
    if chunk is None:
        return None
    dtype = chunk.dtype
    keys, values = [state.landmark_keys], [state.landmark_values]
    cold = state.cold
    if cold is not None:
        exact = (
            state.key_space == "post_rope"
            and cold.key_basis is None
            and cold.value_basis is None
            and cold.key_coeffs.dtype == dtype
            and cold.value_coeffs.dtype == dtype
        )
        if not exact:
            return None
        b, h, nb, t, d = cold.key_coeffs.shape
        if cold.value_coeffs.shape != (b, h, nb, t, d):
            return None
        k = cold.key_coeffs.reshape(b, h, nb * t, d)
        v = cold.value_coeffs.reshape(b, h, nb * t, d)
        n_out = cold.outlier_index.shape[-1] if cold.outlier_index.dim() == 4 else 0
        if n_out:
            # outlier rows are the authority for their tokens (contract: ignore their coefficient rows)
            offsets = (torch.arange(nb, device=k.device, dtype=torch.int64) * t).view(1, 1, nb, 1)
            index = (
                (cold.outlier_index.to(torch.int64) + offsets)
                .reshape(b, h, nb * n_out, 1)
                .expand(-1, -1, -1, d)
            )
            k = k.clone().scatter_(2, index, cold.outlier_keys.reshape(b, h, nb * n_out, d).to(dtype))
            v = v.clone().scatter_(2, index, cold.outlier_values.reshape(b, h, nb * n_out, d).to(dtype))
        keys.append(k)
        values.append(v)
    keys.append(state.hot_keys)
    values.append(state.hot_values)
    if any(x.dtype != dtype for x in (*keys, *values)):
        return None
    n_lm = state.landmark_keys.shape[-2]
    n_cold = 0 if cold is None else keys[1].shape[-2]
    if state.hot_start != n_lm + n_cold or state.hot_start + state.hot_keys.shape[-2] != state.seq_len:
        return None
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def _stock_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    softcap: float | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    if softcap is not None:
        # SDPA has no logit softcapping (Gemma 2): same math as eager attention, in fp32.
        if dropout and module.training:
            raise ValueError("spectral attention: dropout with softcap is not supported; use eval mode")
        out = dense_attention(query, key, value, attention_mask, scaling=scaling, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def spectral_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``[B, Hq, q, D]`` query -> (``[B, q, Hq, D]``, None)."""
    layer = lookup(key)
    if layer is None:
        # not a compressed layer of a SpectralCache (a SpectralOnlyTensor found no live layer
        # raises its clear error inside the stock path)
        return _stock_attention(module, query, key, value, attention_mask, scaling, dropout, softcap, kwargs)
    try:
        if getattr(layer, "is_sliding", False):
            # a sliding layer's graphed decode step (cache/sliding.py): its keys are the full window of
            # W rows, each in the window and at or before the one query, so no mask applies; the mask
            # transformers built carries the capture step's window offset, stale on a replay
            return _stock_attention(module, query, key, value, None, scaling, dropout, softcap, kwargs)
        if sliding_window is not None:
            raise ValueError(
                f"layer {module.layer_idx} is a sliding-window layer (window {sliding_window}) but the "
                "SpectralCache compressed it; only full-attention layers can be compressed"
            )
        if dropout and module.training:
            raise ValueError("spectral attention does not support attention dropout; call model.eval()")
        if kwargs.get("output_attentions"):
            raise ValueError("spectral attention cannot return attention weights (output_attentions=True)")
        slot = getattr(layer, "_graph_slot", None)
        if slot is not None:
            # a graphed decode step (integrations/graphed.py): the kernel with device-side sizes
            # over the layer's capacity. No padding mask exists there (the decoder refuses padded
            # batches), so a mask transformers built is the causal one, which the kernel applies
            # by cache index itself; it is not read (its address would be baked into the graph).
            out = slot.attend(query, layer, scaling, softcap)
            result = (out.transpose(1, 2).contiguous(), None)
            return result
        state = layer.state()
        exact = _exact_kv(state)
        if exact is not None:
            # the whole state is exact: the very call DynamicCache would make (bit-identical)
            result = _stock_attention(
                module, query, exact[0], exact[1], attention_mask, scaling, dropout, softcap, kwargs
            )
        else:
            # fused Triton kernel for decode on CUDA, torch reference otherwise (attention/triton/dispatch.py)
            backend = getattr(getattr(layer, "config", None), "attention_backend", "auto")
            out = attend(query, state, attention_mask, scaling, softcap, backend)
            result = (out.transpose(1, 2).contiguous(), None)
        if query.shape[-2] > 1:
            # SpectralConfig.outlier_selection: a prefill chunk deferred its due blocks until its
            # queries were known; compress them now (a no-op otherwise; never reached at decode)
            layer.observe_queries(query, scaling, softcap)
    except BaseException:
        # refused or failed: every layer this forward changed goes back to its state before it
        _abort(key)
        raise
    finally:
        # The exact chunk lives only until this layer's attention has run.
        layer.release_chunk()
    return result


def spectral_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Mask function registered under ``"spectral"``: transformers' SDPA boolean mask."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``"spectral"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, spectral_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, spectral_mask)
