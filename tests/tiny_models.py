"""Tiny random-weight decoder models, built in code (nothing from a hub).

Each factory returns a model in eval mode with deterministic weights. Sizes are small
enough that a 1500-token prompt plus 64 greedy steps runs in about a second on 2 CPU
cores, but keep what the cache must handle: GQA (fewer KV heads than query heads),
several layers, RoPE, and for Gemma 3 interleaved sliding / full layers with
per-layer-type RoPE theta, q/k norms and a non-default attention scaling. ``gemma2``
(not in ``MODEL_NAMES``) adds attention-logit softcapping.

``small_lossy_config`` / ``small_lossless_config``: the small SpectralConfigs (32-token blocks,
head_dim-16 ranks) that several layer-level tests build their caches with.

Weights use a larger init range than the libraries' default so logits are far from
ties: greedy decoding then compares attention implementations, not rounding noise.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from spectralcache.config import SpectralConfig

VOCAB = 256
MODEL_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_config(name: str, **overrides) -> PretrainedConfig:
    """Config of the tiny ``name`` model (see ``MODEL_NAMES``); ``overrides`` win."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        initializer_range=0.2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if name == "llama":
        cfg = dict(common)
        cls = LlamaConfig
    elif name == "mistral":
        cfg = dict(common, sliding_window=None, num_hidden_layers=3)
        cls = MistralConfig
    elif name == "qwen2":
        cfg = dict(common, num_key_value_heads=1)
        cls = Qwen2Config
    elif name == "qwen3":
        cfg = dict(common, head_dim=64)
        cls = Qwen3Config
    elif name == "gemma3":
        cfg = dict(
            common,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        )
        cls = Gemma3TextConfig
    elif name == "gemma2":  # logit softcapping (attention sees softcap=...)
        cfg = dict(
            common,
            query_pre_attn_scalar=32,
            sliding_window=64,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=None,
        )
        cls = Gemma2Config
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose from {(*MODEL_NAMES, 'gemma2')}")
    cfg.update(overrides)
    return cls(**cfg)


def tiny_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    **overrides,
) -> torch.nn.Module:
    """A deterministic random-weight causal LM for config ``name``."""
    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def tiny_prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids avoiding the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def small_lossy_config(**overrides) -> SpectralConfig:
    """A lossy SpectralConfig for head_dim-16 tests: 32-token blocks, ranks 4 / 6, 2 outliers."""
    base = dict(block_size=32, rank_keys=4, rank_values=6, hot_size=4, landmarks=3, outliers_per_block=2)
    base.update(overrides)
    return SpectralConfig(**base)


def small_lossless_config(**overrides) -> SpectralConfig:
    """Its exact twin: full rank (= head_dim 16 <= T_min), 16-bit coefficients, exact SVD."""
    base = dict(
        block_size=32,
        rank_keys=None,
        rank_values=None,
        hot_size=4,
        landmarks=3,
        outliers_per_block=2,
        coeff_bits=16,
        svd_method="exact",
        basis_dtype="model",
    )
    base.update(overrides)
    return SpectralConfig(**base)


def prefill_both(model, config: SpectralConfig, ids: torch.Tensor):
    """One prefill of ``ids`` through a SpectralCache with ``config`` and one through a
    DynamicCache: ``(cache, spectral logits, dynamic logits)`` (last position, float32)."""
    from transformers import DynamicCache

    from spectralcache import SpectralCache

    cache = SpectralCache(model, config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        ref = model(ids, past_key_values=DynamicCache(), use_cache=True)
    return cache, out.logits[:, -1].float(), ref.logits[:, -1].float()
