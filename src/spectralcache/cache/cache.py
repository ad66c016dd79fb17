"""``SpectralCache``: a transformers ``Cache`` whose full-attention layers are compressed.

Layers are built from the model config's ``layer_types``: a :class:`SpectralLayer` for every
compressed layer (default: every ``full_attention`` layer), transformers' own
``DynamicSlidingWindowLayer`` for sliding / chunked layers, ``DynamicLayer`` for full-attention
layers the config leaves uncompressed.

The attention function finds the layer it must read with :func:`get_active_spectral_layer`:
``SpectralCache.update`` records, per thread, the cache being updated, and the attention call
of the same layer follows immediately in the same thread.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicLayer,
    get_layer_types_and_kwargs,
)

from spectralcache.cache.layer import SpectralLayer
from spectralcache.cache.rope import RopeRotator, find_rotary_inv_freq
from spectralcache.config import SpectralConfig, get_preset

__all__ = ["SpectralCache", "get_active_spectral_layer"]

_ACTIVE = threading.local()

# Layer types that hold per-token K/V of standard multi-head attention (candidates for compression).
_FULL = "full_attention"
_COLD_TIERS = ("coefficients", "scales", "bases", "outliers", "outlier_index", "block_starts")
_UNSUPPORTED_TYPES = {"linear_attention", "conv", "hybrid", "hybrid_sliding", "indexed_attention"}


def get_active_spectral_layer(layer_idx: int, key_states: torch.Tensor | None = None) -> SpectralLayer | None:
    """The compressed layer ``layer_idx`` of the SpectralCache updated last in this thread, or None.

    Returns None when no SpectralCache is active, when that layer is not compressed, or when
    the layer has no pending chunk (its attention already ran / it was not updated in this
    call), so a stale cache from an earlier forward is never read. If ``key_states`` is given,
    the layer is returned only if they are the very tensors its ``update`` returned.
    """
    ref = getattr(_ACTIVE, "cache", None)
    cache = ref() if ref is not None else None
    if cache is None or not 0 <= layer_idx < len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    if not isinstance(layer, SpectralLayer) or not layer.has_pending_chunk:
        return None
    if key_states is not None and key_states is not layer.pending_chunk_keys:
        return None
    return layer


def _text_config(model_or_config: Any) -> tuple[Any, nn.Module | None]:
    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        if config is None:
            raise TypeError(f"{type(model_or_config).__name__} has no .config; pass a transformers model")
        model = model_or_config
    else:
        config, model = model_or_config, None
    if not hasattr(config, "get_text_config"):
        raise TypeError(
            f"SpectralCache needs a transformers model or PretrainedConfig, got {type(model_or_config).__name__}"
        )
    return config.get_text_config(decoder=True), model


def _check_layout(cfg: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) for standard MHA/GQA attention; clear error otherwise."""
    name = type(cfg).__name__
    if getattr(cfg, "kv_lora_rank", None) is not None or getattr(cfg, "qk_rope_head_dim", None) is not None:
        raise ValueError(
            f"{name}: multi-head latent attention (MLA) caches a shared latent, not per-head K/V; "
            "SpectralCache supports standard multi-head / grouped-query attention only"
        )
    n_heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // n_heads if hidden and n_heads else None)
    if head_dim is None:
        raise ValueError(
            f"{name}: cannot determine head_dim (no head_dim / hidden_size / num_attention_heads)"
        )
    v_head_dim = getattr(cfg, "v_head_dim", None)
    if v_head_dim is not None and v_head_dim != head_dim:
        raise ValueError(
            f"{name}: value head dim {v_head_dim} != key head dim {head_dim}; unsupported layout"
        )
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if not n_kv:
        raise ValueError(f"{name}: cannot determine the number of KV heads")
    if n_heads and n_heads % n_kv:
        raise ValueError(f"{name}: {n_heads} attention heads are not a multiple of {n_kv} KV heads")
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if not n_layers:
        raise ValueError(f"{name}: no num_hidden_layers")
    return int(n_layers), int(n_kv), int(head_dim)


