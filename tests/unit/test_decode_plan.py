"""The decode kernel's launch plan: every cold block, outlier row and exact token lands in exactly
one program, and no program is empty.

Pure arithmetic (no kernel launch): the kernels' agreement with the torch reference under any
``blocks_per_split`` / ``block_parts`` is tested in ``test_triton_decode.py::test_split_plans_agree`` /
``test_block_parts_agree``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from spectralcache.attention.triton.decode import (
    _max_block_parts,
    _part_tokens,
    _resolve_block_parts,
    _split_plan,
)


@settings(max_examples=300, deadline=None)
@given(
    blocks=st.integers(0, 700),
    exact=st.integers(0, 3000),
    t=st.sampled_from([16, 64, 256, 512]),
    n_out=st.sampled_from([0, 1, 4, 16, 32]),
    bps=st.integers(1, 64),
    want=st.integers(0, 600),
    out_split=st.booleans(),
    exact_spread=st.booleans(),
)
def test_plan_covers_everything_once(blocks, exact, t, n_out, bps, want, out_split, exact_spread) -> None:
    out_split = out_split and n_out > 0 and blocks > 0
    n_cold, exact_per, out_per, n_out_splits, n_exact = _split_plan(
        blocks, exact, bps, t=t, block_e=32, n_out=n_out, out_split=out_split,
        exact_spread=exact_spread, want_splits=want,
    )  # fmt: skip
    # cold programs: consecutive ranges of bps blocks, none empty
    assert n_cold * bps >= blocks and (n_cold == 0 or (n_cold - 1) * bps < blocks)
    assert exact_per >= 32 and exact_per % 32 == 0
    assert n_exact * exact_per >= exact and (exact == 0 or (n_exact - 1) * exact_per < exact)
    if out_split:
        assert n_out_splits * out_per >= blocks * n_out and (n_out_splits - 1) * out_per < blocks * n_out
    else:
        assert n_out_splits == 0


def _kernel_cover(n_cold: int, bps: int, parts: int, blocks: int, t: int, block_t: int) -> list[list[int]]:
    """How often the split kernel's cold programs read each token of each live block: the kernel's
    index arithmetic (decode_splits: block range, part token range, tiles masked at the block's end)."""
    part_t = _part_tokens(t, block_t, parts)
    seen = [[0] * t for _ in range(blocks)]
    for pid in range(n_cold):
        if parts > 1:
            n_lo, n_hi = pid // parts, min(pid // parts + 1, blocks)
            t_first = (pid % parts) * part_t
            t_end = min(t_first + part_t, t)
        else:
            n_lo, n_hi = pid * bps, min(pid * bps + bps, blocks)
            t_first, t_end = 0, t
        for n in range(n_lo, n_hi):
            for t0 in range(t_first, t_end, block_t):
                for tok in range(t0, min(t0 + block_t, t)):
                    seen[n][tok] += 1
    return seen


@settings(max_examples=300, deadline=None)
@given(
    blocks=st.integers(0, 40),
    spare=st.integers(0, 8),
    t=st.sampled_from([13, 16, 40, 64, 104, 502, 512]),
    block_t=st.sampled_from([16, 32, 64, 256]),
    n_out=st.sampled_from([0, 1, 4, 9]),
    parts=st.sampled_from([None, 1, 2, 4, 8]),
    min_tiles=st.integers(1, 4),
    bps=st.sampled_from([None, 1, 2]),
    want=st.integers(0, 200),
    out_split=st.booleans(),
)
def test_block_parts_cover_every_token_once(
    blocks, spare, t, block_t, n_out, parts, min_tiles, bps, want, out_split
) -> None:
    """With block parts (any P, automatic or given, clamped to the block's tiles) every token of every
    live block is read by exactly one cold program, every exact outlier row by exactly one program
    (part 0 of its block, or an outlier program), programs past the live blocks (graph capacity) by
    none; the automatic P is the largest power of two within its cap whose programs stay within
    1.25x of the wanted ones."""
    if block_t > 16 and block_t > t:
        block_t = 16  # decode_attention never tiles wider than the block's next power of two
    plan_blocks = blocks + spare  # capacity (CUDA-graph mode): the grid covers spare blocks too
    auto_split = bps is None
    bps = (max(1, -(-plan_blocks // want)) if plan_blocks and want else 1) if bps is None else bps
    out_split = out_split and n_out > 0 and plan_blocks > 0

    def programs(q: int) -> int:
        plan = _split_plan(
            plan_blocks, 100, 1, t=t, block_e=32, n_out=n_out, out_split=out_split, exact_spread=True,
            want_splits=want, block_parts=q,
        )  # fmt: skip
        return plan[0] + plan[3] + plan[4]

    if parts is not None and parts > 1 and not auto_split and bps != 1:
        with pytest.raises(ValueError, match="blocks_per_split=1"):
            _resolve_block_parts(parts, min_tiles, auto_split, bps, plan_blocks, want, t, block_t, programs)
        return
    p = _resolve_block_parts(parts, min_tiles, auto_split, bps, plan_blocks, want, t, block_t, programs)
    tiles = -(-t // block_t)
    assert p >= 1 and p & (p - 1) == 0 and (plan_blocks == 0 or p <= tiles)
    if parts is None and p > 1:
        assert auto_split and bps == 1 and programs(p) <= 1.25 * want
        assert tiles // p >= min_tiles
        # the largest such P: twice as many parts would exceed the cap or the programs -- or P is
        # half of it because those were one-tile parts whose programs overflowed the wanted ones
        halved = -(-tiles // (2 * p)) == 1 and programs(2 * p) > want >= programs(p)
        assert tiles // (2 * p) < min_tiles or programs(2 * p) > 1.25 * want or halved
    if parts is None and p >= 1 and auto_split and bps == 1 and plan_blocks:
        # never one-tile parts that overflow the wanted programs when half as many parts fit
        if p > 1 and -(-tiles // p) == 1:
            assert programs(p) <= want or programs(p // 2) > want
    if parts is not None and plan_blocks:
        assert p == min(parts, _max_block_parts(t, block_t, 1))
    if p > 1:
        bps = 1
    n_cold, _, out_per, n_out_splits, _ = _split_plan(
        plan_blocks, 100, bps, t=t, block_e=32, n_out=n_out, out_split=out_split, exact_spread=True,
        want_splits=want, block_parts=p,
    )  # fmt: skip
    assert n_cold == (plan_blocks * p if p > 1 else -(-plan_blocks // bps))
    seen = _kernel_cover(n_cold, bps, p, blocks, t, block_t)
    assert all(c == 1 for row in seen for c in row)
    # exact outliers of block n: by its part-0 program (in-block), or by the outlier programs
    out_seen = [0] * (blocks * n_out)
    if out_split:
        for s in range(n_out_splits):
            for j in range(s * out_per, min(s * out_per + out_per, blocks * n_out)):
                out_seen[j] += 1
    elif n_out:
        for pid in range(n_cold):
            if p > 1:
                if pid % p == 0 and pid // p < blocks:
                    for o in range(n_out):
                        out_seen[(pid // p) * n_out + o] += 1
            else:
                for n in range(pid * bps, min(pid * bps + bps, blocks)):
                    for o in range(n_out):
                        out_seen[n * n_out + o] += 1
    assert all(c == 1 for c in out_seen)


@pytest.mark.parametrize(
    ("t", "plan_blocks", "plan_exact", "want", "expect"),
    [
        (501, 8, 89, 66, 4),  # 4K batch 1, default preset: 8 one-tile parts = 67 programs for 66 slots
        (512, 7, 513, 66, 8),  # 7 whole blocks: 8 parts fit (56 + 1 + 4 programs)
        (509, 32, 97, 66, 2),  # 16K: 4-tile parts overflowing within the slack are kept
    ],
)
def test_one_tile_parts_do_not_overflow_into_a_second_wave(t, plan_blocks, plan_exact, want, expect) -> None:
    """The automatic block parts at the shapes measured on the H200 (stop 23): one-tile parts whose
    programs overflow the wanted count give way to two-tile parts that fit; longer parts keep the
    1.25x slack (H100 stop 18: 16K, 2 parts for 75 programs beat 1 part)."""

    def programs(q: int) -> int:
        plan = _split_plan(
            plan_blocks, plan_exact, 1, t=t, block_e=32, n_out=8, out_split=True, exact_spread=True,
            want_splits=want, block_parts=q,
        )  # fmt: skip
        return plan[0] + plan[3] + plan[4]

    assert _resolve_block_parts(None, None, True, 1, plan_blocks, want, t, 64, programs) == expect
