"""spectralcache.integrations.unsloth against the Unsloth stand-in (tests/unsloth_standin).

The real unsloth 2026.10.9 imports on CPU (``UNSLOTH_ALLOW_CPU=1``) but cannot load a model
there and pins transformers <= 5.17, so CI (transformers 5.24) runs these tests against a
stand-in with the same flags, gates and forward replacements (see its README); the real
package is exercised on the GPU by ``benchmarks/unsloth_check.py``. Also here: the
"never silently bypassed" guard on plain transformers models and the cache-argument helper.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from spectralcache import SpectralCache, SpectralConfig
from spectralcache.integrations import guard
from spectralcache.integrations.compat import cache_argument, cache_kwargs, passed_cache
from spectralcache.integrations.unsloth import (
    UnslothInferenceError,
    UnslothLayoutError,
    last_spectral_cache,
    patch_unsloth_attention,
    resolve_config,
    unpatch_unsloth_attention,
    unsloth_inference_paths,
)
from tiny_models import tiny_model, tiny_prompt

STANDIN = Path(__file__).resolve().parents[1] / "unsloth_standin"
NAMES = ("llama", "qwen3", "gemma3")
PROMPT, NEW = 200, 12
# Small blocks so that the prompt really is compressed (4 full-rank blocks per layer).
SMALL = dict(block_size=32, hot_buffer_size=16, landmarks=4)


def _greedy(model, ids, **kwargs) -> list[int]:
    out = model.generate(
        ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """Plain transformers greedy tokens (DynamicCache), computed before the stand-in patches anything."""
    assert not any(m.split(".")[0].startswith("unsloth") for m in sys.modules), "unsloth already imported"
    ids = tiny_prompt(1, PROMPT)
    return {name: _greedy(tiny_model(name), ids) for name in NAMES}


@pytest.fixture
def unsloth():
    if any(m.split(".")[0].startswith("unsloth") for m in sys.modules):
        pytest.skip("a real unsloth is imported in this process")
    sys.path.insert(0, str(STANDIN))
    try:
        import unsloth as standin

        assert standin.__file__.startswith(str(STANDIN))
        yield standin
    finally:
        if "unsloth" in sys.modules:
            sys.modules["unsloth"]._standin_restore()
        sys.path.remove(str(STANDIN))
        for name in [m for m in sys.modules if m.split(".")[0].startswith("unsloth")]:
            del sys.modules[name]  # unsloth, unsloth_zoo and the compiler-output stand-in


def _load(unsloth, name: str) -> torch.nn.Module:
    model = tiny_model(name)
    if name == "gemma3":
        return unsloth.FastModel.from_model(model)
    return unsloth.FastLanguageModel.from_model(model)


@pytest.mark.parametrize("name", NAMES)
def test_patched_lossless_generation_equals_transformers(unsloth, reference, name: str) -> None:
    ids = tiny_prompt(1, PROMPT)
    model = _load(unsloth, name)
    assert unsloth_inference_paths(model), "the stand-in must take over inference"
    if name != "gemma3":  # FastModel's forced static cache does not run on this tiny config
        assert _greedy(model, ids) == reference[name]  # plain (stand-in) Unsloth
    patch_unsloth_attention(model, "lossless", **SMALL)
    assert unsloth_inference_paths(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the library's own calls use the preferred name
        got = _greedy(model, ids)
    assert got == reference[name]
    cache = last_spectral_cache(model)
    assert isinstance(cache, SpectralCache)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    assert cache.compression_stats()["blocks"] > 0  # the prompt went through compressed blocks
    # a second call builds a fresh cache and gives the same tokens
    assert _greedy(model, ids) == reference[name]
    assert last_spectral_cache(model) is not cache


def test_patched_default_preset_compresses(unsloth) -> None:
    model = _load(unsloth, "llama")
    patch_unsloth_attention(model, block_size=128, hot_size=16, outliers_per_block=2)
    _greedy(model, tiny_prompt(1, 600))
    cache = last_spectral_cache(model)
    # 600 prompt tokens, 16 landmarks, 16 hot: 4 full 128-token blocks per layer and the partial tail
    # (compress_tail, on in the default preset) as a fifth
    assert cache.config.block_size == 128 and cache.compression_stats()["blocks"] == 2 * 5
    assert cache.memory_report()["compressed_layers"]["ratio"] < 0.5  # held / DynamicCache bytes


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_unpatched_unsloth_model_with_spectral_cache_raises(unsloth, name: str) -> None:
    model = _load(unsloth, name)
    with pytest.raises(UnslothInferenceError, match=r"Unsloth.*2026\.10\.9.*patch_unsloth_attention"):
        SpectralCache(model, "lossless")


def test_cache_given_to_patched_generate_and_cache_implementation(unsloth, reference) -> None:
    ids = tiny_prompt(1, PROMPT)
    model = _load(unsloth, "qwen3")
    patch_unsloth_attention(model, "lossless", **SMALL)
    mine = SpectralCache(model, resolve_config("lossless", **SMALL))
    assert _greedy(model, ids, past_key_values=mine) == reference["qwen3"]
    assert last_spectral_cache(model) is mine and mine.get_seq_length() == PROMPT + NEW - 1
    # generate(cache_implementation="spectral", cache_config=...) on a patched model
    assert (
        _greedy(model, ids, cache_implementation="spectral", cache_config=resolve_config("lossless", **SMALL))
        == (reference["qwen3"])
    )
    with pytest.raises(ValueError, match="not both"):
        _greedy(model, ids, cache=mine, past_key_values=mine)


def test_get_peft_model_re_marks_and_patch_again(unsloth, reference) -> None:
    ids = tiny_prompt(1, PROMPT)
    model = _load(unsloth, "llama")
    patch_unsloth_attention(model, "lossless", **SMALL)
    model = unsloth.FastLanguageModel.get_peft_model(model)  # re-marks every module
    with pytest.raises(UnslothInferenceError, match="_unsloth_fast_path"):
        _greedy(model, ids)
    # a direct forward with a config-built SpectralCache is refused (Unsloth's fast path asks for it)
    cache = SpectralCache(model.config, resolve_config("lossless", **SMALL))
    with pytest.raises(guard.SpectralCacheBypassedError, match="_unsloth_fast_path=True"):
        model(ids, **cache_kwargs(model, cache))
    patch_unsloth_attention(model, "lossless", **SMALL)
    assert _greedy(model, ids) == reference["llama"]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_config_built_cache_given_to_unpatched_unsloth_raises(unsloth, reference, name: str) -> None:
    """A cache built from a config installs no hooks; Unsloth's fast path drops it before any
    forward sees it (before the fix: generate returned plain Unsloth's tokens, the cache stayed
    empty). It must raise instead, from generate and from a direct forward, and lose nothing."""
    ids = tiny_prompt(1, PROMPT)
    model = _load(unsloth, name)
    cache = SpectralCache(model.config, resolve_config("lossless", **SMALL))
    assert not guard.is_attached(model)
    with pytest.raises(guard.SpectralCacheBypassedError, match=r"Unsloth.*patch_unsloth_attention"):
        _greedy(model, ids, **cache_kwargs(model, cache))
    with torch.no_grad(), pytest.raises(guard.SpectralCacheBypassedError, match="_unsloth_fast_path=True"):
        model(ids, **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 0  # nothing was written
    # the fix the message names: patched, the same cache is used and gives transformers' tokens
    patch_unsloth_attention(model, "lossless", **SMALL)
    assert _greedy(model, ids, **cache_kwargs(model, cache)) == reference[name]
    assert last_spectral_cache(model) is cache and cache.get_seq_length() == PROMPT + NEW - 1


def test_config_built_cache_on_plain_model_with_unsloth_imported(unsloth, reference) -> None:
    """Unsloth imported (its gates on the transformers classes) but a plain transformers model:
    a config-built cache works as before -- the gates run the originals, nothing is refused."""
    import spectralcache

    ids = tiny_prompt(1, PROMPT)
    unsloth.FastLanguageModel.pre_patch("llama")  # class-wide gates, as loading any Llama does
    model = tiny_model("llama")  # not marked: Unsloth's fast path is off for this instance
    assert unsloth_inference_paths(model) == []
    spectralcache.enable(model)
    cache = SpectralCache(model.config, resolve_config("lossless", **SMALL))
    assert _greedy(model, ids, **cache_kwargs(model, cache)) == reference["llama"]
    assert cache.get_seq_length() == PROMPT + NEW - 1 and cache.compression_stats()["blocks"] > 0


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_unpatch_restores_unsloth(unsloth, name: str) -> None:
    model = _load(unsloth, name)
    before = unsloth_inference_paths(model)
    unsloth_generate = model.generate.__func__
    patch_unsloth_attention(model, "lossless")
    assert model.config._attn_implementation == "spectral" and guard.is_attached(model)
    unpatch_unsloth_attention(model)
    assert unsloth_inference_paths(model) == before
    assert model.generate.__func__ is unsloth_generate
    assert model.config._attn_implementation == "sdpa" and not guard.is_attached(model)


def _swap_attention_class(model, class_name: str) -> None:
    """Every attention module becomes an instance of a copy that does not derive from the
    transformers class (as compiled copies of a modeling file do), forward = Unsloth's."""
    from unsloth_zoo.temporary_patches.gemma import forward_past_key_values

    copy = type(class_name, (torch.nn.Module,), {"forward": forward_past_key_values})
    copy.__module__ = "unsloth_compiled_module_gemma3"
    for layer in model.model.layers:
        layer.self_attn.__class__ = copy


