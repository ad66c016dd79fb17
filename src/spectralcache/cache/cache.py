"""``SpectralCache``: a transformers ``Cache`` whose full-attention layers are compressed.

Layers are built from the model config's ``layer_types``: a :class:`SpectralLayer` for every
compressed layer (default: every ``full_attention`` layer), a :class:`SlidingWindowLayer` for
sliding layers (transformers' own ``DynamicSlidingWindowLayer``, every eager call inherited, plus a
step ``GraphedDecoder`` can replay: ``cache/sliding.py``), transformers' own layer for chunked
layers, ``DynamicLayer`` for full-attention layers the config leaves uncompressed.

Handshake with attention (``attention/interface.py``): for a compressed layer ``update`` returns
:class:`~spectralcache.attention.interface.SpectralOnlyTensor` objects sharing the chunk's memory
and registers the key one with ``register_chunk``; the attention function finds the layer with
``lookup`` on the very tensor it was handed (a weak, identity-keyed mapping): no thread-global
state, so another cache, a stale layer or another thread can never be read by mistake. Any
other attention function that touches those tensors raises a clear error.

Atomic forwards. A forward updates every layer once. Before its first update in a forward,
each layer is checkpointed (``SpectralLayer.checkpoint()``; transformers' own layers by a
snapshot of their attributes -- their ``update`` replaces ``keys`` / ``values`` by
``torch.cat`` and never writes into them). If the forward is refused or fails part-way (an
error in ``update``, in spectral attention, a non-spectral read of a compressed layer, or --
on a model switched by ``spectralcache.enable`` -- anywhere in the model), every layer it
changed is rolled back, so the next call sees the cache exactly as before the failed one. A
forward interrupted where no hook sees it (``KeyboardInterrupt``, a bare base-model call that
raises) leaves layers of different lengths; the next forward through an enabled model rolls
them back before it reads the cache length, and a next ``update`` without such a hook rolls
back and raises, since that call's positions were computed from the inconsistent length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from spectralcache.cache.deferred import DeferredCheck, first_failure
from spectralcache.cache.layer import COLD_TIERS, SpectralLayer
from spectralcache.cache.memory import held_bytes, logical_bytes
from spectralcache.cache.rope import find_rotary_inv_freq
from spectralcache.cache.sliding import SlidingWindowLayer
from spectralcache.config import SpectralConfig, get_preset

__all__ = ["SpectralCache", "get_active_spectral_layer"]

# Layer types that hold per-token K/V of standard multi-head attention (candidates for compression).
_FULL = "full_attention"
_UNSUPPORTED_TYPES = {"linear_attention", "conv", "hybrid", "hybrid_sliding", "indexed_attention"}


def get_active_spectral_layer(layer_idx: int, key_states: torch.Tensor | None = None) -> SpectralLayer | None:
    """The compressed layer with index ``layer_idx`` whose ``update`` returned ``key_states`` and
    whose attention has not run yet, or None (also None without ``key_states``: there is no
    "last updated cache" any more, see ``attention.interface.lookup``)."""
    if key_states is None:
        return None
    from spectralcache.attention.interface import lookup

    layer = lookup(key_states)
    if layer is None or getattr(layer, "layer_idx", None) != layer_idx:
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
    _refuse_encoders(config)
    return config.get_text_config(decoder=True), model


def _refuse_encoders(config: Any) -> None:
    """Encoder-decoder (T5, BART) and encoder-only (BERT-style) models: clear error.

    A SpectralCache compresses the self-attention K/V of a causal decoder that grows one token
    at a time; an encoder attends bidirectionally over a fixed input (nothing to cache), and an
    encoder-decoder model's cache pairs self- with cross-attention (``EncoderDecoderCache``).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    name = type(config).__name__
    text = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model (like T5 / BART): SpectralCache supports decoder-only "
            "causal language models (its cache would have to pair self- with cross-attention)"
        )
    model_type = getattr(text, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(text, "is_decoder", False):
        raise ValueError(
            f"{name} is an encoder model (BERT-style, bidirectional attention over a fixed input): "
            "SpectralCache supports decoder-only causal language models"
        )


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


_HALF = (torch.float16, torch.bfloat16)


def _refuse_inexact_lossless(config: SpectralConfig, dtype: torch.dtype) -> None:
    """The ``lossless`` preset (full-rank low-rank bases, 16-bit coefficients) reproduces K/V up to
    float32 rounding only: in float16 / bfloat16 the basis round trip changes values (35 of 40
    greedy tokens differed from DynamicCache on the tiny bf16 Llama). Refused there, naming the
    configuration that is exact in every dtype."""
    if config.name != "lossless" or dtype not in _HALF:
        return
    exact = (
        config.key_codec == "identity"
        and config.value_codec == "identity"
        and config.coeff_bits == 16
        and config.value_coeff_bits in (None, 16)
        and config.key_space == "post_rope"
    )
    if not exact:
        raise ValueError(
            f"the 'lossless' preset stores full-rank low-rank bases, which are exact in float32 only; "
            f"in {dtype} use SpectralConfig.from_preset('lossless', key_codec='identity', "
            "value_codec='identity'): every tier is then stored exactly and attention runs "
            "DynamicCache's own SDPA call, bit-identical in any dtype"
        )


# (register_chunk, spectral_only) from attention.interface, imported on first use (that module
# imports the cache package)
_HANDSHAKE: tuple[Any, Any] | None = None


def _load_handshake() -> None:
    global _HANDSHAKE
    from spectralcache.attention.interface import register_chunk, spectral_only

    _HANDSHAKE = (register_chunk, spectral_only)


def _checkpoint(layer: Any) -> Any:
    """A rollback token for ``layer``: its own ``checkpoint()`` (SpectralLayer), else a snapshot of
    its attributes (transformers' DynamicLayer / DynamicSlidingWindowLayer replace ``keys`` /
    ``values`` on update and never write into them, so references suffice)."""
    own = getattr(layer, "checkpoint", None)
    if callable(own) and callable(getattr(layer, "rollback", None)):
        return ("own", own())
    return (
        "attrs",
        {
            k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
            for k, v in vars(layer).items()
        },
    )


def _rollback(layer: Any, token: Any) -> None:
    kind, data = token
    if kind == "own":
        layer.rollback(data)
    else:
        layer.__dict__.clear()
        layer.__dict__.update(data)


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
        rope_inv_freqs: dict[str, torch.Tensor] = {}  # per layer type (Gemma 3: own theta)
        if config.key_space == "pre_rope":
            if model is None:
                raise ValueError(
                    "key_space='pre_rope' needs the model (its rotary embedding defines the RoPE to invert); "
                    "pass the model, not its config"
                )
            for i in compress:
                lt = layer_types[i]
                if lt not in rope_inv_freqs:
                    rope_inv_freqs[lt] = find_rotary_inv_freq(model, lt)
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
                    SpectralLayer(
                        config, i, head_dim=head_dim, num_kv_heads=n_kv, rope_inv_freq=rope_inv_freqs.get(lt)
                    )
                )
            elif lt == _FULL:
                layers.append(DynamicLayer())
            elif lt == "sliding_attention" and DYNAMIC_LAYER_TYPE_MAPPING[lt] is DynamicSlidingWindowLayer:
                # transformers' own layer, plus a graphed decode step (cache/sliding.py)
                layers.append(SlidingWindowLayer(**kwargs))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[lt](**kwargs))
        super().__init__(layers=layers)
        self.config = config
        self.head_dim = head_dim
        self.num_kv_heads = n_kv
        self.layer_types = layer_types
        self.compressed_layers = tuple(compress)
        # atomic forwards: checkpoints of the layers updated since the current forward began
        self._forward_checkpoints: dict[int, Any] = {}
        # True between the begin and end hooks of a forward through an enabled model
        self._hooked_forward = False
        if model is not None:
            _refuse_inexact_lossless(config, getattr(model, "dtype", torch.float32))
        if model is not None:
            # The one side effect on the model, on purpose (README "Use it"): only spectral
            # attention can read this cache, so a cache built for a model switches that model
            # (idempotent, undone by spectralcache.disable). A cache built from a config touches
            # nothing; any other attention that reads it raises instead of attending wrongly.
            from spectralcache.integrations.transformers import enable

            enable(model)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one layer's new K/V; atomic per forward (see the module docstring).

        For a compressed layer the returned tensors are :class:`SpectralOnlyTensor` views of the
        given ones, readable by spectral attention only. Any error raised here rolls back every
        layer this forward has updated before it propagates.
        """
        if _HANDSHAKE is None:
            _load_handshake()
        register_chunk, spectral_only = _HANDSHAKE
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            self._abort_forward()
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {len(self.layers)} layers")
        if layer_idx in self._forward_checkpoints:
            self._start_unhooked_forward(layer_idx)
        layer = self.layers[layer_idx]
        try:
            if isinstance(layer, SpectralLayer) and layer.has_pending_chunk:
                # The previous call's chunk was never read by spectral attention: the model attended
                # with another implementation over the wrong K/V.
                raise RuntimeError(
                    f"SpectralCache layer {layer_idx}: the previous forward's keys/values were not read by "
                    "spectral attention, so the model is not using it (attention implementation "
                    "must be 'spectral'). Call spectralcache.enable(model), or build the cache with "
                    "SpectralCache(model, config), which does it for you. Nothing was cached by this call."
                )
            if isinstance(layer, SpectralLayer):
                _refuse_inexact_lossless(self.config, key_states.dtype)
            if type(layer) is SpectralLayer and not getattr(self, "offloading", False):
                # what Cache.update + SpectralLayer.update do, less the layer's own checkpoint:
                # the one taken here restores it (via _abort_forward) if anything below raises
                self._forward_checkpoints[layer_idx] = ("own", layer.checkpoint())
                layer.update_checkpointed(key_states, value_states)
                keys, values = key_states, value_states
            else:
                self._forward_checkpoints[layer_idx] = _checkpoint(layer)
                keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if isinstance(layer, SpectralLayer):
                abort = self._abort_callable()
                keys = spectral_only(keys, layer_idx, abort)
                values = spectral_only(values, layer_idx, abort)
                register_chunk(keys, layer, abort=abort)
            elif type(layer) is SlidingWindowLayer and layer.has_pending_chunk:
                # a graphed step's full window: attention reads it without the model's mask
                register_chunk(keys, layer, abort=self._abort_callable())
        except BaseException:
            self._abort_forward()
            raise
        return keys, values

    # ------------------------------------------------------------------ atomic forwards
    def layer_lengths(self) -> list[int]:
        """Tokens held per layer (``get_seq_length``); all equal whenever no forward is open."""
        return [layer.get_seq_length() for layer in self.layers]

    def _abort_forward(self) -> None:
        """Roll every layer updated since the current forward began back to its state before it."""
        checkpoints = self._forward_checkpoints
        self._stop_deferring()  # their flags describe what is being rolled back
        errors = []
        for idx in sorted(checkpoints, reverse=True):
            try:
                _rollback(self.layers[idx], checkpoints[idx])
            except Exception as err:  # keep rolling the others back; report below
                errors.append(f"layer {idx}: {err}")
        checkpoints.clear()
        if errors:
            raise RuntimeError("SpectralCache: rollback after a failed forward failed: " + "; ".join(errors))

    def _settle(self) -> bool:
        """Close the open forward: keep it if every layer holds as many tokens, else roll it back.
        Returns whether it had to roll back."""
        if not self._forward_checkpoints:
            return False
        if len(set(self.layer_lengths())) <= 1:
            self._forward_checkpoints.clear()
            return False
        self._abort_forward()
        return True

    def _start_unhooked_forward(self, layer_idx: int) -> None:
        """``update`` of a layer already updated in the open forward: a new forward has begun
        without the enabled model's hooks (or a model updates a layer twice in one forward)."""
        updated = sorted(self._forward_checkpoints)
        if self._hooked_forward:
            self._abort_forward()
            raise RuntimeError(
                f"SpectralCache: layer {layer_idx} was updated twice in one forward (layers updated: "
                f"{updated}); models that update a layer's cache more than once per forward are not "
                "supported. The cache was rolled back to its state before this forward."
            )
        if self._settle():
            raise RuntimeError(
                f"SpectralCache: layer {layer_idx} updated again while the previous forward had updated "
                f"only layers {updated} of {len(self.layers)}: that forward was interrupted. It was rolled "
                "back (every layer holds what it held before it); this call was refused because its "
                "positions were computed from the inconsistent cache -- run it again."
            )

    def _begin_forward(self) -> None:
        """Called (by the hooks ``spectralcache.enable`` installs) before a model forward that reads
        this cache, i.e. before the model computes positions from ``get_seq_length``."""
        if self._hooked_forward:
            # the previous forward through an enabled model never ended (KeyboardInterrupt, ...)
            self._abort_forward()
        else:
            # updates outside a hooked forward (a bare base-model call, manual updates): kept if
            # every layer holds as many tokens, rolled back if that forward stopped part-way.
            # Positions are not computed yet, so this forward then runs on the restored cache.
            self._settle()
        self._forward_checkpoints.clear()
        lengths = set(self.layer_lengths())
        if len(lengths) > 1:
            raise RuntimeError(
                f"SpectralCache: its layers hold different numbers of tokens ({self.layer_lengths()}), so a "
                "forward would compute wrong positions; fill every layer through model forwards (or "
                "crop / reset the cache)"
            )
        self._hooked_forward = True
        # refusals found on the device during this forward are read once, at its end
        checks: list[DeferredCheck] = []
        for layer in self.layers:
            if isinstance(layer, SpectralLayer):
                layer.deferred_checks = checks

    def _stop_deferring(self) -> list[DeferredCheck]:
        """Detach the open forward's deferred checks from the layers; return them."""
        checks: list[DeferredCheck] = []
        for layer in self.layers:
            if isinstance(layer, SpectralLayer) and layer.deferred_checks is not None:
                checks = layer.deferred_checks
                layer.deferred_checks = None
        return checks

    def _end_forward(self, failed: bool) -> None:
        """Called after that forward: keep its updates, or roll them all back if it raised or
        one of its deferred checks failed (one host synchronization reads them all)."""
        self._hooked_forward = False
        if failed:
            self._abort_forward()
            return
        try:
            failure = first_failure(self._stop_deferring())
        except BaseException:
            self._abort_forward()
            raise
        if failure is not None:
            self._abort_forward()
            raise ValueError(f"SpectralCache: {failure}; the forward was refused and the cache is unchanged")
        self._forward_checkpoints.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_forward_checkpoints"] = {}  # only valid within this process' forward
        state["_hooked_forward"] = False
        state.pop("_weak_abort", None)  # a closure (not picklable); rebuilt on first use
        return state

    def _abort_callable(self) -> Any:
        """``_abort_forward`` held weakly (what the handshake stores with each chunk), built once
        per cache instead of three times per layer and step."""
        fn = self.__dict__.get("_weak_abort")
        if fn is None:
            from spectralcache.attention.interface import _weak_callable

            fn = self.__dict__["_weak_abort"] = _weak_callable(self._abort_forward)
        return fn

    def get_seq_length(self, layer_idx: int = 0) -> int:
        import sys

        if "unsloth" in sys.modules:
            # Unsloth's fast path asks a cache its length and then drops it; this is the one
            # point where a cache built from a config (no model hooks) can refuse that
            # (integrations/guard.py). Host-only check, no device sync.
            from spectralcache.integrations.guard import refuse_unsloth_fast_path_caller

            refuse_unsloth_fast_path_caller(self, frames_up=2)
        return super().get_seq_length(layer_idx)

    def reset(self) -> None:
        self._forward_checkpoints.clear()
        super().reset()

    def crop(self, max_length: int) -> None:
        self._settle_between_forwards()
        super().crop(max_length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._settle_between_forwards()
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._settle_between_forwards()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._settle_between_forwards()
        super().batch_select_indices(indices)

    def _settle_between_forwards(self) -> None:
        # these operations invalidate layer checkpoints: close the open forward first (rolling
        # back one that was interrupted, recognisable by unequal layer lengths)
        self._settle()
        self._forward_checkpoints.clear()

    def to(
        self,
        device_or_dtype: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> SpectralCache:
        """Move every layer's tensors (compressed and transformers' own layers) to ``device``
        and / or convert them to ``dtype``: ``cache.to("cuda")``, ``cache.to(torch.bfloat16)``,
        ``cache.to("cuda", torch.bfloat16)``. A filled cache converts its exact tiers (landmarks,
        hot, outliers, 16-bit coefficients) and bases; integer coefficients, float16 scales and
        indices keep their dtype. Returns self."""
        if isinstance(device_or_dtype, torch.dtype):
            if dtype is not None:
                raise TypeError("SpectralCache.to: dtype given twice")
            dtype = device_or_dtype
        elif device_or_dtype is not None:
            if device is not None:
                raise TypeError("SpectralCache.to: device given twice")
            device = device_or_dtype
        if dtype is not None and not dtype.is_floating_point:  # refused before any layer moves
            raise TypeError(f"SpectralCache.to: unsupported dtype {dtype} (keys/values are floating point)")
        target = None if device is None else torch.device(device)
        self._settle_between_forwards()
        for layer in self.layers:
            if isinstance(layer, SpectralLayer):
                layer.to(target, dtype)
                continue
            old_dtype = getattr(layer, "dtype", None)
            if old_dtype is None and isinstance(getattr(layer, "keys", None), torch.Tensor):
                old_dtype = layer.keys.dtype
            moved = {}
            for name, x in vars(layer).items():
                if isinstance(x, torch.Tensor):
                    convert = dtype is not None and x.is_floating_point() and x.dtype == old_dtype
                    moved[name] = x.to(device=target, dtype=dtype if convert else x.dtype)
            for name, x in moved.items():
                setattr(layer, name, x)
            if target is not None and hasattr(layer, "device"):
                layer.device = target
            if dtype is not None and hasattr(layer, "dtype"):
                layer.dtype = dtype
        return self

    # ------------------------------------------------------------------ reporting
    def compression_stats(self) -> dict[str, Any]:
        """Block compression cost, kept apart from decode: it is paid once per ``block_size``
        tokens per layer (amortized), or in one batched call per layer during prefill."""
        calls = [
            c for layer in self.layers if isinstance(layer, SpectralLayer) for c in layer.compression_calls
        ]
        blocks = sum(n for n, _ in calls)
        seconds = sum(float(s) for _, s in calls)
        return {
            "calls": len(calls),
            "blocks": blocks,
            "seconds": seconds,
            "seconds_per_block": seconds / blocks if blocks else None,
        }

    def memory_report(self) -> dict[str, Any]:
        """Bytes actually held, per tier and layer, measured from tensor storage.

        Measured with :func:`spectralcache.cache.memory.held_bytes`: each distinct storage is
        counted once (``untyped_storage().nbytes()``, so a view pins and is charged its whole
        parent storage), and preallocated capacity counts, because it is allocated:
        ``held_bytes`` / ``tiers`` are what is allocated, ``used_bytes`` / ``tiers_used`` the live
        data (``numel * element_size`` of the views ``state()`` hands out). ``dynamic_bytes`` is what a ``DynamicCache``
        holds for the same tokens: two compact ``[B, H, seq_len, D]`` tensors in the model dtype
        (uncompressed and sliding layers are transformers' own layer classes, so for them it is
        their measured bytes). ``ratio`` =
        held / dynamic. ``cold_blocks`` (and per layer ``cold_ratio``) is the compressed tier alone
        against the same tokens held exact: the whole-layer ratio also carries the exact
        landmarks and hot buffer (between ``hot_size`` and ``hot_size + block_size - 1`` tokens),
        so it approaches ``cold_ratio`` only as the context grows. Also reports
        block-compression time (amortized, separate from decode).

        It is also a natural sync point: a NaN/inf stored by a decode step raises here
        (``SpectralLayer.check_finite``).
        """
        for layer in self.layers:
            if isinstance(layer, SpectralLayer):
                layer.check_finite()
        seen: set[tuple[str, int]] = set()

        def held(tensors: list[torch.Tensor]) -> int:
            return held_bytes(*tensors, seen=seen)

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
                used = {name: logical_bytes(*ts) for name, ts in layer.tier_used_tensors().items()}
                entry["tiers_used"] = used
                entry["used_bytes"] = sum(used.values())
                per_token = 0  # bytes a DynamicLayer holds per cached token (K and V)
                if layer.is_initialized:
                    itemsize = torch.empty((), dtype=layer.dtype).element_size()
                    per_token = 2 * layer.batch_size * layer.num_kv_heads * layer.head_dim * itemsize
                dyn = per_token * layer.get_seq_length()
                # the cold tier alone, against the same tokens held exact
                cold_bytes = sum(tiers[name] for name in COLD_TIERS)
                # a re-blocked layer (compress_tail) has its own block length
                cold_dyn = per_token * layer.num_blocks * layer.block_size
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
