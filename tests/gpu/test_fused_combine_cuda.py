"""The fused combine on CUDA, compiled: hundreds of launches, every result checked (skipped without CUDA).

``fused_combine=True``: the last split program of each (batch row, KV head) to arrive at its
atomic counter merges the partials (decode_splits, "Fused combine"). The interpreter runs the
programs one after another, so ``tests/unit`` cannot see a memory-ordering race; here thousands
of programs run concurrently on the card. A race (a partial read before it landed, a stale L1
line, a counter not back at zero) shows as an occasional wrong, NaN or unwritten output, so
every launch gets a fresh query (stale partials of the previous launch would differ) and a
NaN-poisoned output of its own, and every result is compared with the two-launch path's, element
by element: float32 within 1e-5 relative (only the order of the log-sum-exp merge differs), bfloat16
within one unit in the last place (the same float32 values rounded).
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
from spectralcache.attention.triton.synthetic import random_state  # noqa: E402

# the layouts of benchmarks/attention_kernel_dev.py (same state arguments: its compiled kernels serve)
LAYOUTS = {
    # the default preset: per-channel int4 keys with zero points, identity int4 values, 8 outliers
    "channel_zp": dict(
        rank_keys=128, rank_values=128, outliers=8, key_bits=4, channel_keys=True, identity_values=True,
        key_zero_point=True,
    ),
    # the lowrank preset: rank 32 keys / 64 values, int8, 32 outliers per block
    "lowrank": dict(rank_keys=32, rank_values=64, outliers=32, key_bits=8),
}  # fmt: skip


def _llama_state(ctx: int, batch: int, layout: str, dtype: torch.dtype, seed: int, spare_capacity: int = 0):
    """Llama-3.1-8B attention (8 KV heads, head_dim 128), 512-token blocks, ``ctx`` tokens."""
    t, lm = 512, 16
    nb = (ctx - lm - 64) // t
    return random_state(batch=batch, kv_heads=8, head_dim=128, landmarks=lm, block_size=t, blocks=nb,
                        hot=ctx - lm - nb * t, chunk=1, dtype=dtype, basis_dtype=dtype,
                        spare_capacity=spare_capacity, device="cuda", seed=seed, **LAYOUTS[layout])  # fmt: skip


def _assert_same(fused: torch.Tensor, two: torch.Tensor, what: str) -> None:
    """Element by element: float32 within 1e-5 relative; bfloat16 at most one unit in the last place."""
    assert torch.isfinite(fused).all(), f"{what}: NaN / unwritten output elements"
    f, u = fused.float(), two.float()
    rtol = 1e-5 if fused.dtype == torch.float32 else 2.0**-7 * 1.01
    bad = (f - u).abs() > rtol * u.abs() + 1e-6
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements off, max |diff| {float((f - u).abs().max()):.3e}"
    )


@pytest.mark.parametrize(
    ("layout", "dtype", "ctx", "batch"),
    [("channel_zp", torch.bfloat16, 131072, 1), ("lowrank", torch.float32, 32768, 8)],
)
def test_many_fused_launches_equal_two_launches(
    layout: str, dtype: torch.dtype, ctx: int, batch: int
) -> None:
    """200 launches, four split plans interleaved (the default plan, 1, 16 and 255 blocks per
    program: from ~260 programs per (b, h) down to the outlier / exact programs and one cold
    program), 50 fresh queries: every fused result = the two-launch result of its query."""
    state = _llama_state(ctx, batch, layout, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    queries = [torch.randn(batch, 32, 1, 128, generator=g).to(dtype).cuda() for _ in range(50)]
    plans = (None, 1, 16, 255)
    want = {
        (p, i): decode_attention(q, state, blocks_per_split=p, fused_combine=False)
        for p in plans
        for i, q in enumerate(queries)
    }
    ref = spectral_attention(queries[0], state)
    err = float((want[(None, 0)].float() - ref.float()).norm() / ref.float().norm())
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    outs = []
    for n in range(200):  # back to back on one stream: no host synchronisation between launches
        p, i = plans[n % len(plans)], (n * 7) % len(queries)
        out = torch.full_like(queries[i], float("nan"))
        decode_attention(queries[i], state, out=out, blocks_per_split=p, fused_combine=True)
        outs.append((p, i, out))
    torch.cuda.synchronize()
    for n, (p, i, out) in enumerate(outs):
        _assert_same(out, want[(p, i)], f"launch {n} (blocks_per_split={p}, query {i})")


def test_captured_fused_launch_replays_equal_two_launches() -> None:
    """The fused launch captured in a CUDA graph as the graphed decoder records it (device-side
    sizes over the buffers' capacity: programs past the live blocks arrive with empty partials),
    replayed 100 times with a new query each time: = the eager two-launch path every time (the
    counters, fixed in the graph, are back at zero after every replay)."""
    from spectralcache.attention.triton import decode as dec
    from spectralcache.attention.triton.graph import DecodeGraphSizes

    state = _llama_state(32768, 2, "channel_zp", torch.bfloat16, seed=13, spare_capacity=2)
    sizes = DecodeGraphSizes(state, q_len=1)
    sizes.update(state)
    assert sizes.capacity_blocks > state.cold.num_blocks  # empty programs take part
    q_static = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q_static)
    decode_attention(
        q_static, state, out=out, fused_combine=True, **sizes.launch_kwargs()
    )  # compile, counters
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        decode_attention(q_static, state, out=out, fused_combine=True, **sizes.launch_kwargs())
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.Generator().manual_seed(14)
    for n in range(100):
        q = torch.randn(2, 32, 1, 128, generator=g).to(torch.bfloat16).cuda()
        q_static.copy_(q)
        out.fill_(float("nan"))
        graph.replay()
        _assert_same(out, decode_attention(q, state, fused_combine=False), f"replay {n}")
    counters = dec._COUNTERS[(q_static.device, 2 * 8)]
    assert not counters.any()
