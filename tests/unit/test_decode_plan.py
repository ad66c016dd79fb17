"""The decode kernel's launch plan: every cold block, outlier row and exact token lands in exactly
one program, and the wave fit only ever trades more blocks per program for fewer partial waves.

Pure arithmetic (no kernel launch): the kernels' agreement with the torch reference under any
``blocks_per_split`` is tested in ``test_triton_decode.py::test_split_plans_agree``.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from spectralcache.attention.triton.decode import _split_plan, _wave_fit


def _plan(blocks: int, exact: int, *, t: int = 512, n_out: int = 16, want_splits: int = 66, **kw):
    kw = {"block_e": 32, "out_split": n_out > 0, "exact_spread": True, **kw}
    return functools.partial(_split_plan, blocks, exact, t=t, n_out=n_out, want_splits=want_splits, **kw)


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


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.integers(1, 2000),
    exact=st.integers(1, 1500),
    n_out=st.sampled_from([0, 16, 32]),
    n_bh=st.sampled_from([1, 2, 8, 32, 64]),
    slots=st.sampled_from([264, 528, 1056]),
)
def test_wave_fit_never_costs_more_waves(blocks, exact, n_out, n_bh, slots) -> None:
    want = -(-slots // n_bh)
    bps0 = max(1, -(-blocks // want))
    plan = _plan(blocks, exact, n_out=n_out, want_splits=want)

    def cost(bps: int) -> int:
        n_cold, _, _, n_out_splits, n_exact = plan(bps)
        return -(-(n_bh * (n_cold + n_out_splits + n_exact)) // slots) * bps

    bps = _wave_fit(plan, bps0, n_bh, slots)
    assert bps0 <= bps <= 2 * bps0
    assert cost(bps) <= cost(bps0)
    assert all(cost(b) >= cost(bps) for b in range(bps0, 2 * bps0 + 1))


def test_wave_fit_removes_the_second_wave_at_128k() -> None:
    """The measured case (Llama-8B shape, aggressive preset, 128K, batch 1, 132 SMs x 4 programs):
    4 blocks per program gave 664 programs for 528 slots; 5 give exactly 528."""
    blocks, exact, n_bh, slots = (131072 - 16 - 64) // 512, 16 + 496 + 1, 8, 528
    plan = _plan(blocks, exact, n_out=16, want_splits=-(-slots // n_bh))
    assert n_bh * sum(plan(4)[i] for i in (0, 3, 4)) == 664
    bps = _wave_fit(plan, 4, n_bh, slots)
    assert bps == 5 and n_bh * sum(plan(bps)[i] for i in (0, 3, 4)) == 528
