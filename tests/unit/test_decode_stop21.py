"""Stop 21 kernel options: the outlier mask per tile column (``outlier_cols``), value bytes stored
tokens-contiguous, the paired int4 widening (``int4_asm`` 2) and the timing-only ablation flags.

Kernel cases run through Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``) or compiled on CUDA; the int4 widening's PTX, which only a compiled kernel runs,
is checked here by executing its instructions on every byte value.
"""

from __future__ import annotations

import inspect
import os
import re

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from tests.kernel_helpers import record_launch  # noqa: E402

import spectralcache.attention.triton.decode as dec  # noqa: E402
import spectralcache.attention.triton.decode_splits as ds  # noqa: E402
from spectralcache.attention.reference import spectral_attention  # noqa: E402
from spectralcache.attention.triton import decode_attention  # noqa: E402
from spectralcache.attention.triton.synthetic import random_state  # noqa: E402
from spectralcache.cache.layer import tokens_contiguous  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_seed = iter(range(21000, 30000))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) output elements"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _launch(fn, bits: int = 0):
    """``record_launch`` (tests/kernel_helpers.py): output and the split launch's constexprs / options;
    ``bits``: the timing-only ablation bits."""
    return record_launch(fn, bits)


def _default_layout(dtype=torch.float32, **kw):
    """The default preset's layout (per-channel int4 keys with zero points, per-token int4 values) in
    64-token blocks with many outliers: 16-token tiles, so the flat tile loop reads 4 tiles a block."""
    args = dict(device=DEVICE, seed=next(_seed), head_dim=32, block_size=64, blocks=5, key_bits=4,
                channel_keys=True, key_zero_point=True, identity_values=True, outliers=12, dtype=dtype)  # fmt: skip
    args.update(kw)
    return random_state(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outlier_cols_agree(dtype: torch.dtype) -> None:
    """outlier_cols (the flat tile loop; automatic for programs of more than 32 tiles): the block's
    outlier rows as one bit per tile per column. A bit of the wrong tile leaves an outlier's low-rank row in the softmax (it is then
    attended twice, once exactly) and masks a plain row: the output moves off the reference. The
    outlier rows are spread over every tile of the block (12 of 64 rows)."""
    state = _default_layout(dtype)
    idx = state.cold.outlier_index
    assert set((idx // 16).unique().tolist()) == {0, 1, 2, 3}, "outliers should fall in every tile"
    query = (2 * torch.randn(1, 4, 1, 32)).to(dtype).to(DEVICE)
    ref = spectral_attention(query, state)
    bar = 1e-5 if dtype == torch.float32 else 1e-2
    outs = {}
    for cols in (True, False):
        outs[cols], seen = _launch(
            lambda cols=cols: decode_attention(
                query, state, block_t=16, blocks_per_split=2, outlier_cols=cols
            )
        )
        assert seen["FLAT"] == 1 and seen["OUT_COLS"] == cols
        assert _rel(outs[cols], ref) < bar
    # not the flat loop (blocks of two tiles: pipelined block loop): the option does not apply
    _, seen = _launch(
        lambda: decode_attention(query, state, block_t=32, blocks_per_split=2, outlier_cols=True)
    )
    assert seen["FLAT"] == 0 and not seen["OUT_COLS"]
    # automatic: only for programs of at least 32 tiles (here 8 blocks of 4 tiles in one program)
    state = _default_layout(blocks=9)
    _, seen = _launch(lambda: decode_attention(query, state, block_t=16, blocks_per_split=8))
    assert seen["FLAT"] == 1 and seen["OUT_COLS"]
    _, seen = _launch(lambda: decode_attention(query, state, block_t=16, blocks_per_split=7))
    assert seen["FLAT"] == 1 and not seen["OUT_COLS"]


def test_outlier_cols_rule() -> None:
    rule = dec._outlier_cols
    assert rule(None, 1, 8, 512, 64, 256) and rule(True, 1, 8, 512, 64, 8)
    assert rule(None, 1, 8, 512, 64, 32)  # 128K batch 1 (stop 23, the cache's own state: faster)
    assert not rule(None, 1, 8, 512, 64, 8)  # 32K batch 1: level, left off
    assert not rule(False, 1, 8, 512, 64, 256)
    assert not rule(True, 0, 8, 512, 64, 256)  # not the flat loop
    assert not rule(True, 1, 0, 512, 64, 256)  # no outliers
    assert rule(True, 1, 8, 31 * 16, 16, 62) and not rule(True, 1, 8, 32 * 16, 16, 64)  # bits per column


def test_num_stages_rule_for_tokens_contiguous_values() -> None:
    """3 pipeline stages (Triton's default) for the flat loop over tokens-contiguous value bytes from 9
    tiles a program on (measured at 32: 0.0667 against 0.0738 ms), 2 up to 8; the row-major layout keeps
    2 up to 32; and the launch passes the layout it sees."""
    rule = dec._auto_num_stages
    assert rule(None, 1, 32) == 2 and rule(None, 1, 32, True) is None
    assert rule(None, 1, 8, True) == 2 and rule(None, 1, 9, True) is None
    assert rule(None, 0, 32, True) is None and rule(4, 1, 32, True) == 4
    state = _default_layout(blocks=6)
    state.cold.value_coeffs = tokens_contiguous(state.cold.value_coeffs)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    # 12 tiles a program
    out, seen = _launch(lambda: decode_attention(query, state, block_t=16, blocks_per_split=3))
    assert "num_stages" not in seen["_options"]  # Triton's default
    assert _rel(out, spectral_attention(query, state)) < 1e-5


def test_programs_per_sm_rule() -> None:
    """Packed int4 low-rank layouts under the pipelined block loop: 8 programs per SM when 4 would leave
    at most 8 per (batch row, KV head) -- the aggressive preset at batch 8 on 132 SMs --, 3 when 4 would
    give at least 64 (batch 1, stop 23); else 4; a caller's value stands."""
    rule = dec._auto_programs_per_sm
    assert rule(None, 2, False, True, 64, 132) == 8  # aggressive, batch 8 x 8 KV heads
    assert rule(None, 2, False, True, 8, 132) == 3  # batch 1: 66 programs per KV head at 4
    assert rule(None, 2, False, True, 16, 132) == 4  # batch 2: 33 (not measured)
    assert rule(None, 0, True, True, 8, 132) == 4  # default layout at batch 1 (slower with 3)
    assert rule(None, 0, True, True, 64, 132) == 4  # default layout (nibble split, flat loop)
    assert rule(None, 2, False, False, 64, 132) == 4  # int8 low-rank: not measured
    assert rule(None, 0, False, True, 64, 132) == 4  # block loop not pipelined
    assert rule(3, 2, False, True, 64, 132) == 3


@pytest.mark.parametrize("layout", ["default", "lowrank"])
def test_value_bytes_stored_tokens_contiguous_agree(layout: str) -> None:
    """The stop-21 prototype layout: cold value coefficients stored with tokens contiguous (memory
    [.., nb, w, T], the same [.., nb, T, w] tensor as a transposed view). The kernel reads them through
    their strides: same answer as the reference on the same state."""
    if layout == "default":
        state = _default_layout()
    else:
        state = random_state(device=DEVICE, seed=next(_seed), head_dim=32, block_size=32, blocks=5, key_bits=4,
                             value_bits=4, rank_keys=8, rank_values=16, outliers=3)  # fmt: skip
    vc = state.cold.value_coeffs
    state.cold.value_coeffs = tokens_contiguous(vc)
    assert state.cold.value_coeffs.stride(-2) == 1 and torch.equal(state.cold.value_coeffs, vc)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    out = decode_attention(query, state, block_t=16, blocks_per_split=2)
    assert _rel(out, spectral_attention(query, state)) < 1e-5


# -- the packed int4 widening PTX, executed instruction by instruction on the host


def _f16x2(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def _word(h: np.ndarray) -> int:
    u = np.asarray(h, dtype=np.float16).view(np.uint16)
    return int(u[0]) | (int(u[1]) << 16)


def _run_ptx(asm: str, operands: list[int]) -> list[int]:
    """Execute the subset of PTX the widening uses (mov / prmt / shr / lop3 0x6a / sub.f16x2 /
    fma.rn.f16x2 on .b32 registers); ``$k`` are the inline-asm operands."""
    regs = {f"${i}": v for i, v in enumerate(operands)}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 16) if tok.startswith("0x") else int(tok)

    for line in asm.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        s = [val(t) for t in src]
        if op == "mov.b32":
            r = s[0]
        elif op == "prmt.b32":
            pool = [(s[0] >> (8 * i)) & 255 for i in range(4)] + [(s[1] >> (8 * i)) & 255 for i in range(4)]
            r = sum(pool[(s[2] >> (4 * i)) & 7] << (8 * i) for i in range(4))
        elif op == "shr.u32":
            r = s[0] >> s[1]
        elif op == "lop3.b32":
            assert s[3] == 0x6A, "only (a & b) ^ c is modelled"
            r = (s[0] & s[1]) ^ s[2]
        elif op == "sub.f16x2":
            r = _word(_f16x2(s[0]).astype(np.float32) - _f16x2(s[1]).astype(np.float32))
        elif op == "fma.rn.f16x2":
            a, b, c = (_f16x2(x).astype(np.float64) for x in s)
            r = _word(a * b + c)  # one rounding, as fma
        else:
            raise AssertionError(f"unmodelled PTX instruction {op!r}")
        regs[dst] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(4)]


@pytest.mark.parametrize("form", [1, 2])
@pytest.mark.parametrize("raw", [False, True])
def test_int4_widening_ptx_exact_for_every_byte(form: int, raw: bool) -> None:
    """Both PTX forms of the packed int4 widening (I4_ASM 1: the stop-19 spread; 2: the paired form,
    the default since stop 21), with and without the raw offset (KEY_RAW: 1032 + n), give every nibble
    of every byte value in every byte position exactly: ``$0 $1`` the low nibbles of bytes 0-1 / 2-3,
    ``$2 $3`` the high ones, as ``tl.inline_asm_elementwise(pack=4)`` hands them back."""
    asm = {
        (1, False): ds._I4_F16_ASM,
        (1, True): ds._I4_F16_RAW_ASM,
        (2, False): ds._I4_F16_PAIR_ASM,
        (2, True): ds._I4_F16_PAIR_RAW_ASM,
    }[(form, raw)]
    asm = asm.value if hasattr(asm, "value") else asm
    assert len(re.findall(r"\$[0-3]\b", asm)) >= 4
    rng = np.random.default_rng(21)
    offset = 1032 if raw else 0
    for b in range(256):
        for pos in range(4):
            others = rng.integers(0, 256, 4)
            others[pos] = b
            word = sum(int(x) << (8 * i) for i, x in enumerate(others))
            out = _run_ptx(asm, [0, 0, 0, 0, word])
            lo = np.concatenate([_f16x2(out[0]), _f16x2(out[1])]).astype(np.float32)
            hi = np.concatenate([_f16x2(out[2]), _f16x2(out[3])]).astype(np.float32)
            signed = [(x & 15) - 16 * ((x & 15) >= 8) for x in others]
            signed_hi = [(x >> 4) - 16 * ((x >> 4) >= 8) for x in others]
            assert lo.tolist() == [offset + v for v in signed], (form, raw, b, pos)
            assert hi.tolist() == [offset + v for v in signed_hi], (form, raw, b, pos)


def test_int4_asm_form_choice() -> None:
    assert dec._int4_asm_form(None) == (2 if torch.version.hip is None else 0)
    assert dec._int4_asm_form(True) == dec._int4_asm_form(None)
    assert dec._int4_asm_form(False) == 0 and dec._int4_asm_form(1) == 1 and dec._int4_asm_form(2) == 2
    with pytest.raises(ValueError, match="int4_asm"):
        dec._int4_asm_form(3)


# -- timing-only ablations


def test_ablation_flags_are_private_and_timing_only() -> None:
    """ABLATE (parts of the tile work left out; results wrong) is not reachable from the public call:
    decode_attention has no parameter for it and always launches with 0; set through the launch hook
    (as benchmarks/attention_kernel_dev.py's ``ablate`` does), each bit changes the answer -- the
    flags really remove work -- and 0 is the reference."""
    assert not any("ablat" in p.lower() for p in inspect.signature(decode_attention).parameters)
    state = _default_layout()
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    ref = spectral_attention(query, state)

    def call():
        return decode_attention(query, state, block_t=16, blocks_per_split=2)

    out, seen = _launch(call)
    assert seen["ABLATE"] == 0 and seen["FLAT"] == 1 and _rel(out, ref) < 1e-5
    for bits in (1, 2, 4, 8):
        ablated, _ = _launch(call, bits)
        assert _rel(ablated, ref) > 1e-3, f"ABLATE {bits} left the answer unchanged"


@pytest.mark.parametrize("flat_tiles", [1, 3])
@pytest.mark.parametrize("blocks_per_split", [1, 2, 3])
def test_flat_loop_setup_one_block_ahead_agrees(flat_tiles: int, blocks_per_split: int) -> None:
    """flat_tiles 3: each block's setup data (start, outlier rows, channel scales, zero points) is loaded
    at the previous block's first tile. A block that took its neighbour's scales, zero points or outlier
    rows, or a program past the last block that read out of bounds, changes the answer (5 blocks: the
    last program holds fewer blocks than the others)."""
    state = _default_layout(blocks=5)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    out, seen = _launch(
        lambda: decode_attention(
            query, state, block_t=16, blocks_per_split=blocks_per_split, flat_tiles=flat_tiles
        )
    )
    assert seen["FLAT"] == flat_tiles
    assert _rel(out, spectral_attention(query, state)) < 1e-5


def test_flat_loop_setup_one_block_ahead_with_graph_capacity() -> None:
    """flat_tiles 3 under CUDA-graph sizing: the grid covers twice the live blocks, so programs past
    them find an empty block range (their one-block-ahead loads are masked off)."""
    from spectralcache.attention.triton.graph import DecodeGraphSizes

    state = _default_layout(blocks=3)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    sizes = DecodeGraphSizes(state, q_len=1)
    sizes.update(state)
    kw = {**sizes.launch_kwargs(), "capacity_blocks": 6}
    out = torch.full_like(query, float("nan"))
    decode_attention(query, state, out=out, block_t=16, blocks_per_split=1, flat_tiles=3, **kw)
    assert _rel(out, spectral_attention(query, state)) < 1e-5
