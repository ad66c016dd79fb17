"""Stop 22 kernel options: one launch (``merge``: the split kernel's last program per (batch row, KV head),
found by a self-resetting ticket, merges the partials) and programmatic dependent launch (``pdl``, compiled
Hopper only).

Kernel cases run through Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``)
or compiled on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from tests.kernel_helpers import record_launch  # noqa: E402

import spectralcache.attention.triton.decode as dec  # noqa: E402
from spectralcache.attention.reference import spectral_attention  # noqa: E402
from spectralcache.attention.triton import decode_attention  # noqa: E402
from spectralcache.attention.triton.synthetic import random_state  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_seed = iter(range(22000, 30000))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) output elements"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _tickets_zero() -> bool:
    return all(int(t.abs().sum()) == 0 for t in dec._TICKETS.values())


# (layout, q_len): the default preset's layout (flat tile loop, outlier programs), a low-rank int4 layout
# (pipelined block loop) and speculative decoding (4 query positions: 16 rows per KV head) with a pad mask
LAYOUTS = {
    "default": dict(head_dim=32, block_size=64, blocks=5, key_bits=4, channel_keys=True, key_zero_point=True,
                    identity_values=True, outliers=12),
    "lowrank4": dict(head_dim=32, block_size=32, blocks=3, rank_keys=8, rank_values=16, key_bits=4, outliers=2),
}  # fmt: skip


@pytest.mark.parametrize(
    ("layout", "q_len", "dtype"),
    [("default", 1, torch.float32), ("lowrank4", 1, torch.bfloat16), ("lowrank4", 4, torch.float32)],
)
def test_merge_in_the_split_kernel_agrees(layout: str, q_len: int, dtype: torch.dtype) -> None:
    """merge=True (or 2, the release-only ticket): one launch, no combine kernel; the output equals the
    reference and the two-launch path's. Called twice on one state: the second launch counts from the tickets the first left (0 again:
    a ticket not put back makes every program of the next launch miss the last place, and the output stays
    NaN). The output is written through strides (a [B, Hq, q, D] view of a [B, q, Hq, D] buffer)."""
    state = random_state(
        device=DEVICE, seed=next(_seed), batch=2, dtype=dtype, chunk=q_len, **LAYOUTS[layout]
    )
    query = torch.randn(2, 8, q_len, 32).to(dtype).to(DEVICE)
    mask = None
    if q_len > 1:
        qpos = torch.arange(state.seq_len - q_len, state.seq_len)
        kv = torch.arange(state.seq_len)
        mask = (
            ((kv[None, :] <= qpos[:, None]) & (kv[None, :] >= 3))[None, None].expand(2, 1, -1, -1).to(DEVICE)
        )
    ref = spectral_attention(query, state, mask)
    bar = 1e-5 if dtype == torch.float32 else 1e-2
    two, seen = record_launch(lambda: decode_attention(query, state, mask, blocks_per_split=1, merge=False))
    assert not seen["MERGE"]
    for form in (True, 2):  # acquire-release ticket, release-only ticket
        out = torch.full((2, q_len, 8, 32), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
        _, seen = record_launch(
            lambda out=out, form=form: decode_attention(
                query, state, mask, out=out, blocks_per_split=1, merge=form
            )
        )
        assert seen["MERGE"] == int(form) and not seen["PDL"]
        assert _rel(out, ref) < bar
        assert _rel(out, two) < bar
        assert _tickets_zero()


def test_merge_with_graph_capacity() -> None:
    """merge under CUDA-graph sizing: the grid covers three times the live blocks and more exact tokens;
    the programs past them write empty partials but still take their ticket, so the merging program is
    the grid's last, whatever the live sizes."""
    from spectralcache.attention.triton.graph import DecodeGraphSizes

    state = random_state(device=DEVICE, seed=next(_seed), **LAYOUTS["default"])
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    sizes = DecodeGraphSizes(state, q_len=1)
    sizes.update(state)
    kw = {**sizes.launch_kwargs(), "capacity_blocks": 15, "capacity_exact": sizes.capacity_exact + 40}
    out = torch.full_like(query, float("nan"))
    decode_attention(query, state, out=out, blocks_per_split=2, merge=True, **kw)
    assert _rel(out, spectral_attention(query, state)) < 1e-5
    assert _tickets_zero()


