"""SpectralCache inside real transformers models (tiny random weights, built in code).

At full rank with unquantized coefficients the compressed cache is lossless up to float
rounding, so greedy generation must be token-identical to ``DynamicCache``: any slip in
masks, cache indices, RoPE, GQA, chunk handling or tier bookkeeping changes tokens.
Blocks of 128 tokens make a 1500-token prompt span ~10 compressed blocks per layer.
"""

from __future__ import annotations

import pytest
import torch
from tests.tiny_models import MODEL_NAMES, tiny_model, tiny_prompt
from transformers import DynamicCache

import spectralcache
from spectralcache import SpectralCache, SpectralConfig
from spectralcache.integrations.transformers import disable, enable, is_enabled

PROMPT = 1500
NEW = 64
KEY_SPACES = ("post_rope", "pre_rope")


def lossless(key_space: str, **overrides) -> SpectralConfig:
    """Full rank, 16-bit coefficients, a few outliers (exact anyway) so that path runs too."""
    fields = dict(
        block_size=128,
        hot_size=32,
        landmarks=8,
        outliers_per_block=4,
        key_space=key_space,
        rank_keys=None,
        rank_values=None,
        coeff_bits=16,
        svd_method="exact",
        refit_after_outliers=False,
        basis_dtype="model",
    )
    fields.update(overrides)
    return SpectralConfig(**fields)


def lossy(key_space: str = "post_rope", **overrides) -> SpectralConfig:
    fields = dict(
        block_size=128, hot_size=32, landmarks=8, outliers_per_block=8, rank_keys=16, rank_values=16
    )
    fields.update(key_space=key_space, **overrides)
    return SpectralConfig(**fields)


