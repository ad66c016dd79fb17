"""Atomic forwards: a forward refused or failing part-way leaves every layer as before it.

Before, a forward refused at layer i (NaN in layer 1's keys, ``output_attentions=True``, a dtype
change, any error raised in the model) left layers ``< i`` one chunk longer than the others; the
next call then read positions from the longer layer 0 and returned silently wrong logits (tiny
Llama: max |dlogit| 5.6 after a refused NaN or ``output_attentions`` call; tiny Gemma 3: 0.5),
or kept failing. Each case here checks that the refused call raises, that every layer holds what
it held before it, and that the next call returns exactly the logits of a cache that never saw
the refused call -- and, with an exact (identity, 16-bit) configuration, exactly DynamicCache's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from tests.tiny_models import tiny_model, tiny_prompt
from transformers import DynamicCache

from spectralcache import SpectralCache, SpectralConfig
from spectralcache.cache.deferred import deferring
from spectralcache.integrations.transformers import enable

MODELS = ("llama", "gemma3")

# every tier exact: identity codecs with 16-bit rows (attention runs DynamicCache's SDPA call)
EXACT = SpectralConfig(
    block_size=16,
    hot_size=4,
    landmarks=2,
    outliers_per_block=2,
    key_codec="identity",
    value_codec="identity",
    rank_keys=None,
    rank_values=None,
    coeff_bits=16,
)
# lossy: low-rank int8 blocks read by the spectral path
LOSSY = SpectralConfig(
    block_size=16, hot_size=4, landmarks=2, outliers_per_block=2, rank_keys=8, rank_values=8
)
PROMPT, CHUNK = 100, 5


class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception, so torch's always-call hooks do not see it."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {name: tiny_model(name) for name in MODELS}


def raise_in(module: torch.nn.Module, error: BaseException):
    def hook(*_):
        raise error

    return module.register_forward_pre_hook(hook)


def nan_into(decoder_layer: torch.nn.Module):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * float("nan"), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * float("nan")}

    return decoder_layer.register_forward_pre_hook(hook, with_kwargs=True)


def refuse_nan_after_layer0(model, cache, ids):
    handle = nan_into(model.model.layers[1])
    try:
        with pytest.raises(ValueError, match=r"layer 1: .*NaN or inf"):
            model(ids, past_key_values=cache, use_cache=True)
    finally:
        handle.remove()


def refuse_output_attentions(model, cache, ids):
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, past_key_values=cache, use_cache=True, output_attentions=True)


def refuse_dtype_change(model, cache, ids):
    # the same weights in bfloat16 (converting `model` back and forth would round its weights)
    half = enable(tiny_model(model.config.model_type.replace("_text", ""), dtype=torch.bfloat16))
    with pytest.raises((ValueError, RuntimeError), match="dtype"):
        half(ids, past_key_values=cache, use_cache=True)


def refuse_error_in_model(model, cache, ids):
    handle = raise_in(model.model.layers[1].mlp, RuntimeError("boom in layer 1's MLP"))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            model(ids, past_key_values=cache, use_cache=True)
    finally:
        handle.remove()


def refuse_interrupt(model, cache, ids):
    # torch runs no hook after a BaseException: layer 0 stays updated until the next forward
    handle = raise_in(model.model.layers[0].mlp, Interrupt())
    try:
        with pytest.raises(Interrupt):
            model(ids, past_key_values=cache, use_cache=True)
    finally:
        handle.remove()


def refuse_bare_base_model_error(model, cache, ids):
    # the decoder called directly: no model-level hook sees the error
    handle = raise_in(model.model.layers[0].mlp, RuntimeError("boom in the base model"))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            model.model(ids, past_key_values=cache, use_cache=True)
    finally:
        handle.remove()


CASES: dict[str, Callable] = {
    "nan_after_layer0": refuse_nan_after_layer0,
    "output_attentions": refuse_output_attentions,
    "dtype_change": refuse_dtype_change,
    "error_in_model": refuse_error_in_model,
    "interrupt": refuse_interrupt,
    "bare_base_model_error": refuse_bare_base_model_error,
}


def logits_after(model, cache, prompt, chunk) -> torch.Tensor:
    model(prompt, past_key_values=cache, use_cache=True)
    return model(chunk, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("deferred", [False, True], ids=["checks_at_once", "checks_deferred"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("cfg", [EXACT, LOSSY], ids=["exact", "lossy"])
def test_refused_forward_leaves_cache_unchanged(
    models, name: str, case: str, cfg: SpectralConfig, deferred: bool
) -> None:
    """``deferred``: checks read at the forward's end, as on CUDA (cache/deferred.py)."""
    model = models[name]
    prompt, chunk = tiny_prompt(1, PROMPT, seed=1), tiny_prompt(1, CHUNK, seed=2)
    cache = SpectralCache(model, cfg)
    with torch.no_grad(), deferring() if deferred else contextlib.nullcontext():
        model(prompt, past_key_values=cache, use_cache=True)
        assert any(getattr(layer, "num_blocks", 0) for layer in cache.layers)
        before = cache.layer_lengths()
        CASES[case](model, cache, chunk)
        if case in ("interrupt", "bare_base_model_error"):
            # no hook saw the error: layer 0 is ahead until the next forward repairs it
            assert cache.layer_lengths() != before
        else:
            assert cache.layer_lengths() == before
        got = model(chunk, past_key_values=cache, use_cache=True).logits
        assert cache.layer_lengths() == [n + CHUNK for n in before]
        want = logits_after(model, SpectralCache(model, cfg), prompt, chunk)
        assert torch.equal(got, want), float((got - want).abs().max())
        if cfg is EXACT:
            dynamic = logits_after(model, DynamicCache(config=model.config), prompt, chunk)
            assert torch.equal(got, dynamic), float((got - dynamic).abs().max())


