"""Stand-in for unsloth.models.llama 2026.10.9: gated fast forwards and ``unsloth_fast_generate``.

``FastLanguageModel.pre_patch`` replaces, on the transformers classes of Llama / Mistral /
Qwen2 / Qwen3, ``*Attention.forward``, ``*ForCausalLM.forward`` and
``prepare_inputs_for_generation`` with Unsloth's, each wrapped by ``_gated_method``: the fast
function runs only on modules whose ``_unsloth_fast_path`` is true
(``mark_unsloth_fast_path``), the transformers original otherwise. As in the real code the
fast path never hands the caller's ``Cache`` to the layers: an empty cache is dropped in
``prepare_inputs_for_generation``, and ``CausalLM_fast_forward`` runs the layers on a copy
rebuilt from legacy tuples (``_cache_as_legacy_tuple``), so a SpectralCache stays empty.
"""

from __future__ import annotations

import functools
import importlib
import types

from transformers.cache_utils import Cache, DynamicCache
from unsloth_zoo.temporary_patches.gemma import sdpa_attention_forward

_MISSING = object()
_CACHE_NAMES = ("cache", "past_key_values")
FAMILIES = {
    "llama": ("LlamaAttention", "LlamaForCausalLM"),
    "mistral": ("MistralAttention", "MistralForCausalLM"),
    "qwen2": ("Qwen2Attention", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Attention", "Qwen3ForCausalLM"),
}
_ORIGINALS: dict[tuple[type, str], object] = {}


def _gated_method(cls, name, fast, original):
    @functools.wraps(fast)
    def gated(self, *args, **kwargs):
        if getattr(self, "_unsloth_fast_path", False):
            return fast(self, *args, **kwargs)
        if original is _MISSING:
            return getattr(super(cls, self), name)(*args, **kwargs)
        return original(self, *args, **kwargs)

    gated._unsloth_gated = True
    return gated


def mark_unsloth_fast_path(model):
    for module in model.modules():
        module._unsloth_fast_path = True


def _cache_kw(kwargs):
    for name in _CACHE_NAMES:
        if name in kwargs:
            return name
    return "past_key_values"


def _cache_as_legacy_tuple(cache):
    if not isinstance(cache, Cache):
        return cache
    if cache.get_seq_length() == 0:
        return None
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def LlamaAttention_fast_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs
):
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return sdpa_attention_forward(self, hidden_states, position_embeddings, attention_mask, cache)


def CausalLM_fast_forward(original):
    # Explicit cache parameters, as the real one has (there only `past_key_values`, transformers
    # <= 5.17; `cache` added so the stand-in also runs on transformers 5.24, which renamed it).
    def _CausalLM_fast_forward(
        self, input_ids=None, attention_mask=None, past_key_values=None, cache=None, **kwargs
    ):
        given = cache if cache is not None else past_key_values
        legacy = _cache_as_legacy_tuple(given)
        rebuilt = None
        if legacy is not None:
            rebuilt = DynamicCache(config=self.config)
            for i, (k, v) in enumerate(legacy):
                rebuilt.update(k, v, i)
        if given is not None:
            kwargs["cache" if cache is not None else "past_key_values"] = rebuilt
        return original(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    return _CausalLM_fast_forward


def _fast_prepare_inputs_for_generation(original):
    def prepare(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        name = _cache_kw(kwargs)
        cache = kwargs.get(name)
        if cache is not None and cache.get_seq_length() == 0:
            kwargs[name] = None
        return original(self, input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)

    return prepare


def unsloth_fast_generate(self, *args, **kwargs):
    if all(kwargs.get(name) is None for name in _CACHE_NAMES):
        kwargs["cache_implementation"] = "dynamic"
    return self._old_generate(*args, **kwargs)


def _gate(cls, name, fast):
    original = vars(cls).get(name, _MISSING)
    _ORIGINALS.setdefault((cls, name), original)
    setattr(cls, name, _gated_method(cls, name, fast, original))


def _restore_pre_patch():
    for (cls, name), original in _ORIGINALS.items():
        if original is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    _ORIGINALS.clear()


class FastLanguageModel:
    @staticmethod
    def pre_patch(model_type):
        modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        attention, causal_lm = (getattr(modeling, n) for n in FAMILIES[model_type])
        if (attention, "forward") in _ORIGINALS:
            return
        _gate(attention, "forward", LlamaAttention_fast_forward)
        _gate(causal_lm, "forward", CausalLM_fast_forward(causal_lm.forward))
        _gate(
            causal_lm,
            "prepare_inputs_for_generation",
            _fast_prepare_inputs_for_generation(causal_lm.prepare_inputs_for_generation),
        )

    @staticmethod
    def from_model(model):
        """What ``from_pretrained`` does to a loaded model, for a model built in code."""
        FastLanguageModel.pre_patch(model.config.model_type)
        mark_unsloth_fast_path(model)
        model._old_generate = model.generate
        model.generate = types.MethodType(unsloth_fast_generate, model)
        return model

    @staticmethod
    def get_peft_model(model, **_):
        """The part of ``get_peft_model`` that matters here: every module re-marked."""
        mark_unsloth_fast_path(model)
        return model
