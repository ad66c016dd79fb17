"""End to end on the real Gemma 3 270M (CPU, float32): generate through SpectralCache at ~4K tokens.

A pass key is hidden at 40 % depth of a ~4.2K-token haystack (16 landmarks + 8 blocks + hot), i.e. inside a block that
gets compressed; the model must still read it back, and the compressed layers must hold
at most 1/5 of DynamicCache's bytes (default config: rank 32/64, int8, 32 outliers per
512-token block). Only the SpectralCache run is done here (the plain model finds this
pass key too; checked by hand, not worth another minute of CI per run).
"""

from __future__ import annotations

import pytest
import torch

from spectralcache import SpectralCache, SpectralConfig
from spectralcache.integrations.transformers import disable, is_enabled

pytestmark = pytest.mark.slow

PASS_KEY = "48213"
TARGET_TOKENS = 4260


def needle_prompt(tok, target: int = TARGET_TOKENS, depth: float = 0.4) -> torch.Tensor:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = f"The pass key is {PASS_KEY}. Remember it. {PASS_KEY} is the pass key. "
    head = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    tail = "What is the pass key? The pass key is"
    per = len(tok(filler, add_special_tokens=False).input_ids)
    n = (target - 80) // per
    while True:
        parts = [filler] * n
        parts.insert(int(n * depth), needle)
        ids = tok(head + "".join(parts) + tail, return_tensors="pt").input_ids
        if ids.shape[1] >= target - per:
            return ids
        n += 1


def test_generate_finds_needle_at_4k(gemma) -> None:
    model, tok = gemma
    ids = needle_prompt(tok)
    assert 4180 <= ids.shape[1] <= 4400  # 8 blocks of 512 per layer get compressed
    try:
        cache = SpectralCache(model, SpectralConfig())
        assert is_enabled(model)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1] :])
        report = cache.memory_report()
    finally:
        disable(model)  # the model is shared with the other slow tests
    ratio = report["compressed_layers"]["ratio"]
    blocks = sum(e.get("num_blocks", 0) for e in report["layers"])
    print(
        f"\nprompt {ids.shape[1]} tokens -> {answer!r}; compressed layers hold {ratio:.3f} of DynamicCache "
        f"bytes ({blocks} blocks, compression {report['compression']['seconds']:.1f}s)"
    )
    assert PASS_KEY in answer
    assert blocks >= 3 * 8  # 3 full-attention layers, 8 blocks of 512 each
    assert ratio <= 0.2