@pytest.mark.parametrize("name", MODELS)
def test_next_bare_call_after_an_unseen_interruption_raises_then_works(models, name: str) -> None:
    """Without the model-level hooks the next ``update`` finds layers of unequal lengths after
    positions were computed from them: it rolls back and refuses that call; the one after works."""
    model = models[name]
    prompt, chunk = tiny_prompt(1, PROMPT, seed=3), tiny_prompt(1, CHUNK, seed=4)
    cache = SpectralCache(model, LOSSY)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        before = cache.layer_lengths()
        refuse_bare_base_model_error(model, cache, chunk)
        with pytest.raises(RuntimeError, match=r"interrupted.*rolled back.*run it again"):
            model.model(chunk, past_key_values=cache, use_cache=True)
        assert cache.layer_lengths() == before
        got = model(chunk, past_key_values=cache, use_cache=True).logits
        want = logits_after(model, SpectralCache(model, LOSSY), prompt, chunk)
    assert torch.equal(got, want)


def test_generate_after_a_refused_call_equals_dynamic_cache(models) -> None:
    """The user's path: a refused call, then generate with the same cache."""
    model = models["gemma3"]
    prompt = tiny_prompt(1, PROMPT, seed=5)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    cache = SpectralCache(model, EXACT)
    with torch.no_grad():
        model(prompt[:, :-1], past_key_values=cache, use_cache=True)
        refuse_output_attentions(model, cache, prompt[:, -1:])
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :-1], past_key_values=dynamic, use_cache=True)
    got = model.generate(prompt, past_key_values=cache, **kw)
    want = model.generate(prompt, past_key_values=dynamic, **kw)
    assert torch.equal(got, want)


def test_layer_checkpoint_restores_transformers_layers(models) -> None:
    """DynamicLayer / DynamicSlidingWindowLayer are rolled back from a snapshot of their attributes:
    valid because their update replaces keys/values (torch.cat) instead of writing into them."""
    from spectralcache.cache.cache import _checkpoint, _rollback

    cache = SpectralCache(models["gemma3"].config, LOSSY)
    sliding = cache.layers[0]
    k = torch.randn(1, 1, 70, 64)
    sliding.update(k, k)
    keys, values, n = sliding.keys, sliding.values, sliding.get_seq_length()
    snapshot_keys = keys.clone()
    token = _checkpoint(sliding)
    sliding.update(k[:, :, :3], k[:, :, :3])
    assert sliding.get_seq_length() == n + 3 and sliding.keys is not keys
    assert torch.equal(keys, snapshot_keys)  # not written into
    _rollback(sliding, token)
    assert sliding.keys is keys and sliding.values is values and sliding.get_seq_length() == n


def test_hooks_installed_once_and_removed_by_disable() -> None:
    from spectralcache.integrations.transformers import _FORWARD_HOOKS, disable

    model = tiny_model("llama")
    enable(model)
    enable(model)
    assert SpectralCache(model, LOSSY) is not None  # enables again: still one pair of hooks
    mine = [h for h in model._forward_pre_hooks.values() if getattr(h, "__name__", "") == "_begin_forward"]
    assert len(mine) == 1 and getattr(model, _FORWARD_HOOKS, None) is not None
    disable(model)
    assert getattr(model, _FORWARD_HOOKS, None) is None
    assert not [
        h for h in model._forward_pre_hooks.values() if getattr(h, "__name__", "") == "_begin_forward"
    ]


def test_layer_updated_twice_in_one_forward_is_refused_and_rolled_back(models) -> None:
    cache = SpectralCache(models["llama"].config, LOSSY)
    k = torch.randn(1, 2, 20, 32)
    cache._begin_forward()  # what the hooks of an enabled model do around its forward
    cache.update(k, k, 0)
    cache.update(k, k, 1)  # every layer updated once: lengths agree, yet the forward is not over
    with pytest.raises(RuntimeError, match="updated twice in one forward"):
        cache.update(k, k, 0)
    assert cache.layer_lengths() == [0, 0]
    cache._end_forward(failed=True)
    assert cache.layer_lengths() == [0, 0]


def test_out_of_range_layer_rolls_back_the_forward(models) -> None:
    cache = SpectralCache(models["llama"].config, LOSSY)
    k = torch.randn(1, 2, 20, 32)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="out of range"):
        cache.update(k, k, 2)
    assert cache.layer_lengths() == [0, 0]