def test_compiled_attention_copy_gets_transformers_forward(unsloth, reference) -> None:
    model = _load(unsloth, "gemma3")
    _swap_attention_class(model, "Gemma3Attention")
    patch_unsloth_attention(model, "lossless", **SMALL)
    assert _greedy(model, tiny_prompt(1, PROMPT)) == reference["gemma3"]


def test_fastmodel_compiled_model_class(unsloth, reference) -> None:
    """FastModel's real Gemma 3 270M is an instance of the compiler's copy of Gemma3ForCausalLM,
    for which transformers' source heuristic says attention cannot be switched (the H100 run:
    patch_unsloth_attention raised "does not route attention through transformers'
    AttentionInterface"). Patched, the instance answers for itself; unpatched, it stops."""
    model = unsloth.FastModel.from_model(tiny_model("gemma3"), compiled_classes=True)
    assert type(model).__module__ == "unsloth_compiled_module_gemma3"
    assert not type(model)._can_set_attn_implementation()
    assert unsloth_inference_paths(model)
    patch_unsloth_attention(model, "lossless", **SMALL)
    assert model.config._attn_implementation == "spectral" and unsloth_inference_paths(model) == []
    assert _greedy(model, tiny_prompt(1, PROMPT)) == reference["gemma3"]
    assert last_spectral_cache(model).compression_stats()["blocks"] > 0
    unpatch_unsloth_attention(model)
    assert model.config._attn_implementation == "sdpa" and unsloth_inference_paths(model)
    assert "_can_set_attn_implementation" not in vars(model)
    assert not type(model)._can_set_attn_implementation()  # the class was never touched
    # a cache on the unpatched compiled model names Unsloth and the fix, not the attention layout
    with pytest.raises(UnslothInferenceError, match="patch_unsloth_attention"):
        SpectralCache(model, "lossless")


