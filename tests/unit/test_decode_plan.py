"""The decode kernel's launch plan: every cold block, outlier row and exact token lands in exactly
one program, and no program is empty.

Pure arithmetic (no kernel launch): the kernels' agreement with the torch reference under any
``blocks_per_split`` is tested in ``test_triton_decode.py::test_split_plans_agree``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from spectralcache.attention.triton.decode import _split_plan


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
