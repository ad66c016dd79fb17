"""Stop 22 kernel options: programmatic dependent launch (``pdl``, compiled Hopper only) and shorter
outlier / exact programs (``short_rows``, automatic at batch 1 for packed int4 layouts).

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


def test_pdl_only_where_compiled_for_hopper() -> None:
    """pdl: programmatic dependent launch needs a compiled kernel on a CUDA card of compute capability 9
    or more; the interpreter and CPU tensors never get it (the launch options and PDL constexpr stay off).
    Since stop 24 the default (None) is form 2 (the combine kernel only) where it applies; False / 0: off."""
    if DEVICE == "cpu":
        assert not dec._use_pdl(None, torch.device("cpu"))
    else:
        hopper = torch.cuda.get_device_capability()[0] >= 9 and torch.version.hip is None
        assert dec._use_pdl(None, torch.device(DEVICE)) == (2 if hopper else 0)
    assert not dec._use_pdl(False, torch.device(DEVICE)) and not dec._use_pdl(0, torch.device(DEVICE))
    assert not dec._use_pdl(True, torch.device("cpu")) and not dec._use_pdl(2, torch.device("cpu"))
    if DEVICE == "cpu":
        state = random_state(device=DEVICE, seed=next(_seed))
        query = torch.randn(1, 4, 1, 32)
        out, seen = record_launch(lambda: decode_attention(query, state, pdl=True))
        assert not seen["PDL"] and "launch_pdl" not in seen["_options"]
        assert _rel(out, spectral_attention(query, state)) < 1e-5
        with pytest.raises(ValueError, match="pdl"):  # checked off the GPU too
            decode_attention(query, state, pdl=3)
    with pytest.raises(ValueError, match="pdl"):
        dec._use_pdl(3, torch.device("cpu"))
    assert dec._options(4, 2, 128, True)["launch_pdl"] is True
    assert "launch_pdl" not in dec._options(4, 2, 128)


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
    assert dec._auto_short_rows(66, 32, (64, 256, 256, 32, 3), int4=False) is None  # int8 lowrank: kept
