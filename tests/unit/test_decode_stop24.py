"""Stop 24: the combine kernel's output columns split over programs (``combine_block_d``) and its
partials per load round (``combine_block_s``), with the automatic plan :func:`decode._combine_plan`.

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

import spectralcache.attention.triton.decode as dec  # noqa: E402
from spectralcache.attention.reference import spectral_attention  # noqa: E402
from spectralcache.attention.triton import decode_attention  # noqa: E402
from spectralcache.attention.triton.synthetic import random_state  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_seed = iter(range(24000, 30000))


def test_combine_plan_rule() -> None:
    """Automatic: 64 columns a program where the padded head_dim is wider, up to 128 partials a round
    (never more than the splits, rounded up to a power of two); a caller's values are checked."""
    assert dec._combine_plan(88, 128, None, None) == (64, 128)  # Llama-8B shape, 128K batch 1
    assert dec._combine_plan(26, 128, None, None) == (64, 32)
    assert dec._combine_plan(300, 256, None, None) == (64, 128)  # Gemma 3: four programs a row
    assert dec._combine_plan(88, 64, None, None) == (0, 128)  # one program covers the row
    assert dec._combine_plan(88, 48, None, None) == (0, 128)
    assert dec._combine_plan(3, 128, 16, 2) == (16, 2)
    assert dec._combine_plan(3, 128, 0, 64) == (0, 4)  # rounds of at most the splits
    assert dec._combine_plan(88, 128, 128, None) == (0, 128)  # a whole padded row is one program
    for bad in (8, 24, -16):
        with pytest.raises(ValueError, match="combine_block_d"):
            dec._combine_plan(88, 128, bad, None)
    for bad in (1, 3, 0):
        with pytest.raises(ValueError, match="combine_block_s"):
            dec._combine_plan(88, 128, None, bad)


