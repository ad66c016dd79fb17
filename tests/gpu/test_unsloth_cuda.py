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