def test_pdl_only_where_compiled_for_hopper() -> None:
    """pdl: programmatic dependent launch needs a compiled kernel on a CUDA card of compute capability 9
    or more; the interpreter and CPU tensors never get it (the launch options and PDL constexpr stay off),
    and it is off unless asked for."""
    assert not dec._use_pdl(None, torch.device(DEVICE))
    assert not dec._use_pdl(True, torch.device("cpu"))
    if DEVICE == "cpu":
        state = random_state(device=DEVICE, seed=next(_seed))
        query = torch.randn(1, 4, 1, 32)
        out, seen = record_launch(lambda: decode_attention(query, state, pdl=True))
        assert not seen["PDL"] and "launch_pdl" not in seen["_options"]
        assert _rel(out, spectral_attention(query, state)) < 1e-5
    with pytest.raises(ValueError, match="pdl"):
        dec._use_pdl(3, torch.device("cpu"))
    assert dec._options(4, 2, 128, True)["launch_pdl"] is True
    assert "launch_pdl" not in dec._options(4, 2, 128)


def test_merge_chunk_rule() -> None:
    """The one-launch merge reads [S, rows, head_dim] float32 tiles of at most 4096 elements, S a power
    of two no larger than the splits need."""
    assert dec._merge_splits(4, None, 128, 83) == 8
    assert dec._merge_splits(4, None, 128, 3) == 4
    assert dec._merge_splits(64, None, 128, 83) == 1
    assert dec._merge_splits(4, 16, 32, 200) == 8


def test_short_rows_plan_and_agreement() -> None:
    """short_rows caps the rows of each outlier and exact program (more, shorter programs: the second
    wave's tail where a plan has more programs than resident slots); the output is the reference's."""
    kw = dict(t=512, block_e=32, n_out=16, out_split=True, exact_spread=True, want_splits=66)
    # aggressive preset at 128K batch 1: 4 blocks per program, 255 blocks, 513 exact tokens
    assert dec._split_plan(255, 513, 4, **kw) == (64, 256, 256, 16, 3)
    assert dec._split_plan(255, 513, 4, short_rows=64, **kw) == (64, 64, 64, 64, 9)
    state = random_state(device=DEVICE, seed=next(_seed), block_size=64, outliers=8, blocks=4, hot=40)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    ref = spectral_attention(query, state)
    grids = []
    launch = dec._launch_split

    def record(grid, *args):
        grids.append(grid[1])
        return launch(grid, *args)

    dec._launch_split = record
    try:
        for rows in (None, 16):
            out = decode_attention(query, state, block_e=16, blocks_per_split=4, short_rows=rows)
            assert _rel(out, ref) < 1e-5
    finally:
        dec._launch_split = launch
    # 1 cold program; 32 outlier rows in 1 program / 2 of 16; 45 exact tokens in 2 programs / 3 of 16
    assert grids == [1 + 1 + 2, 1 + 2 + 3]
    with pytest.raises(ValueError, match="short_rows"):
        decode_attention(query, state, block_e=16, short_rows=24)
    assert _rel(decode_attention(query, state, block_e=16, short_rows=0), ref) < 1e-5  # 0: the plan's rows


def test_short_rows_automatic_rule() -> None:
    """The automatic plan caps outlier / exact programs at 128 rows only where the cold tier is planned for
    at least 32 programs per (batch row, KV head), the plan overflows them and a short program holds more."""
    assert dec._auto_short_rows(66, 32, (64, 256, 256, 16, 3)) == 128  # aggressive 128K batch 1
    assert dec._auto_short_rows(16, 32, (16, 256, 256, 4, 1)) is None  # batch 8: few programs wanted
    assert dec._auto_short_rows(66, 32, (63, 64, 64, 16, 1)) is None  # 32K: programs already short
    assert dec._auto_short_rows(66, 32, (60, 256, 256, 3, 3)) is None  # one wave
    assert dec._auto_short_rows(66, 48, (64, 288, 288, 16, 3)) is None  # 128 rows not whole block_e steps
    with pytest.raises(ValueError, match="merge"):
        dec._merge_form(3)
