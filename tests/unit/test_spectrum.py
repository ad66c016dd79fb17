"""Spectrum analysis: the Eckart-Young error curve against explicit truncated reconstructions,
and pre-RoPE capture against the model's own rotation (tiny random Gemma 3)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from spectralcache.eval import spectrum

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import tiny_config


def test_error_curve_matches_explicit_truncation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 24, generator=g, dtype=torch.float64) @ torch.randn(
        24, 24, generator=g, dtype=torch.float64
    )
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    curve = spectrum.relative_error_curve(s)
    assert len(curve) == s.numel() + 1 and curve[0] == pytest.approx(1.0) and curve[-1] == 0.0
    for r in (0, 1, 5, 23, 24):
        xr = (u[:, :r] * s[:r]) @ vh[:r]
        assert curve[r] == pytest.approx((torch.linalg.norm(x - xr) / torch.linalg.norm(x)).item(), abs=1e-9)
    assert spectrum.rank_for(curve, 0.0) <= 24
    assert all(a >= b for a, b in itertools.pairwise(curve))


def test_block_spectra_per_head_and_full_blocks_only():
    x = torch.randn(2, 70, 8)
    sp = spectrum.block_spectra(x, 32)
    assert len(sp) == 2 * 2 and all(len(s) == 8 for s in sp)  # 2 heads x 2 full blocks; tail dropped
    assert sp[0] == pytest.approx(torch.linalg.svdvals(x[0, :32].double()).tolist())


@torch.inference_mode()
def test_capture_pre_rope_rotates_to_cached_keys(gemma_tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("gemma3", vocab_size=262144, hidden_size=32, intermediate_size=64)
    ).eval()
    kv = spectrum.capture(model, gemma_tokenizer, 80)
    assert sorted(kv) == [1, 3]
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    pos = torch.arange(80)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, 80, 32), pos, "full_attention")
    for i in kv:
        pre, post = kv[i]["keys_pre_rope"], kv[i]["keys_post_rope"]
        assert pre.shape == post.shape == (1, 80, 64)
        _, rotated = apply_rotary_pos_emb(pre[None], pre[None], cos, sin)
        torch.testing.assert_close(rotated[0], post, rtol=1e-5, atol=1e-5)
    res = spectrum.analyse(kv, 32)
    assert set(res["layers"]["1"]) == set(spectrum.KINDS)