def test_unrecognised_layout_names_the_version(unsloth) -> None:
    model = _load(unsloth, "gemma3")
    _swap_attention_class(model, "FusedAttention")  # no transformers class of that name
    with pytest.raises(UnslothLayoutError, match=r"unsloth 2026\.10\.9\+standin"):
        patch_unsloth_attention(model, "lossless")
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)  # nothing half-patched
    assert model.config._attn_implementation != "spectral"


def test_prototype_keyword_aliases() -> None:
    cfg = resolve_config("lowrank", block_size=256, k_rank_keys=16, k_rank_values=32, hot_buffer_size=48)
    assert (cfg.block_size, cfg.rank_keys, cfg.rank_values, cfg.hot_size) == (256, 16, 32, 48)
    with pytest.raises(TypeError, match="unknown option 'k_rank'"):
        resolve_config("default", k_rank=3)
    with pytest.raises(TypeError, match="both set 'hot_size'"):
        resolve_config("default", hot_size=8, hot_buffer_size=8)


# ---------------------------------------------------------------------- guard on plain transformers
def test_guard_raises_when_attention_did_not_read_the_cache() -> None:
    """Attention switched away behind enable()'s back: the read is refused (the cache's own
    handshake) or, where nothing was read at all, the guard's "never read" check fires."""
    model = tiny_model("llama")
    cache = SpectralCache(model, resolve_config("lossless", **SMALL))
    model.config._attn_implementation = "sdpa"
    with torch.no_grad(), pytest.raises(RuntimeError, match="spectral attention"):
        model(tiny_prompt(1, 40), **cache_kwargs(model, cache))


