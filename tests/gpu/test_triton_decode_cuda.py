"""The fused Triton decode kernel on CUDA, compiled, at realistic shapes (skipped without CUDA).

Same contract as ``tests/unit/test_triton_decode.py`` (which runs the kernels through Triton's
interpreter on tiny shapes): kernel = torch reference (``spectral_attention``) by relative norm,
< 1e-5 in float32 and < 1e-2 in bfloat16, on fresh random states whose cold / hot tensors are
strided views into capacity buffers, output poisoned with NaN first. Shapes: head_dim 128,
512-token blocks, default / aggressive ranks, Llama-8B-like GQA.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from spectralcache.attention.reference import spectral_attention  # noqa: E402
from spectralcache.attention.triton import decode_attention  # noqa: E402
from spectralcache.attention.triton.dispatch import attend  # noqa: E402
from spectralcache.attention.triton.synthetic import random_state  # noqa: E402

_seed = iter(range(7000, 100000))
PRESETS = {"default": dict(rank_keys=32, rank_values=64, outliers=32, key_bits=8),
           "aggressive": dict(rank_keys=16, rank_values=32, outliers=16, key_bits=4)}  # fmt: skip


def _run(*, groups=4, q_len=1, dtype=torch.bfloat16, mask=None, softcap=None, **kw) -> float:
    seed = next(_seed)
    base = dict(batch=1, kv_heads=4, head_dim=128, landmarks=16, block_size=512, blocks=6, hot=200,
                chunk=q_len, dtype=dtype, device="cuda", seed=seed)  # fmt: skip
    base.update(kw)
    state = random_state(**base)
    g = torch.Generator().manual_seed(seed)
    b, h = base["batch"], base["kv_heads"]
    query = torch.randn(b, h * groups, q_len, base["head_dim"], generator=g).to(dtype).cuda()
    attn_mask = None
    if mask is not None:
        pads = torch.randint(0, state.seq_len // 2, (b,), generator=g)
        kv = torch.arange(state.seq_len)
        qpos = torch.arange(state.seq_len - q_len, state.seq_len)
        keep = (kv[None, :] <= qpos[:, None])[None] & (kv[None, None, :] >= pads[:, None, None])
        attn_mask = keep[:, None].cuda()
        if mask == "float":
            attn_mask = torch.where(attn_mask, 0.0, torch.finfo(dtype).min).to(dtype)
    out = torch.full_like(query, float("nan"))
    decode_attention(query, state, attn_mask, None, softcap, out=out)
    ref = spectral_attention(query, state, attn_mask, softcap=softcap)
    assert torch.isfinite(out).all(), "unwritten (NaN) output elements"
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    bar = 1e-5 if dtype == torch.float32 else 1e-2
    assert err < bar, f"relative error {err:.2e} >= {bar}"
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["default", "aggressive"])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_presets(dtype, preset, key_space) -> None:
    _run(dtype=dtype, key_space=key_space, **PRESETS[preset])


@pytest.mark.parametrize("codecs", ["identity_keys", "identity_values", "both"])
@pytest.mark.parametrize("bits", [8, 4])
def test_identity_codecs(codecs, bits) -> None:
    _run(key_bits=bits, identity_keys=codecs in ("identity_keys", "both"),
         identity_values=codecs in ("identity_values", "both"))  # fmt: skip


@pytest.mark.parametrize("groups,batch", [(1, 1), (4, 4), (8, 2)])
def test_gqa_batch_padding(groups, batch) -> None:
    _run(groups=groups, batch=batch, mask="bool", **PRESETS["default"])


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_speculative_q(mask) -> None:
    _run(q_len=4, mask=mask, batch=2, **PRESETS["default"])


def test_softcap_and_16bit() -> None:
    _run(softcap=30.0, **PRESETS["default"])
    _run(key_bits=16, value_bits=16, rank_keys=128, rank_values=128, outliers=0)


def test_dispatch_uses_kernel_on_cuda() -> None:
    state = random_state(batch=1, kv_heads=4, head_dim=128, block_size=512, blocks=2, device="cuda",
                         dtype=torch.bfloat16, seed=next(_seed))  # fmt: skip
    query = torch.randn(1, 16, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = attend(query, state, None, None, None, "auto")
    assert out.stride() != spectral_attention(query, state).stride()  # the kernel's [B, q, Hq, D] buffer
    torch.testing.assert_close(out.float(), spectral_attention(query, state).float(), rtol=2e-2, atol=2e-2)


def test_cuda_graph_capture() -> None:
    """A decode step's attention replays from a CUDA graph (fixed shapes) with the same result."""
    state = random_state(batch=1, kv_heads=8, head_dim=128, block_size=512, blocks=4, device="cuda",
                         dtype=torch.bfloat16, seed=next(_seed), **{k: v for k, v in PRESETS["default"].items()})  # fmt: skip
    query = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(query)
    decode_attention(query, state, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(query, state, out=out)
    query.copy_(torch.randn_like(query))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = spectral_attention(query, state)
    assert torch.isfinite(out).all()
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
