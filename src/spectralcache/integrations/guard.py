"""A SpectralCache is never silently bypassed.

:func:`attach` (called by ``spectralcache.enable(model)``, hence by ``SpectralCache(model, cfg)``)
installs a forward pre-hook and a forward hook on the model. When a forward is called with a
:class:`~spectralcache.cache.cache.SpectralCache` (under ``cache=`` or ``past_key_values=``), the
hooks check, when the forward returns, that

* every compressed layer of that cache received the call's keys/values (its sequence length
  grew) -- otherwise something between the model call and its attention layers dropped or
  replaced the cache (Unsloth's fast inference path turns caches into its own tuples, for
  example), and the output was computed without it;
* no compressed layer still holds an unread chunk -- otherwise a layer attended with another
  attention function (SDPA hard-coded in a replaced forward, say) over K/V that are not what
  the cache holds.

Either way :class:`SpectralCacheBypassedError` is raised instead of returning that output.
This is independent of Unsloth: it guards plain transformers models too. The check only
reads each compressed layer's ``get_seq_length()`` and ``has_pending_chunk``: no device sync.

``enable`` also refuses, up front, a model whose inference Unsloth has taken over (see
:func:`spectralcache.integrations.unsloth.unsloth_inference_paths`).

A cache built from a config (``SpectralCache(model.config, cfg)``) installs no hooks, and
Unsloth's fast path drops it before any forward could be checked: its
``_fast_prepare_inputs_for_generation`` asks the cache its length, finds 0 and passes ``None``
on; its ``CausalLM_fast_forward`` turns the cache into tuples the same way. Asking the length
is the one thing the cache sees, so ``SpectralCache.get_seq_length`` calls
:func:`refuse_unsloth_fast_path_caller` (only while ``unsloth`` is imported): when the code
asking is Unsloth's, running on a module whose ``_unsloth_fast_path`` flag is set, it raises
:class:`SpectralCacheBypassedError` before anything is dropped. Unsloth code running a patched
model's modules (flag ``False``, the gates then call transformers' originals) and transformers'
own calls pass untouched. Host-only frame inspection: no device sync.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from torch import nn

from spectralcache.integrations.compat import CACHE_ARGUMENT_NAMES
from spectralcache.integrations.unsloth import FAST_PATH_FLAG, unsloth_version

__all__ = [
    "SpectralCacheBypassedError",
    "attach",
    "detach",
    "is_attached",
    "refuse_unsloth_fast_path_caller",
]

_HANDLES = "_spectralcache_bypass_guard"
_ARMED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, list[int]]] = weakref.WeakKeyDictionary()


class SpectralCacheBypassedError(RuntimeError):
    """A forward was given a SpectralCache that its attention did not update and read."""


# Unsloth frames walked up from the caller of get_seq_length looking for the model they run on:
# _fast_prepare_inputs_for_generation(self, ...) asks directly; _cache_as_legacy_tuple(cache) is
# one call below CausalLM_fast_forward(self, ...); the gate wrapper adds one more.
_MAX_UNSLOTH_FRAMES = 4


def _is_unsloth_frame(frame: Any) -> bool:
    return (frame.f_globals.get("__name__") or "").split(".")[0].startswith("unsloth")


def refuse_unsloth_fast_path_caller(cache: Any, frames_up: int = 2) -> None:
    """Raise if the code asking ``cache`` something is Unsloth's fast path running on a model.

    ``frames_up``: how far up the stack the asking code is (2: the caller of the cache method
    that calls this). Walks at most a few frames, and only while they are Unsloth's; reads no
    tensor. See the module docstring for why this is where a config-built cache is caught.
    """
    frame = sys._getframe(frames_up)
    asking = frame
    for _ in range(_MAX_UNSLOTH_FRAMES):
        if frame is None or not _is_unsloth_frame(frame):
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and getattr(owner, FAST_PATH_FLAG, False) is True:
            code = asking.f_code
            raise SpectralCacheBypassedError(
                f"a SpectralCache was passed to {type(owner).__name__}, whose inference Unsloth runs "
                f"({asking.f_globals.get('__name__')}.{code.co_name} asked for it; {FAST_PATH_FLAG}=True; "
                f"{unsloth_version()}). Unsloth's fast path drops the cache (or turns it into tuples) and "
                "would compute the output without it. Call "
                "spectralcache.integrations.unsloth.patch_unsloth_attention(model, config) first (again "
                "after get_peft_model); then model.generate uses a SpectralCache, and this one works too. "
                "Nothing was cached."
            )
        frame = frame.f_back


def _spectral_cache_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from spectralcache.cache.cache import SpectralCache

    for name in CACHE_ARGUMENT_NAMES:
        if isinstance(kwargs.get(name), SpectralCache):
            return kwargs[name]
    for value in args:  # a cache passed positionally
        if isinstance(value, SpectralCache):
            return value
    return None


def _before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    cache = _spectral_cache_in(args, kwargs)
    if cache is None or kwargs.get("use_cache") is False:
        _ARMED.pop(module, None)
        return
    # One record per model (a model's forward is not re-entrant); a forward that raised leaves
    # a record that the next call overwrites. The cache is remembered here rather than looked
    # up again afterwards, because whatever replaces it may also rewrite the call's kwargs.
    lengths = [cache.layers[i].get_seq_length() for i in cache.compressed_layers]
    _ARMED[module] = (weakref.ref(cache), lengths)


def _after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    record = _ARMED.pop(module, None)
    if record is None:
        return
    cache, before = record[0](), record[1]
    if cache is None:
        return
    layers = cache.compressed_layers
    not_updated = [i for i, n in zip(layers, before) if cache.layers[i].get_seq_length() <= n]
    if not_updated:
        raise SpectralCacheBypassedError(
            f"{type(module).__name__}.forward was given a SpectralCache, but its compressed layers "
            f"{not_updated} received no keys/values: the model computed this output without the cache "
            "(something replaced or dropped it on the way to the attention layers -- for a model loaded "
            "with Unsloth, call spectralcache.integrations.unsloth.patch_unsloth_attention(model) first)"
        )
    unread = [i for i in layers if cache.layers[i].has_pending_chunk]
    if unread:
        raise SpectralCacheBypassedError(
            f"{type(module).__name__}.forward updated SpectralCache layers {unread} but their attention "
            "never read them through spectral attention (another attention function attended over "
            "keys/values the cache does not hold). Call spectralcache.enable(model) (for Unsloth: "
            "patch_unsloth_attention(model)) and build a fresh cache; this one holds tokens the model "
            "never attended to correctly."
        )


def attach(model: nn.Module) -> nn.Module:
    """Install the bypass check on ``model`` (idempotent). ``enable`` refuses an Unsloth-hijacked
    model before calling this."""
    if getattr(model, _HANDLES, None) is None:
        handles = (
            model.register_forward_pre_hook(_before, with_kwargs=True, prepend=True),
            model.register_forward_hook(_after, with_kwargs=True),
        )
        object.__setattr__(model, _HANDLES, handles)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove what :func:`attach` installed."""
    handles = getattr(model, _HANDLES, None)
    if handles is not None:
        for handle in handles:
            handle.remove()
        object.__delattr__(model, _HANDLES)
    return model


def is_attached(model: nn.Module) -> bool:
    return getattr(model, _HANDLES, None) is not None