def greedy(model, ids, cache, attention_mask=None, new=NEW) -> torch.Tensor:
    out = model.generate(
        ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


def compressed_blocks(cache) -> int:
    return sum(entry.get("num_blocks", 0) for entry in cache.memory_report()["layers"])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {name: tiny_model(name) for name in MODEL_NAMES}


@pytest.mark.parametrize("key_space", KEY_SPACES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_rank_greedy_equals_dynamic_cache(models, name: str, key_space: str) -> None:
    model = models[name]
    disable(model)
    ids = tiny_prompt(1, PROMPT, seed=len(name))
    want = greedy(model, ids, DynamicCache(config=model.config))
    cache = SpectralCache(model, lossless(key_space))
    assert is_enabled(model)  # constructing the cache with the model switched attention on
    got = greedy(model, ids, cache)
    assert compressed_blocks(cache) > 0
    assert torch.equal(got, want), f"first mismatch at step {(got != want).nonzero()[0, 1].item()}"


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_identity_codec_unquantized_greedy_equals_dynamic_cache(models, key_space: str) -> None:
    """Identity codec (no basis) on both sides, 16-bit rows: lossless, so greedy tokens match."""
    model = models["gemma3"]
    disable(model)
    ids = tiny_prompt(1, PROMPT, seed=11)
    want = greedy(model, ids, DynamicCache(config=model.config))
    cfg = lossless(key_space, key_codec="identity", value_codec="identity", rank_keys=8, rank_values=8)
    cache = SpectralCache(model, cfg)
    got = greedy(model, ids, cache)
    assert compressed_blocks(cache) > 0
    assert cache.memory_report()["tiers"]["bases"] == 0
    assert torch.equal(got, want), f"first mismatch at step {(got != want).nonzero()[0, 1].item()}"


@pytest.mark.parametrize("key_space", KEY_SPACES)
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_batch_with_left_padding(models, name: str, key_space: str) -> None:
    model = models[name]
    ids = tiny_prompt(3, 700, seed=7)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 150), (2, 37)):  # row 1 pads past the first (128-token) block
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    want = greedy(model, ids, DynamicCache(config=model.config), attention_mask=mask, new=24)
    got = greedy(model, ids, SpectralCache(model, lossless(key_space)), attention_mask=mask, new=24)
    assert torch.equal(got, want)


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_chunked_prefill_and_plain_forward_calls(models, key_space: str) -> None:
    """Two prefill calls, then token-by-token forward calls, against DynamicCache logits."""
    model = models["gemma3"]
    ids = tiny_prompt(2, 900, seed=3)
    spectral = SpectralCache(model, lossless(key_space))
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        for lo, hi in ((0, 500), (500, 900)):
            a = model(ids[:, lo:hi], past_key_values=spectral, use_cache=True).logits
            b = model(ids[:, lo:hi], past_key_values=dynamic, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        token = a[:, -1:].argmax(-1)
        for _ in range(8):
            a = model(token, past_key_values=spectral, use_cache=True).logits
            b = model(token, past_key_values=dynamic, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            token = b[:, -1:].argmax(-1)
    assert spectral.get_seq_length() == dynamic.get_seq_length() == 908


def _teacher_forced_logits(model, cache, ids, follow) -> torch.Tensor:
    with torch.no_grad():
        steps = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        for i in range(follow.shape[1]):
            steps.append(model(follow[:, i : i + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(steps).float()


def test_beam_search_equals_dynamic_cache(models) -> None:
    """Beam search reorders the cache every step (reorder_cache on compressed tiers)."""
    model = models["qwen2"]
    ids = tiny_prompt(2, 600, seed=17)
    kw = dict(max_new_tokens=16, min_new_tokens=16, num_beams=3, do_sample=False, pad_token_id=0)
    want = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    got = model.generate(ids, past_key_values=SpectralCache(model, lossless("post_rope")), **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype: torch.dtype) -> None:
    """Same weights, same (teacher-forced) tokens: the int8 spectral cache in half precision
    stays about as close to its fp32 run as DynamicCache in half precision stays to its own."""
    ids = tiny_prompt(2, 600, seed=11)
    follow = tiny_prompt(2, 5, seed=12)
    fp32 = tiny_model("llama")
    half = tiny_model("llama").to(dtype)

    def cos_gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(1 - torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).min())

    spec_cache = SpectralCache(half, lossy())
    spec_half = _teacher_forced_logits(half, spec_cache, ids, follow)
    assert compressed_blocks(spec_cache) > 0
    assert torch.isfinite(spec_half).all()
    spec_gap = cos_gap(spec_half, _teacher_forced_logits(fp32, SpectralCache(fp32, lossy()), ids, follow))
    dyn_half = _teacher_forced_logits(half, DynamicCache(config=half.config), ids, follow)
    dyn_gap = cos_gap(dyn_half, _teacher_forced_logits(fp32, DynamicCache(config=fp32.config), ids, follow))
    assert spec_gap < 3 * dyn_gap + 0.005, (spec_gap, dyn_gap)


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_softcapping_model_gemma2(key_space: str) -> None:
    """Gemma 2 passes softcap= to attention: the spectral path and the fallback for its
    sliding layers (SDPA has no softcap) must both apply it, like eager attention."""
    model = tiny_model("gemma2", attn_implementation="eager")
    ids = tiny_prompt(1, 700, seed=13)
    want = greedy(model, ids, DynamicCache(config=model.config), new=32)
    got = greedy(model, ids, SpectralCache(model, lossless(key_space)), new=32)
    assert torch.equal(got, want)


def test_lossy_int8_generate_compresses(models) -> None:
    model = models["qwen3"]
    ids = tiny_prompt(1, PROMPT, seed=5)
    cache = SpectralCache(model, lossy(coeff_bits=8))
    got = greedy(model, ids, cache, new=16)
    assert got.shape == (1, 16)
    assert compressed_blocks(cache) > 0
    assert cache.memory_report()["compressed_layers"]["ratio"] < 1.0


def test_enable_is_idempotent_and_disable_restores(models) -> None:
    model = models["llama"]
    disable(model)
    before = model.config._attn_implementation
    spectralcache.enable(model)
    spectralcache.enable(model)
    assert model.config._attn_implementation == "spectral"
    disable(model)
    assert model.config._attn_implementation == before
    disable(model)
    assert model.config._attn_implementation == before


def test_uncompressed_run_on_enabled_model_matches_sdpa(models) -> None:
    """With no SpectralCache active, "spectral" is SDPA for every layer (sliding ones included)."""
    model = models["gemma3"]
    ids = tiny_prompt(2, 300, seed=9)
    disable(model)
    with torch.no_grad():
        want = model(ids).logits
        enable(model)
        got = model(ids).logits
    torch.testing.assert_close(got, want)


def test_cache_from_config_on_sdpa_model_is_a_clear_error() -> None:
    """A cache built from a bare config cannot switch the model: the first compressed layer the
    SDPA model reads raises (not only from the second call on), and nothing is cached."""
    model = tiny_model("llama")
    cache = SpectralCache(model.config, lossless("post_rope"))
    ids = tiny_prompt(1, 300)
    with torch.no_grad():
        for _ in range(2):
            with pytest.raises(RuntimeError, match=r"layer 0: .*spectralcache\.enable"):
                model(ids, past_key_values=cache, use_cache=True)
            assert cache.layer_lengths() == [0, 0]
        enable(model)
        got = model(ids, past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(got, model(ids).logits)
    assert cache.get_seq_length() == 300


@pytest.mark.parametrize("how", ["disable", "never_enabled", "unpickled"])
def test_filled_cache_read_by_non_spectral_attention_raises(how: str) -> None:
    """A filled cache read by SDPA would attend over the new token alone (wrong logits, silently,
    before): it raises naming the fix, and the cache is unchanged (the next call is right)."""
    import pickle

    model = tiny_model("llama")
    ids = tiny_prompt(1, 300, seed=4)
    token = tiny_prompt(1, 1, seed=5)
    cache = SpectralCache(model, lossless("post_rope"))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        reader = model
        if how == "disable":
            disable(model)
        elif how == "never_enabled":
            reader = tiny_model("llama")  # same weights, attention still "sdpa"
        else:  # a new process: the cache comes back from bytes, the model is loaded fresh
            cache = pickle.loads(pickle.dumps(cache))
            reader = tiny_model("llama")
        assert not is_enabled(reader)
        with pytest.raises(RuntimeError, match=r"spectralcache\.enable\(model\)"):
            reader(token, past_key_values=cache, use_cache=True)
        assert cache.layer_lengths() == [300, 300]
        enable(reader)
        got = reader(token, past_key_values=cache, use_cache=True).logits
        dynamic = DynamicCache(config=model.config)
        model(ids, past_key_values=dynamic, use_cache=True)
        want = model(token, past_key_values=dynamic, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_enable_rejects_non_models() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable(torch.nn.Linear(2, 2))


def test_attention_function_errors_leave_cache_usable() -> None:
    """Unsupported requests fail clearly and roll the forward back, so the cache stays usable."""
    from spectralcache.attention.interface import spectral_attention_forward

    model = tiny_model("llama")
    cache = SpectralCache(model, lossless("post_rope"))
    ids = tiny_prompt(1, 300)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        seen = cache.get_seq_length()
        attn = model.model.layers[0].self_attn
        q = torch.randn(1, 4, 1, 32)
        k = v = torch.randn(1, 2, 1, 32)
        for kwargs, text in (
            ({"sliding_window": 16}, "sliding-window"),
            ({"output_attentions": True}, "attention weights"),
        ):
            ck, cv = cache.update(k, v, 0)
            with pytest.raises(ValueError, match=text):
                spectral_attention_forward(attn, q, ck, cv, None, **kwargs)
            assert not cache.layers[0].has_pending_chunk
            assert cache.layer_lengths() == [seen, seen]  # rolled back
        model(ids[:, :1], past_key_values=cache, use_cache=True)  # still usable
    assert cache.get_seq_length() == seen + 1


def exact(key_space: str = "post_rope", **overrides) -> SpectralConfig:
    """Every tier exact: identity codecs with 16-bit rows (the model dtype), outliers too."""
    return lossless(key_space, key_codec="identity", value_codec="identity", **overrides)


@pytest.mark.parametrize(
    ("name", "dtype"), [("llama", torch.bfloat16), ("llama", torch.float16), ("gemma3", torch.bfloat16)]
)
def test_exact_tiers_bit_identical_to_dynamic_cache_in_half_precision(name: str, dtype: torch.dtype) -> None:
    """With every tier exact, attention runs DynamicCache's own SDPA call on the same K/V, so
    logits are bit-identical in any dtype (before: 2 of 40 greedy tokens differed in bf16)."""
    model = tiny_model(name, dtype=dtype)
    ids = tiny_prompt(1, 600, seed=21)
    follow = tiny_prompt(1, 4, seed=22)
    cache = SpectralCache(model, exact())
    want = _teacher_forced_logits(model, DynamicCache(config=model.config), ids, follow)
    got = _teacher_forced_logits(model, cache, ids, follow)
    assert compressed_blocks(cache) > 0
    assert torch.equal(got, want), float((got - want).abs().max())
    want_tokens = greedy(model, ids, DynamicCache(config=model.config), new=40)
    got_tokens = greedy(model, ids, SpectralCache(model, exact()), new=40)
    assert torch.equal(got_tokens, want_tokens), int((got_tokens != want_tokens).sum())


def test_encoder_and_encoder_decoder_models_are_refused() -> None:
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    bert = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=64)
    t5 = T5Config(num_layers=2, d_model=64, num_heads=4, d_kv=16, d_ff=64, vocab_size=64)
    for target in (t5, T5ForConditionalGeneration(t5)):
        with pytest.raises(ValueError, match="encoder-decoder model"):
            SpectralCache(target, "lossless")
    for target in (bert, BertModel(bert)):
        with pytest.raises(ValueError, match=r"encoder model .*BERT"):
            SpectralCache(target, "lossless")
    # BERT configured as a causal decoder is a decoder-only model like any other
    assert SpectralCache(BertConfig(**{**bert.to_dict(), "is_decoder": True}), "lossless").compressed_layers


def test_lossless_preset_refused_in_half_precision() -> None:
    """The preset's full-rank bases are exact in float32 only (before: accepted in bf16, and 35 of
    40 greedy tokens differed from DynamicCache on this model): refused, naming the exact config."""
    half = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"float32 only.*key_codec='identity'"):
        SpectralCache(half, "lossless")
    cache = SpectralCache(half.config, "lossless")  # built from the config: refused at the first update
    enable(half)
    with torch.no_grad(), pytest.raises(ValueError, match="float32 only"):
        half(tiny_prompt(1, 40), past_key_values=cache, use_cache=True)
    assert cache.layer_lengths() == [0, 0]
    suggested = SpectralConfig.from_preset("lossless", key_codec="identity", value_codec="identity")
    ids = tiny_prompt(1, 700, seed=23)
    want = greedy(half, ids, DynamicCache(config=half.config), new=8)
    exact_cache = SpectralCache(half, suggested)
    got = greedy(half, ids, exact_cache, new=8)
    assert compressed_blocks(exact_cache) > 0
    assert torch.equal(got, want)
    assert SpectralCache(tiny_model("llama"), "lossless").config.name == "lossless"  # float32: fine
