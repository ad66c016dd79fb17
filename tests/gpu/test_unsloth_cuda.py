"""patch_unsloth_attention against the real Unsloth on CUDA (skipped without CUDA or Unsloth).

CI has neither (Unsloth pins transformers <= 5.17 and cannot load a model without a GPU), so
there ``tests/unit/test_unsloth.py`` runs against the stand-in. This file runs the checks of
``benchmarks/unsloth_check.py`` as assertions; on the H100 the script itself was run
(``benchmarks/results/unsloth/``). Run it in its own process: Unsloth must be imported
before transformers, e.g. ``python -m pytest tests/gpu/test_unsloth_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("unsloth")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import unsloth_check  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: unsloth_check._save_tiny(name, root) for name in ("llama", "qwen3", "gemma3")}


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_patched_lossless_equals_plain_unsloth_float32(saved, name: str) -> None:
    rec = unsloth_check.run_case(name, "float32", saved[name], standin=False, device="cuda")
    assert rec["inference_paths_before"], "Unsloth's inference path should be active after loading"
    assert rec["unpatched_spectralcache_model"]["type"] == "UnslothInferenceError"
    assert rec["inference_paths_after_patch"] == []
    assert rec["patched_cache"]["blocks_compressed"] > 0
    assert rec["lossless_equal_plain_unsloth"], (rec["plain_unsloth_tokens"], rec["patched_lossless_tokens"])
    if name != "gemma3":
        assert rec["after_get_peft_model_without_repatch"]["type"] == "UnslothInferenceError"
        assert rec["peft_repatched_equal_plain_unsloth"]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_config_built_cache_on_unpatched_model_raises(saved, name: str) -> None:
    """A SpectralCache built from the config (no model hooks) given to an unpatched
    FastLanguageModel: generate and a direct forward raise instead of dropping it."""
    import unsloth

    from spectralcache import SpectralCache
    from spectralcache.integrations.compat import cache_kwargs
    from spectralcache.integrations.guard import SpectralCacheBypassedError
    from spectralcache.integrations.unsloth import patch_unsloth_attention, resolve_config
    from tiny_models import tiny_prompt

    model, _ = unsloth.FastLanguageModel.from_pretrained(
        str(saved[name]), max_seq_length=2048, dtype=torch.float32, load_in_4bit=False,
        fix_tokenizer=False, use_gradient_checkpointing=False,
    )  # fmt: skip
    ids = tiny_prompt(1, unsloth_check.PROMPT).to("cuda")
    plain, _ = unsloth_check._generate(model, ids)
    cfg = resolve_config("lossless", **unsloth_check.SMALL)
    cache = SpectralCache(model.config, cfg)
    with pytest.raises(SpectralCacheBypassedError, match="patch_unsloth_attention"):
        unsloth_check._generate(model, ids, **cache_kwargs(model, cache))
    with torch.no_grad(), pytest.raises(SpectralCacheBypassedError, match="_unsloth_fast_path=True"):
        model(ids, **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 0
    patch_unsloth_attention(model, cfg)
    assert unsloth_check._generate(model, ids, **cache_kwargs(model, cache))[0] == plain