def test_guard_raises_when_a_layer_ignores_the_cache_output() -> None:
    model = tiny_model("llama")
    cache = SpectralCache(model, resolve_config("lossless", **SMALL))
    attn = model.model.layers[0].self_attn

    def update_and_ignore(module, args, kwargs):  # cache.update() called, its result never read
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        kv = torch.zeros(hidden.shape[0], 2, hidden.shape[1], 32)
        cache.update(kv, kv, module.layer_idx)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        return args, {**kwargs, cache_argument(module): None}

    handle = attn.register_forward_pre_hook(update_and_ignore, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(guard.SpectralCacheBypassedError, match="never read"):
            model(tiny_prompt(1, 40), **cache_kwargs(model, cache))
    finally:
        handle.remove()


def test_guard_raises_when_the_cache_is_dropped() -> None:
    model = tiny_model("llama")
    cache = SpectralCache(model, "lossless")

    def drop(module, args, kwargs):  # something that swaps the caller's cache for its own
        for name in ("cache", "past_key_values"):
            if name in kwargs:
                kwargs[name] = DynamicCache(config=module.config)
        return args, kwargs

    handle = model.model.register_forward_pre_hook(drop, with_kwargs=True)
    try:
        with (
            torch.no_grad(),
            pytest.raises(guard.SpectralCacheBypassedError, match="received no keys/values"),
        ):
            model(tiny_prompt(1, 40), **cache_kwargs(model, cache))
    finally:
        handle.remove()
    with torch.no_grad():  # the same model and cache work once nothing interferes
        model(tiny_prompt(1, 40), **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 40


def test_guard_quiet_for_other_caches_and_use_cache_false() -> None:
    model = tiny_model("llama")
    SpectralCache(model, "lossless")  # enables + attaches
    ids = tiny_prompt(1, 20)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, DynamicCache(config=model.config)))
        model(ids)
        model(ids, use_cache=False, **cache_kwargs(model, SpectralCache(model, "lossless")))


# ---------------------------------------------------------------------- cache argument helper
def test_cache_argument_follows_the_installed_transformers() -> None:
    import inspect

    model = tiny_model("llama")
    params = inspect.signature(type(model).forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert cache_argument(model) == expected == cache_argument()
    cache = SpectralCache(model, "lossless")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            model(tiny_prompt(1, 20), **cache_kwargs(model, cache))
    assert passed_cache({"past_key_values": cache}) is cache and passed_cache({}) is None


def test_standin_config_is_spectralconfig() -> None:
    assert isinstance(resolve_config(SpectralConfig(block_size=64)), SpectralConfig)
    with pytest.raises(TypeError, match="preset name"):
        resolve_config(3)


def test_eval_calls_emit_no_future_warning() -> None:
    """The library's own model calls use the preferred cache keyword (no FutureWarning on 5.24)."""
    from spectralcache.eval.perplexity import score_segment
    from spectralcache.eval.runner import prefill

    model = tiny_model("llama")
    ids = tiny_prompt(1, 80)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            prefill(model, SpectralCache(model, "lossless"), ids, chunk=32)
            result = score_segment(model, SpectralCache(model, "lossless"), ids[0].tolist(), 40)
    assert result.tokens == 80 - 40  # every continuation token scored
