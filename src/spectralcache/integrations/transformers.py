"""Switching a transformers model to spectral attention.

``enable(model)`` registers the ``"spectral"`` attention and mask functions and sets the
model's attention implementation (top config and every sub-config, e.g. the text model
of a multimodal Gemma 3) to it. It is idempotent and reversible (``disable``).

``SpectralCache(model, cfg)`` calls ``enable`` itself, so
``model.generate(ids, past_key_values=SpectralCache(model, cfg))`` just works. A cache
built from a bare config cannot switch the model; if the model still attends with
SDPA/eager, the attention never consumes the cache's pending chunk, and the cache's next
``update`` raises a clear error (the first call from an empty cache is still correct:
its chunk is every token). So a model never silently attends over the wrong K/V.
"""

from __future__ import annotations

from typing import Any

from spectralcache.attention.interface import ATTENTION_NAME, register

__all__ = ["ATTENTION_NAME", "disable", "enable", "is_enabled"]

_PREVIOUS = "_spectralcache_previous_attn_implementation"


def _text_config(model_or_config: Any) -> Any:
    cfg = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(cfg, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else cfg


def _check_model(model: Any) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"enable/disable expect a transformers PreTrainedModel, got {type(model).__name__}")
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
    _check_model(model)
    register()
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
    if model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous)
    if hasattr(model, _PREVIOUS):
        delattr(model, _PREVIOUS)
    return model


def is_enabled(model_or_config: Any) -> bool:
    """Whether the (text) decoder of this model / config attends through spectral attention."""
    return _text_config(model_or_config)._attn_implementation == ATTENTION_NAME