@pytest.mark.parametrize(
    ("block_d", "block_s"), [(None, None), (0, 2), (16, None), (16, 2), (32, 4), (64, 8)]
)
def test_combine_columns_agree_with_reference(block_d: int | None, block_s: int | None) -> None:
    """Every column split and round size merges the same partials: the output is the reference's, a row
    whose every key is masked is zeros, and head_dim 48 (padded to 64) leaves no column unwritten; the
    combine grid has ``head_dim / D_BLOCK`` programs per output row."""
    state = random_state(
        batch=2, head_dim=48, device=DEVICE, seed=next(_seed), block_size=16, blocks=6, outliers=2, hot=9
    )
    query = torch.randn(2, 4, 1, 48).to(DEVICE)
    kv = int(state.seq_len)
    mask = torch.ones(2, 1, 1, kv, dtype=torch.bool, device=DEVICE)
    mask[1] = False  # batch row 1 sees nothing: zeros, not NaN
    mask[0, ..., 5:17] = False
    ref = spectral_attention(query, state, mask)
    grids = []
    combine = dec._COMBINE

    def record(grid, *args):
        grids.append(grid)
        return combine(grid, *args)

    dec._COMBINE = record
    try:
        # one block per program: many partials, so small rounds loop
        out = decode_attention(
            query, state, mask, blocks_per_split=1, combine_block_d=block_d, combine_block_s=block_s
        )
    finally:
        dec._COMBINE = combine
    assert torch.isfinite(out).all()
    assert float((out[0].float() - ref[0].float()).norm() / ref[0].float().norm()) < 1e-5
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    d_block = dec._combine_plan(8, 48, block_d, block_s)[0]
    assert grids == [(2 * 2 * 2, -(-48 // d_block) if d_block else 1)]


# ---- outlier rows flagged in the value scales (ColdBlocks.value_scales_flag_outliers, OUT_FLAG)

_CASES: dict = {}


def _case(preset: str, dtype: torch.dtype = torch.float32):
    """A real one-layer SpectralCache's decode state (``bench.attention.build_case``), cached per preset."""
    from spectralcache.bench.attention import build_case

    key = (preset, dtype)
    if key not in _CASES:
        _CASES[key] = build_case(preset, 1, 1400, 4, 2, 128, dtype, torch.device(DEVICE), 5)
    return _CASES[key]


def _launch(fn):
    from tests.kernel_helpers import record_launch

    return record_launch(fn)


@pytest.mark.parametrize("preset", ["default", "aggressive"])
def test_compress_blocks_flags_outlier_rows_in_value_scales(preset: str) -> None:
    """compress_blocks writes -1 into the value scale of exactly the outlier rows (every other scale >= 0)
    and says so; the torch reference never reads those rows (the flags replaced by positive scales give the
    same output, bit for bit)."""
    import dataclasses

    case = _case(preset)
    cold = case.state.cold
    assert cold.value_scales_flag_outliers
    vs = cold.value_scales[..., 0].float()  # [B, H, nb, T]
    flagged = torch.zeros_like(vs, dtype=torch.bool).scatter_(-1, cold.outlier_index, True)
    assert cold.outlier_index.shape[-1] > 0
    assert torch.equal(vs < 0, flagged)
    assert torch.all(vs[flagged] == -1.0)
    ref = spectral_attention(case.query, case.state)
    unflagged = dataclasses.replace(
        case.state,
        cold=dataclasses.replace(
            cold, value_scales=cold.value_scales.clamp_min(0.0) + 0.5 * (vs < 0)[..., None]
        ),
    )
    assert torch.equal(spectral_attention(case.query, unflagged), ref)


@pytest.mark.parametrize("preset", ["default", "aggressive"])
def test_kernel_masks_outliers_from_value_scales(preset: str) -> None:
    """OUT_FLAG: on a cache's own (flagged) state the kernel finds the outlier rows from the scales and
    matches the reference, as the per-block mask (``outlier_flags=False``) does; with the flags removed
    but the blocks still claiming them, the outlier rows' compressed scores leak in -- so the flags are
    what masks them."""
    import dataclasses

    case = _case(preset)
    st = case.state
    ref = spectral_attention(case.query, st)
    out, seen = _launch(lambda: decode_attention(case.query, st))
    assert seen["OUT_FLAG"]
    err_flag = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err_flag < 1e-5
    out, seen = _launch(lambda: decode_attention(case.query, st, outlier_flags=False))
    assert not seen["OUT_FLAG"]
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-5
    cold = st.cold
    lost = dataclasses.replace(st, cold=dataclasses.replace(cold, value_scales=cold.value_scales.abs()))
    err_lost = float((decode_attention(case.query, lost).float() - ref.float()).norm() / ref.float().norm())
    assert err_lost > max(1e-5, 10 * err_flag)


def test_kernel_outlier_flags_bf16_and_unflagged_states() -> None:
    """bfloat16 on the default preset's flagged state (< 1e-2 of the reference); synthetic states carry no
    flags, so the kernel keeps the per-block mask there."""
    case = _case("default", torch.bfloat16)
    out, seen = _launch(lambda: decode_attention(case.query, case.state))
    ref = spectral_attention(case.query, case.state)
    assert seen["OUT_FLAG"] and float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    state = random_state(device=DEVICE, seed=next(_seed), block_size=16, blocks=4, outliers=3, hot=9)
    assert not state.cold.value_scales_flag_outliers
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    out, seen = _launch(lambda: decode_attention(query, state))
    assert not seen["OUT_FLAG"]
    ref = spectral_attention(query, state)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


# ---- the flat loop's tiles turned over (tile_transposed, TILE_T; an option, off by default)


@pytest.mark.parametrize(
    "launch",
    [
        {},
        {"outlier_flags": False},
        {"outlier_flags": False, "outlier_cols": True},
        {"defer_den": False},
        {"blocks_per_split": 1},
        {"mask": True},
    ],
)
def test_tile_transposed_agrees_with_reference(launch: dict) -> None:
    """TILE_T computes the same function as the kernel's own orientation: on a real default-preset state
    (channel keys with zero points, flagged outliers), with the per-block bit masks instead of the flags,
    without the deferred denominator, one block a program, and under a bool mask."""
    case = _case("default")
    kw = dict(launch)
    mask = None
    if kw.pop("mask", False):
        mask = torch.ones(1, 1, 1, int(case.state.seq_len), dtype=torch.bool, device=DEVICE)
        mask[..., 40:700] = False
    ref = spectral_attention(case.query, case.state, mask)
    out, seen = _launch(lambda: decode_attention(case.query, case.state, mask, tile_transposed=True, **kw))
    assert seen["TILE_T"] and seen["FLAT"]
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-5


def test_tile_transposed_other_layouts_and_refusal() -> None:
    """TILE_T on channel keys without zero points (bf16) and on identity int4 keys with per-row scales
    (synthetic, GQA 4); off unless asked; refused where the flat loop does not run."""
    from spectralcache.bench.attention import build_case
    from spectralcache.config import SpectralConfig

    cfg = SpectralConfig.from_preset("default").replace(key_zero_point=False)
    case = build_case(cfg, 1, 1400, 4, 2, 128, torch.bfloat16, torch.device(DEVICE), 6)
    ref = spectral_attention(case.query, case.state)
    out, seen = _launch(lambda: decode_attention(case.query, case.state, tile_transposed=True))
    assert seen["TILE_T"] and float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    state = random_state(
        device=DEVICE, seed=next(_seed), block_size=64, blocks=3, outliers=2, hot=9, key_bits=4,
        identity_keys=True, identity_values=True, rank_keys=32, rank_values=32,
    )  # fmt: skip
    query = torch.randn(1, 8, 1, 32).to(DEVICE)
    ref = spectral_attention(query, state)
    flat = {"block_stages": 0, "block_parts": 1}  # the run-time tile loop the flat layout needs
    out, seen = _launch(lambda: decode_attention(query, state, tile_transposed=True, **flat))
    assert seen["TILE_T"] and seen["FLAT"] and float((out - ref).norm() / ref.norm()) < 1e-5
    _, seen = _launch(lambda: decode_attention(query, state, **flat))
    assert seen["FLAT"] and not seen["TILE_T"]
    with pytest.raises(ValueError, match="tile_transposed"):
        decode_attention(query, state, tile_transposed=True, flat_tiles=0, **flat)
    with pytest.raises(ValueError, match="tile_transposed"):
        decode_attention(query, state, tile_transposed=True, block_stages=2)
    with pytest.raises(ValueError, match="key_raw"):
        decode_attention(query, state, tile_transposed=True, key_raw=True, **flat)
