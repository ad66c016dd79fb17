"""Switching a transformers model to spectral attention.

``enable(model)`` registers the ``"spectral"`` attention and mask functions and sets the
model's attention implementation (top config and every sub-config, e.g. the text model
of a multimodal Gemma 3) to it. It is idempotent and reversible (``disable``).

``enable`` also installs two forward hooks on the model (removed by ``disable``) that make
every forward atomic for a SpectralCache passed to it: before the forward, a forward
interrupted earlier is rolled back (before the model reads the cache length); after it, the
forward's updates are kept, or -- if it raised anywhere in the model -- rolled back on every
layer. Forwards with any other cache are untouched.

``SpectralCache(model, cfg)`` calls ``enable`` itself (README "Use it" says why), so
``model.generate(ids, past_key_values=SpectralCache(model, cfg))`` just works. A cache built
from a bare config cannot switch the model; a model that does not attend with spectral
attention (never enabled, ``disable()``d, or reading an unpickled cache in a new process)
raises a clear error at the first compressed layer it reads, and the cache is left as before
that call. So a model never silently attends over the wrong K/V.
"""

from __future__ import annotations

from typing import Any

from spectralcache.attention.interface import ATTENTION_NAME, register

__all__ = ["ATTENTION_NAME", "disable", "enable", "is_enabled"]

_PREVIOUS = "_spectralcache_previous_attn_implementation"
_FORWARD_HOOKS = "_spectralcache_atomic_forward_hooks"


def _spectral_caches(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    from spectralcache.cache.cache import SpectralCache

    found: list[Any] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, SpectralCache) and not any(value is f for f in found):
            found.append(value)
    return found


def _begin_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for cache in _spectral_caches(args, kwargs):
        cache._begin_forward()


def _end_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    # always_call=True: also runs when the forward raised, with output None
    for cache in _spectral_caches(args, kwargs):
        cache._end_forward(failed=output is None)


def _install_forward_hooks(model: Any) -> None:
    """The atomic-forward hooks (idempotent); handles kept on the model for ``disable``."""
    if getattr(model, _FORWARD_HOOKS, None) is not None:
        return
    handles = (
        # prepend: an interrupted forward is rolled back before any other hook reads the cache
        model.register_forward_pre_hook(_begin_forward, with_kwargs=True, prepend=True),
        model.register_forward_hook(_end_forward, with_kwargs=True, always_call=True),
    )
    object.__setattr__(model, _FORWARD_HOOKS, handles)


def _remove_forward_hooks(model: Any) -> None:
    handles = getattr(model, _FORWARD_HOOKS, None)
    if handles is not None:
        for handle in handles:
            handle.remove()
        object.__delattr__(model, _FORWARD_HOOKS)


def _text_config(model_or_config: Any) -> Any:
    cfg = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(cfg, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else cfg


def _check_model(model: Any, *, refuse_unsloth: bool = False) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"enable/disable expect a transformers PreTrainedModel, got {type(model).__name__}")
    if refuse_unsloth:
        # before the AttentionInterface check: Unsloth's compiled Gemma 3 classes fail that one
        # too, and only this error names the fix (patch_unsloth_attention)
        from spectralcache.integrations.unsloth import refuse_unsloth_inference

        refuse_unsloth_inference(model)
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "so spectral attention cannot be switched on for it (unsupported attention layout)"
        )


def enable(model: Any) -> Any:
    """Make ``model`` attend through the spectral attention function; returns the model.

    Layers the cache does not compress keep transformers' SDPA path, so this is safe to
    call on any model the cache supports, and calling it again is a no-op.
    """
    _check_model(model, refuse_unsloth=True)
    # Installs the "cache never bypassed" check.
    from spectralcache.integrations import guard

    guard.attach(model)
    register()
    _install_forward_hooks(model)
    current = model.config._attn_implementation
    if current != ATTENTION_NAME:
        setattr(model, _PREVIOUS, current)
        model.set_attn_implementation(ATTENTION_NAME)
    text = _text_config(model)
    if text._attn_implementation != ATTENTION_NAME:
        raise ValueError(
            f"could not switch the decoder of {type(model).__name__} to spectral attention "
            f"(still {text._attn_implementation!r})"
        )
    return model


def disable(model: Any) -> Any:
    """Undo :func:`enable`: back to the implementation the model had before (default SDPA)."""
    _check_model(model)
    previous = getattr(model, _PREVIOUS, None) or "sdpa"
    _remove_forward_hooks(model)
    if model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous)
    if hasattr(model, _PREVIOUS):
        delattr(model, _PREVIOUS)
    from spectralcache.integrations import guard

    guard.detach(model)
    return model


def is_enabled(model_or_config: Any) -> bool:
    """Whether the (text) decoder of this model / config attends through spectral attention."""
    return _text_config(model_or_config)._attn_implementation == ATTENTION_NAME
