"""The ``"spectral"`` attention implementation, as transformers' ``AttentionInterface`` calls it.

Per layer, the function asks the cache for the layer it is updating right now
(``get_active_spectral_layer(module.layer_idx)``, set by ``SpectralCache.update`` in this
thread). A compressed layer is read through its ``SpectralLayerState`` with
:func:`spectral_attention`; everything else (sliding-window layers, layers the config
leaves uncompressed, calls without a SpectralCache) takes transformers' own SDPA path,
so switching a model to ``"spectral"`` changes nothing for those layers.

The matching mask function is transformers' SDPA mask: a bool ``[B, 1, q, kv_len]``
mask indexed by cache index, or None where SDPA would use ``is_causal`` (then the
spectral path applies causality by cache index itself). Sliding-window layers thus get
exactly the mask SDPA would get.
"""

from __future__ import annotations

from typing import Any

import torch

from spectralcache.attention.reference import dense_attention, spectral_attention

__all__ = ["ATTENTION_NAME", "register", "spectral_attention_forward", "spectral_mask"]

ATTENTION_NAME = "spectral"


def _active_layer(layer_idx: int | None, key: torch.Tensor) -> Any:
    """The compressed layer the SpectralCache is updating for ``layer_idx``, or None.

    ``key`` must be the very tensor that layer's ``update`` returned: a leftover layer from
    an earlier SpectralCache call in this thread is never read for another cache's K/V.
    """
    if layer_idx is None:
        return None
    from spectralcache.cache.cache import get_active_spectral_layer

    return get_active_spectral_layer(layer_idx, key)


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
    layer = _active_layer(getattr(module, "layer_idx", None), key)
    if layer is None:
        return _stock_attention(module, query, key, value, attention_mask, scaling, dropout, softcap, kwargs)
    try:
        if sliding_window is not None:
            raise ValueError(
                f"layer {module.layer_idx} is a sliding-window layer (window {sliding_window}) but the "
                "SpectralCache compressed it; only full-attention layers can be compressed"
            )
        if dropout and module.training:
            raise ValueError("spectral attention does not support attention dropout; call model.eval()")
        if kwargs.get("output_attentions"):
            raise ValueError("spectral attention cannot return attention weights (output_attentions=True)")
        state = layer.state()
        out = spectral_attention(query, state, attention_mask, scaling=scaling, softcap=softcap)
    finally:
        # The exact chunk lives only until this layer's attention has run.
        layer.release_chunk()
    return out.transpose(1, 2).contiguous(), None


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