def _layer_types_and_kwargs(cfg: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """transformers' layer types and per-layer init kwargs. Before 5.2x the helper returned one
    kwargs dict for the whole model; both shapes are accepted (pyproject allows transformers 5.x)."""
    layer_types, kwargs = get_layer_types_and_kwargs(cfg)
    layer_types = list(layer_types)
    if isinstance(kwargs, dict):
        windowed = ("sliding_attention", "chunked_attention", "hybrid_sliding")
        kwargs = [
            {k: v for k, v in kwargs.items() if k == "sliding_window"} if lt in windowed else {}
            for lt in layer_types
        ]
    return layer_types, list(kwargs)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


class SpectralCache(Cache):
    """KV cache with landmarks | compressed blocks | hot buffer on full-attention layers.

    Args:
        model_or_config: the transformers model (needed for ``key_space="pre_rope"``, whose
            RoPE inverse comes from the model's rotary module) or its config.
        config: a :class:`SpectralConfig`, a preset name, or None for the ``"default"`` preset.
    """

    def __init__(self, model_or_config: Any, config: SpectralConfig | str | None = None) -> None:
        if config is None:
            config = get_preset("default")
        elif isinstance(config, str):
            config = get_preset(config)
        if not isinstance(config, SpectralConfig):
            raise TypeError(f"config must be a SpectralConfig or preset name, got {type(config).__name__}")
        text_cfg, model = _text_config(model_or_config)
        n_layers, n_kv, head_dim = _check_layout(text_cfg)
        config.check_for_model(head_dim, n_layers)
        layer_types, per_layer_kwargs = _layer_types_and_kwargs(text_cfg)
        layer_types = layer_types[:n_layers]
        unsupported = sorted(
            {lt for lt in layer_types if lt in _UNSUPPORTED_TYPES or lt not in DYNAMIC_LAYER_TYPE_MAPPING}
        )
        full = [i for i, lt in enumerate(layer_types) if lt == _FULL]
        if config.compress_layers is None:
            compress = full
        else:
            bad = [i for i in config.compress_layers if layer_types[i] != _FULL]
            if bad:
                raise ValueError(
                    f"SpectralConfig.compress_layers: layers {bad} are {[layer_types[i] for i in bad]}, "
                    "only full_attention layers can be compressed"
                )
            compress = list(config.compress_layers)
        if not compress:
            raise ValueError(
                f"{type(text_cfg).__name__} has no full-attention layer to compress (layer types: "
                f"{sorted(set(layer_types))}); SpectralCache only compresses full-attention layers"
            )
        if unsupported:
            raise ValueError(
                f"{type(text_cfg).__name__} has layer types {unsupported} that SpectralCache does not support "
                "(linear / hybrid / indexed attention)"
            )
        rotators: dict[str, RopeRotator] = {}
        if config.key_space == "pre_rope":
            if model is None:
                raise ValueError(
                    "key_space='pre_rope' needs the model (its rotary embedding defines the RoPE to invert); "
                    "pass the model, not its config"
                )
            for i in compress:
                lt = layer_types[i]
                if lt not in rotators:
                    rotators[lt] = RopeRotator(find_rotary_inv_freq(model, lt), head_dim)
        if model is not None:
            # Tensor parallelism: each rank caches only its own KV heads, read from the sharded
            # model (the config holds the global count). Unchanged on an unsharded model.
            from spectralcache.integrations.tp import kv_heads_per_rank

            n_kv = kv_heads_per_rank(model, n_kv, head_dim, compress)
        layers: list[Any] = []
        compress_set = set(compress)
        for i, (lt, kwargs) in enumerate(zip(layer_types, per_layer_kwargs)):
            if i in compress_set:
                layers.append(
                    SpectralLayer(config, i, head_dim=head_dim, num_kv_heads=n_kv, rotator=rotators.get(lt))
                )
            elif lt == _FULL:
                layers.append(DynamicLayer())
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[lt](**kwargs))
        super().__init__(layers=layers)
        self.config = config
        self.head_dim = head_dim
        self.num_kv_heads = n_kv
        self.layer_types = layer_types
        self.compressed_layers = tuple(compress)
        if model is not None:
            # Given the model, switch it to spectral attention so that
            # generate(past_key_values=SpectralCache(model, cfg)) just works (idempotent).
            from spectralcache.integrations.transformers import enable

            enable(model)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {len(self.layers)} layers")
        layer = self.layers[layer_idx]
        if isinstance(layer, SpectralLayer) and layer.has_pending_chunk:
            # The previous call's chunk was never read by spectral attention: the model attended
            # with another implementation over the wrong K/V (or a forward failed mid-way).
            raise RuntimeError(
                f"SpectralCache layer {layer_idx}: the previous forward's keys/values were not read by "
                "spectral attention, so the model is not using it (attention implementation "
                "must be 'spectral'). Call spectralcache.enable(model), or build the cache with "
                "SpectralCache(model, config), which does it for you. The cache is unchanged."
            )
        _ACTIVE.cache = weakref.ref(self)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # ------------------------------------------------------------------ reporting
    def compression_stats(self) -> dict[str, Any]:
        """Block compression cost, kept apart from decode: it is paid once per ``block_size``
        tokens per layer (amortized), or in one batched call per layer during prefill."""
        calls = [
            c for layer in self.layers if isinstance(layer, SpectralLayer) for c in layer.compression_calls
        ]
        blocks = sum(n for n, _ in calls)
        seconds = sum(s for _, s in calls)
        return {
            "calls": len(calls),
            "blocks": blocks,
            "seconds": seconds,
            "seconds_per_block": seconds / blocks if blocks else None,
        }

    def memory_report(self) -> dict[str, Any]:
        """Bytes actually held, per tier and layer, measured from tensor storage.

        Each distinct storage is counted once (``untyped_storage().nbytes()``, so a view pins
        and is charged its whole parent storage). ``dynamic_bytes`` is what a ``DynamicCache``
        holds for the same tokens: two compact ``[B, H, seq_len, D]`` tensors in the model dtype
        (uncompressed and sliding layers are transformers' own layer classes, so for them it is
        their measured bytes). ``ratio`` =
        held / dynamic. ``cold_blocks`` (and per layer ``cold_ratio``) is the compressed tier alone
        against the same tokens held exact: the whole-layer ratio also carries the exact
        landmarks and hot buffer (between ``hot_size`` and ``hot_size + block_size - 1`` tokens),
        so it approaches ``cold_ratio`` only as the context grows. Also reports
        block-compression time (amortized, separate from decode).
        """
        seen: set[tuple[str, int]] = set()

        def held(tensors: list[torch.Tensor]) -> int:
            total = 0
            for t in tensors:
                if t is None:
                    continue
                key = _storage_key(t)
                nbytes = t.untyped_storage().nbytes()
                if nbytes == 0 or key in seen:
                    continue
                seen.add(key)
                total += nbytes
            return total

        layers = []
        agg = {"compressed": [0, 0], "all": [0, 0], "cold": [0, 0]}
        for i, layer in enumerate(self.layers):
            entry: dict[str, Any] = {"layer_idx": i, "layer_type": self.layer_types[i]}
            if isinstance(layer, SpectralLayer):
                tiers = {name: held(ts) for name, ts in layer.tier_tensors().items()}
                entry["kind"] = "spectral"
                entry["seq_len"] = layer.get_seq_length()
                entry["num_blocks"] = layer.num_blocks
                entry["tiers"] = tiers
                total = sum(tiers.values())
                per_token = 0  # bytes a DynamicLayer holds per cached token (K and V)
                if layer.is_initialized:
                    itemsize = torch.empty((), dtype=layer.dtype).element_size()
                    per_token = 2 * layer.batch_size * layer.num_kv_heads * layer.head_dim * itemsize
                dyn = per_token * layer.get_seq_length()
                # the cold tier alone, against the same tokens held exact
                cold_bytes = sum(tiers[name] for name in _COLD_TIERS)
                cold_dyn = per_token * layer.num_blocks * self.config.block_size
                entry["cold_bytes"] = cold_bytes
                entry["cold_dynamic_bytes"] = cold_dyn
                entry["cold_ratio"] = cold_bytes / cold_dyn if cold_dyn else None
                agg["cold"][0] += cold_bytes
                agg["cold"][1] += cold_dyn
            else:
                entry["kind"] = "sliding" if getattr(layer, "is_sliding", False) else "dynamic"
                entry["seq_len"] = layer.get_seq_length() if layer.is_initialized else 0
                keys = getattr(layer, "keys", None)
                values = getattr(layer, "values", None)
                total = held([x for x in (keys, values) if isinstance(x, torch.Tensor)])
                # the very layer class a DynamicCache would use: it holds exactly this (note that
                # transformers' sliding layer keeps a view that pins the last full concatenation)
                dyn = total
            entry["held_bytes"] = total
            entry["dynamic_bytes"] = dyn
            entry["ratio"] = total / dyn if dyn else None
            layers.append(entry)
            agg["all"][0] += total
            agg["all"][1] += dyn
            if entry["kind"] == "spectral":
                agg["compressed"][0] += total
                agg["compressed"][1] += dyn

        def summary(pair: list[int]) -> dict[str, Any]:
            return {
                "held_bytes": pair[0],
                "dynamic_bytes": pair[1],
                "ratio": pair[0] / pair[1] if pair[1] else None,
            }

        tier_totals: dict[str, int] = {}
        for entry in layers:
            for name, nbytes in entry.get("tiers", {}).items():
                tier_totals[name] = tier_totals.get(name, 0) + nbytes
        return {
            "layers": layers,
            "tiers": tier_totals,
            "compressed_layers": summary(agg["compressed"]),
            "cold_blocks": summary(agg["cold"]),
            "all_layers": summary(agg["all"]),
            "compression": self.compression_stats(),
        }
