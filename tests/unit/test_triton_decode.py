"""The fused Triton decode kernel must compute exactly what the torch reference computes.

On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` when no CUDA device is present), on tiny shapes; the same kernels run
compiled on CUDA in ``tests/gpu``. Every case draws a fresh random state (``synthetic.random_state``:
cold and hot tensors are strided views into capacity buffers, as the cache keeps them) and
query, fills the output with NaN first (so an unwritten element fails), and compares with
``spectral_attention`` by relative norm: < 1e-5 in float32, < 1e-2 in bfloat16.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from tests.kernel_helpers import record_launch  # noqa: E402

from spectralcache.attention.reference import spectral_attention  # noqa: E402
from spectralcache.attention.triton import MAX_ROWS, decode_attention  # noqa: E402
from spectralcache.attention.triton.synthetic import random_state  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_seed = iter(range(1000, 100000))


def _padded_mask(batch: int, q_len: int, seq_len: int, pads: torch.Tensor) -> torch.Tensor:
    """transformers-style bool [B, 1, q, kv]: causal by cache index, left padding per row."""
    q_pos = torch.arange(seq_len - q_len, seq_len)
    kv = torch.arange(seq_len)
    keep = (kv[None, :] <= q_pos[:, None])[None] & (kv[None, None, :] >= pads[:, None, None])
    return keep[:, None]


def _check(
    *,
    groups: int = 2,
    q_len: int = 1,
    dtype: torch.dtype = torch.float32,
    mask: str | None = None,
    softcap: float | None = None,
    blocks_per_split: int | None = 1,
    block_stages: int | None = None,
    outlier_split: bool | None = None,
    min_rows: int | None = None,
    exact_spread: bool = False,
    int4_bytes: int = 32,
    int4_pad: bool = True,
    block_parts: int | None = None,
    launch: dict | None = None,
    **state_kw,
) -> float:
    seed = next(_seed)
    kw = dict(batch=1, kv_heads=2, head_dim=32, dtype=dtype, seed=seed, device=DEVICE)
    kw.update(state_kw)
    if q_len > 1 and "chunk" not in state_kw:
        kw["chunk"] = q_len
    state = random_state(**kw)
    g = torch.Generator().manual_seed(seed)
    b, h, d = kw["batch"], kw["kv_heads"], kw["head_dim"]
    query = torch.randn(b, h * groups, q_len, d, generator=g).to(dtype).to(DEVICE)
    attn_mask = None
    if mask is not None:
        pads = torch.randint(0, state.seq_len // 2, (b,), generator=g)
        attn_mask = _padded_mask(b, q_len, state.seq_len, pads).to(DEVICE)
        if mask == "float":
            attn_mask = torch.where(attn_mask, 0.0, torch.finfo(dtype).min).to(dtype)
    out = torch.full_like(query, float("nan"))
    got = decode_attention(
        query, state, attn_mask, None, softcap, out=out, blocks_per_split=blocks_per_split, block_t=16,
        block_stages=block_stages, outlier_split=outlier_split, min_rows=min_rows,
        exact_spread=exact_spread, int4_bytes=int4_bytes, int4_pad=int4_pad, block_parts=block_parts,
        **(launch or {}),
    )  # fmt: skip
    assert got is out
    ref = spectral_attention(query, state, attn_mask, softcap=softcap)
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) output elements"
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    bar = 1e-5 if dtype == torch.float32 else 1e-2
    assert err < bar, f"relative error {err:.2e} >= {bar}"
    return err


def _assert_rel(out: torch.Tensor, ref: torch.Tensor, bar: float = 1e-5) -> None:
    assert torch.isfinite(out).all()
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err < bar, f"relative error {err:.2e} >= {bar}"


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("key_bits", [8, 4, 16])
@pytest.mark.parametrize("codecs", ["lowrank", "identity_keys", "identity_values", "identity_both"])
def test_modes_float32(key_space: str, key_bits: int, codecs: str) -> None:
    _check(
        key_space=key_space,
        key_bits=key_bits,
        identity_keys=codecs in ("identity_keys", "identity_both"),
        identity_values=codecs in ("identity_values", "identity_both"),
    )


@pytest.mark.parametrize("value_bits", [4, 8, 16])
def test_value_width_differs_from_key_width(value_bits: int) -> None:
    _check(key_bits=8, value_bits=value_bits)


@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 4])
def test_gqa_and_batch(groups: int, batch: int) -> None:
    _check(groups=groups, batch=batch, kv_heads=1 if batch == 4 else 2, blocks=2)


@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_padding_masks_and_small_q(mask: str, q_len: int) -> None:
    _check(batch=2, mask=mask, q_len=q_len, blocks=3)


def test_causal_small_q_without_mask() -> None:
    # speculative decoding: q > 1 with mask None means causal by cache index
    _check(q_len=4, groups=4)


@pytest.mark.parametrize(
    "shape",
    [
        dict(block_size=13, rank_keys=5, rank_values=7, outliers=3),  # odd sizes, odd int4 ranks
        dict(block_size=16, outliers=0),  # no outliers
        dict(blocks=0),  # exact tiers only
        dict(landmarks=0, hot=0, chunk=None),  # cold tier only
        dict(chunk=20, hot=6),  # the chunk starts inside the last block (partially served block)
        dict(blocks=5, hot=40, landmarks=9),  # several exact splits
        dict(head_dim=24, rank_keys=6),  # head_dim not a power of two
        # identity sides narrower than int4_bytes: their tiles stay head_dim wide (not int4-padded)
        dict(head_dim=16, identity_keys=True, identity_values=True, key_space="pre_rope"),
    ],
)
@pytest.mark.parametrize("key_bits", [8, 4])
def test_odd_shapes_and_partial_blocks(shape: dict, key_bits: int) -> None:
    q_len = shape.get("chunk") or 1
    kw = dict(shape)
    if q_len > 1:
        kw["chunk"] = q_len
    groups = 2 if q_len * 2 <= MAX_ROWS else 1
    _check(key_bits=key_bits, q_len=min(q_len, 20), groups=groups, **kw)


def test_pre_rope_partial_rotary() -> None:
    _check(key_space="pre_rope", rot_dim=16)
    _check(key_space="pre_rope", rot_dim=16, identity_keys=True, key_bits=4)


def test_softcap() -> None:
    _check(softcap=2.0)
    _check(softcap=5.0, key_space="pre_rope", mask="bool", batch=2)


@pytest.mark.parametrize("exact_spread", [False, True])
@pytest.mark.parametrize("blocks_per_split", [None, 1, 2, 5])
def test_split_plans_agree(blocks_per_split: int | None, exact_spread: bool) -> None:
    _check(blocks=4, blocks_per_split=blocks_per_split, exact_spread=exact_spread, hot=70, landmarks=9)


@pytest.mark.parametrize(
    "kw",
    [
        dict(key_bits=4, blocks=5, outliers=3),
        dict(key_bits=8, key_space="pre_rope", mask="bool", batch=2),
        dict(key_bits=4, identity_keys=True, identity_values=True, blocks=4),
        dict(block_size=100, rank_keys=5, rank_values=7, q_len=3, groups=2, mask="float"),
        dict(dtype=torch.bfloat16, groups=4, key_bits=4, blocks=6, softcap=5.0),
    ],
)
@pytest.mark.parametrize("blocks_per_split", [1, 3])
def test_block_pipelined_loop_agrees(kw: dict, blocks_per_split: int) -> None:
    # block_stages > 0: the tiles of a block unrolled, the block loop software-pipelined
    _check(block_stages=2, blocks_per_split=blocks_per_split, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(key_bits=4, blocks=5, outliers=3),
        dict(key_bits=8, key_space="pre_rope", mask="bool", batch=2, block_stages=2),
        dict(block_size=100, rank_keys=5, rank_values=7, q_len=3, groups=2, mask="float", outliers=7),
        dict(dtype=torch.bfloat16, groups=4, key_bits=4, blocks=6, softcap=5.0, block_stages=2),
        dict(chunk=20, hot=6, q_len=20, groups=1, outliers=5),  # the chunk starts inside the last block
        dict(outliers=0),  # nothing to split: the option is ignored
    ],
)
@pytest.mark.parametrize("blocks_per_split", [1, 2, None])
def test_outliers_in_programs_of_their_own_agree(kw: dict, blocks_per_split: int | None) -> None:
    # outlier_split: the blocks' exact outlier rows are attended by separate programs
    _check(outlier_split=True, blocks_per_split=blocks_per_split, **kw)


_CHANNEL_ZP = dict(channel_keys=True, key_zero_point=True, identity_values=True, value_bits=4)


@pytest.mark.parametrize(
    "kw",
    [
        # the default preset's layout: int4 channel keys with zero points, int4 identity values
        dict(key_bits=4, **_CHANNEL_ZP, outliers=5),
        dict(key_bits=8, key_space="pre_rope", **_CHANNEL_ZP, mask="bool", batch=2),
        dict(key_bits=4, key_space="pre_rope", **_CHANNEL_ZP, rot_dim=16, outlier_split=False),
        # low-rank int4 / int8, post- and pre-RoPE (each part keeps its own latent, times B_V at its end)
        dict(key_bits=4, outliers=6, outlier_split=False),
        dict(key_bits=4, outliers=6, outlier_split=True),
        dict(key_bits=8, key_space="pre_rope", outliers=6, outlier_split=False, mask="float", batch=2),
        dict(key_bits=8, key_space="pre_rope", outliers=6, outlier_split=True, q_len=3),
        dict(key_bits=4, dtype=torch.bfloat16, groups=8, batch=2, mask="bool"),  # GQA 8, batch 2
        dict(key_bits=8, block_stages=2, outlier_split=False),  # the tiles of a part unrolled
        # block_size not a multiple of the 16-token tile: 104 = 7 tiles (the last half full) -> parts of
        # 2 tiles and a last part of one partial tile; 40 = 3 tiles -> P <= 2; 13 = 1 tile -> P = 1
        dict(key_bits=4, block_size=104, blocks=2, outliers=9, outlier_split=False, rank_keys=5),
        dict(key_bits=8, block_size=104, blocks=2, **_CHANNEL_ZP, block_stages=2, outlier_split=False),
        dict(key_bits=8, block_size=40, outliers=4, chunk=20, hot=6, q_len=20, groups=1, outlier_split=False),
        dict(key_bits=4, block_size=13, rank_keys=5, rank_values=7, outliers=3),
    ],
)
@pytest.mark.parametrize("block_parts", [1, 2, 4])
def test_block_parts_agree(kw: dict, block_parts: int) -> None:
    """block_parts: each cold block read by P programs (tokens [j·T/P, (j+1)·T/P) in whole tiles), one
    partial each; part 0 alone attends the block's exact outliers (else the OUT_SPLIT programs). A part
    missing a tile, or outliers attended by no part or by several, changes the answer."""
    kw = {"block_size": 64, "blocks": 3, **kw}
    if kw.get("q_len", 1) > 1 and "chunk" not in kw:
        kw["chunk"] = kw["q_len"]
    _check(block_parts=block_parts, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        # the default preset's layout (block 128 / 2 outliers and block 64 / 5), outliers in the block
        # programs (part 0) or in programs of their own, bf16 with GQA 4 and a padding mask
        dict(key_bits=4, **_CHANNEL_ZP, block_size=32, outliers=2, outlier_split=False),
        dict(key_bits=4, **_CHANNEL_ZP, outliers=5, outlier_split=True, block_parts=2),
        dict(key_bits=4, **_CHANNEL_ZP, dtype=torch.bfloat16, groups=4, mask="bool", batch=2),
        # several blocks per program: the flat tile loop crosses block boundaries (setup at each block's
        # first tile), a block size that is not a multiple of the tile (a partial last tile per block)
        dict(key_bits=4, **_CHANNEL_ZP, blocks=5, blocks_per_split=3, outliers=4, mask="bool", batch=2),
        dict(key_bits=4, **_CHANNEL_ZP, block_size=40, blocks=4, blocks_per_split=None, outliers=3, q_len=3),
        # symmetric channel keys (no zero points), per-row identity int4 keys, head_dim 64
        dict(key_bits=4, channel_keys=True, identity_values=True, value_bits=4, q_len=3, outlier_split=False),
        dict(
            key_bits=4,
            identity_keys=True,
            identity_values=True,
            head_dim=64,
            mask="float",
            blocks_per_split=2,
        ),
        # int4 identity values under low-rank int8 keys; pre-RoPE channel keys (values split only)
        dict(key_bits=8, identity_values=True, value_bits=4, outliers=3, outlier_split=False),
        dict(key_bits=4, key_space="pre_rope", **_CHANNEL_ZP, outlier_split=False),
        # odd head_dim: the last byte's high nibble is padding, its odd column past head_dim
        dict(key_bits=4, **_CHANNEL_ZP, head_dim=24, block_size=13, outliers=3, groups=1),
    ],
)
@pytest.mark.parametrize(
    "launch",
    [
        dict(nibble_split=True, defer_den=True),
        dict(nibble_split=True, defer_den=False, flat_tiles=False),
        dict(nibble_split=True, flat_tiles=1),
        dict(nibble_split="keys", defer_den=False),
        dict(nibble_split=False, defer_den=True),
    ],
)
def test_nibble_split_and_deferred_sums_agree(kw: dict, launch: dict) -> None:
    """nibble_split: packed int4 identity rows read as low / high nibble tiles, the low nibbles (even
    columns) and high nibbles (odd columns) meeting the query's even / odd columns (keys) or filling
    the output's even / odd columns (values), interleaved once per program; defer_den: the softmax
    denominator kept per tile column and summed once; flat_tiles: one tile loop across a program's
    blocks. A nibble paired with the wrong column, a lost outlier sum, or a block setup missed at a
    block boundary changes the answer."""
    kw = {"block_size": 64, "blocks": 3, **kw}
    _check(launch=launch, **kw)


def test_nibble_split_rule_and_launch() -> None:
    """Which layouts read nibble-split (packed int4 identity rows; keys post-RoPE only; at least 32
    padded columns), and that the launch really compiles the split kernel for the default layout, with
    the flat tile loop or the pipelined block loop as the automatic plan chooses."""
    import spectralcache.attention.triton.decode as dec

    rule = dec._nibble_split
    assert rule(None, 4, 4, True, True, False, 128) == (True, True)
    assert rule(True, 4, 4, True, True, True, 128) == (False, True)  # pre-RoPE keys are rotated whole
    assert rule("keys", 4, 4, True, True, False, 128) == (True, False)
    assert rule(False, 4, 4, True, True, False, 128) == (False, False)
    assert rule(None, 8, 4, True, False, False, 128) == (False, False)  # int8 keys, low-rank values
    assert rule(None, 4, 4, False, True, False, 128) == (False, True)  # low-rank int4 keys
    assert rule(None, 4, 4, True, True, False, 16) == (False, False)  # 8-wide halves: no dot
    # blocks of 4 tiles: the flat tile loop (setup at each block's first tile); of 2 tiles: the tiles
    # unrolled and the block loop pipelined (block_stages 2), as the automatic plan picks on the H200
    for block_size, stages, flat in ((64, 0, 1), (32, 2, 0)):
        state = random_state(device=DEVICE, seed=next(_seed), head_dim=32, block_size=block_size, key_bits=4,
                             channel_keys=True, key_zero_point=True, identity_values=True)  # fmt: skip
        query = torch.randn(1, 4, 1, 32).to(DEVICE)
        out, seen = _record_launch(
            lambda query=query, state=state: decode_attention(query, state, block_t=16, blocks_per_split=2)
        )
        assert seen["SPLIT_K"] and seen["SPLIT_V"] and seen["DEFER_DEN"]
        assert (seen["BLOCK_STAGES"], seen["FLAT"]) == (stages, flat)
        _assert_rel(out, spectral_attention(query, state))
    assert dec._auto_block_stages(512, 64) == 0 and dec._auto_block_stages(128, 64) == 2
    # stop 20: the low-rank layouts (512-token blocks in 256-token tiles) pipeline their block loop too
    assert dec._auto_block_stages(512, 256) == 2 and dec._auto_block_stages(512, 128) == 0


def test_stop20_plan_rules() -> None:
    """The automatic choices measured on the H200 at stop 20: a shallower software pipeline for short
    flat tile loops only; packed int4 row strides compiled in for layouts read without the nibble split;
    raw key nibbles only when asked for (measured no faster), and then only for nibble-split per-channel
    keys outside float32 mode."""
    import spectralcache.attention.triton.decode as dec

    assert dec._auto_num_stages(None, 1, 32) == 2 and dec._auto_num_stages(None, 1, 33) is None
    assert dec._auto_num_stages(None, 0, 8) is None  # not the flat loop: Triton's default
    assert dec._auto_num_stages(4, 1, 8) == 4  # the caller's stands
    assert dec._auto_row_stride(None, False, False) and not dec._auto_row_stride(None, True, True)
    assert not dec._auto_row_stride(None, False, True) and not dec._auto_row_stride(False, False, False)
    assert dec._auto_row_stride(True, True, True)
    assert dec._key_raw(True, True, True, False) and not dec._key_raw(True, True, True, True)
    assert not dec._key_raw(True, False, True, False) and not dec._key_raw(True, True, False, False)
    assert not dec._key_raw(False, True, True, False) and not dec._key_raw(None, True, True, False)


def _record_launch(fn):
    """Run ``fn`` (a decode_attention call); return (its output, the split launch's constexprs)."""
    return record_launch(fn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("block_size", [64, 32])  # 4 tiles: flat loop; 2 tiles: pipelined block loop
def test_raw_key_nibbles_agree(dtype: torch.dtype, zero_point: bool, block_size: int) -> None:
    """KEY_RAW (``key_raw=True``; the default preset's layout outside float32): per-channel int4 key nibbles scored as
    the float16 1032 + n, the offset 1032·Σ(query half) taken off once per block. A block whose offset
    were left in, or taken off twice, or carried over from the block before, shifts that block's
    scores against the others' and the exact tiers' (the softmax weights move): the output then differs
    from the reference and from the subtracting path. Float32 queries never take it."""
    state = random_state(device=DEVICE, seed=next(_seed), head_dim=32, block_size=block_size, blocks=4,
                         key_bits=4, channel_keys=True, key_zero_point=zero_point, identity_values=True,
                         dtype=dtype)  # fmt: skip
    query = (3 * torch.randn(1, 4, 1, 32)).to(dtype).to(DEVICE)
    outs = {}
    for key_raw in (True, None):
        outs[key_raw], seen = _record_launch(
            lambda key_raw=key_raw: decode_attention(
                query, state, block_t=16, blocks_per_split=2, key_raw=key_raw
            )
        )
        assert seen["KEY_RAW"] == (key_raw is True and dtype != torch.float32)
        assert seen["SPLIT_K"] and (seen["FLAT"], seen["BLOCK_STAGES"]) == (
            (1, 0) if block_size == 64 else (0, 2)
        )
    ref = spectral_attention(query, state)
    bar = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_rel(outs[True], ref, bar)
    # the two paths differ only by float32 rounding of the offset: far closer than to the reference
    _assert_rel(outs[True], outs[None], 1e-5 if dtype == torch.float32 else 2e-3)


def test_lowrank_int4_auto_plan_pipelines_blocks_with_row_strides() -> None:
    """The aggressive preset's layout (low-rank int4 keys and values, blocks of two tiles) under the
    automatic plan: block loop pipelined two deep, packed int4 row strides compiled in (KC_T / VC_T,
    whole-row vector loads), same answer as the reference and as the byte-stride launch."""
    state = random_state(device=DEVICE, seed=next(_seed), head_dim=32, block_size=32, blocks=5, key_bits=4,
                         value_bits=4, rank_keys=8, rank_values=16, outliers=3)  # fmt: skip
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    out, seen = _record_launch(lambda: decode_attention(query, state, block_t=16, blocks_per_split=2))
    assert seen["BLOCK_STAGES"] == 2 and seen["KC_T"] > 0 and seen["VC_T"] > 0 and not seen["SPLIT_K"]
    _assert_rel(out, spectral_attention(query, state))
    plain, seen = _record_launch(
        lambda: decode_attention(
            query, state, block_t=16, blocks_per_split=2, block_stages=0, int4_row_stride=False
        )
    )
    assert seen["BLOCK_STAGES"] == 0 and seen["KC_T"] == 0
    _assert_rel(out, plain)


def test_block_parts_plan_refusals_and_clamp() -> None:
    state = random_state(device=DEVICE, seed=next(_seed), block_size=48, outliers=3)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    ref = spectral_attention(query, state)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(query, state, block_t=16, block_parts=3)
    with pytest.raises(ValueError, match="blocks_per_split=1"):
        decode_attention(query, state, block_t=16, block_parts=2, blocks_per_split=2)
    with pytest.raises(ValueError, match="block_parts_min_tiles"):
        decode_attention(query, state, block_t=16, block_parts_min_tiles=0)
    # 3 tiles per block: 8 parts clamp to 2 (every part at least one tile), automatic P on CPU is 1
    for kw in (dict(block_parts=8), dict(block_parts=8, blocks_per_split=1), dict(block_parts=None)):
        _assert_rel(decode_attention(query, state, block_t=16, **kw), ref)


@pytest.mark.parametrize(
    "kw",
    [
        dict(groups=1),
        dict(groups=2, key_bits=4, key_space="pre_rope"),
        dict(groups=4, mask="bool", batch=2, outlier_split=True),
        dict(groups=8, dtype=torch.bfloat16, key_bits=4, block_stages=2),
        dict(groups=1, q_len=3, mask="float", identity_keys=True),
        dict(groups=2, q_len=3, softcap=5.0, identity_values=True, key_bits=4),
    ],
)
@pytest.mark.parametrize("min_rows", [1, 4])
def test_query_tile_not_padded_to_16_rows_agrees(kw: dict, min_rows: int) -> None:
    # min_rows < 16: the query tile holds next_pow2(groups * q_len) rows (tl.dot pads on chip)
    _check(min_rows=min_rows, **kw)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("key_bits", [8, 4])
def test_bfloat16(key_space: str, key_bits: int) -> None:
    _check(dtype=torch.bfloat16, key_space=key_space, key_bits=key_bits, groups=4, mask="bool", batch=2)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("key_bits", [8, 4])
@pytest.mark.parametrize(
    "kw",
    [
        dict(dtype=torch.float32),
        dict(dtype=torch.bfloat16, groups=4, mask="bool", batch=2),
        dict(dtype=torch.float32, q_len=3, mask="float", identity_values=True, value_bits=4),
        dict(dtype=torch.float32, outlier_split=False, rot_dim=16, blocks_per_split=2),
        # odd block size and head_dim, the chunk starting inside the last block (partially served)
        dict(dtype=torch.float32, block_size=13, head_dim=24, outliers=3, chunk=5, hot=2, q_len=5, groups=1),
        # GQA 8 with batch 3, the block loop pipelined, int4 read one nibble at a time
        dict(
            dtype=torch.float32, groups=8, batch=3, kv_heads=1, block_stages=2, int4_bytes=0, int4_pad=False
        ),
    ],
)
def test_per_channel_key_scales(key_space: str, key_bits: int, kw: dict, zero_point: bool) -> None:
    """key_codec="channel": one scale per key channel and block, folded into the query (post-RoPE)
    or into the rebuilt key tile (pre-RoPE); scales spread over three decades. ``zero_point``
    (key_zero_point): a float32 offset per channel and block too, some channels far from zero,
    the integers over every level (-8 / -128 included): post-RoPE adds (q·z)·scale to the block's
    scores, pre-RoPE adds z to the rebuilt tile and its rotate-half partner."""
    kw = dict(kw)
    if key_space == "post_rope":
        kw.pop("rot_dim", None)
    _check(key_space=key_space, key_bits=key_bits, channel_keys=True, key_zero_point=zero_point, **kw)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_key_zero_points_are_read(key_space: str) -> None:
    """The zero points change the answer (a kernel that skipped them would be caught): the same
    state with other offsets attends differently, and the kernel follows the offsets it is given --
    replaced, then dropped, on a view it already launched for (its launch-argument cache)."""
    seed = next(_seed)
    kw = dict(
        channel_keys=True, key_zero_point=True, key_bits=4, key_space=key_space, seed=seed, device=DEVICE
    )
    state = random_state(**kw)
    q = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with_offsets = decode_attention(q, state, block_t=16)
    _assert_rel(with_offsets, spectral_attention(q, state))
    state.cold.key_offsets = state.cold.key_offsets * -0.5
    moved = decode_attention(q, state, block_t=16)
    _assert_rel(moved, spectral_attention(q, state))
    assert float((moved - with_offsets).norm() / with_offsets.norm()) > 1e-2
    state.cold.key_offsets = None
    _assert_rel(decode_attention(q, state, block_t=16), spectral_attention(q, state))


def test_key_zero_points_refused_clearly() -> None:
    """Zero points without per-channel scales, or of the wrong shape, name the problem."""
    state = random_state(key_bits=4, device=DEVICE, seed=next(_seed))  # per-row scales
    nb = state.cold.num_blocks
    state.cold.key_offsets = torch.zeros(1, 2, nb, 1, 32, device=DEVICE)
    q = torch.randn(1, 4, 1, 32).to(DEVICE)
    with pytest.raises(ValueError, match=r"key_offsets .* need per-channel key scales"):
        decode_attention(q, state)
    state = random_state(key_bits=4, channel_keys=True, key_zero_point=True, device=DEVICE, seed=next(_seed))
    state.cold.key_offsets = state.cold.key_offsets[..., :16]
    with pytest.raises(ValueError, match=r"key_offsets must be floating \[B, H, nb, 1, D\]"):
        decode_attention(q, state)


@pytest.mark.parametrize("int4_bytes,int4_pad", [(0, False), (16, False), (32, False), (32, True)])
@pytest.mark.parametrize("int4_row_stride", [False, True])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_int4_byte_once_unpacking_agrees(
    int4_bytes: int, int4_pad: bool, int4_row_stride: bool, key_space: str
) -> None:
    """Packed int4 tiles read a byte once and interleave its nibbles (tiles of >= int4_bytes
    columns; rank 16 keys / rank 32 values as the aggressive preset), with and without the row
    stride compiled in: = the torch reference (the per-nibble form is the default)."""
    seed = next(_seed)
    state = random_state(
        key_bits=4, rank_keys=16, rank_values=32, key_space=key_space, seed=seed, device=DEVICE
    )
    q = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    got = decode_attention(q, state, None, None, None, block_t=16, int4_bytes=int4_bytes,
                           int4_pad=int4_pad, int4_row_stride=int4_row_stride)  # fmt: skip
    _assert_rel(got, spectral_attention(q, state, None))


def test_fully_masked_row_is_zero_not_nan() -> None:
    state = random_state(batch=2, device=DEVICE, seed=next(_seed))
    query = torch.randn(2, 4, 1, 32).to(DEVICE)
    mask = torch.ones(2, 1, 1, state.seq_len, dtype=torch.bool, device=DEVICE)
    mask[1] = False  # batch row 1 sees nothing
    out = decode_attention(query, state, mask)
    ref = spectral_attention(query, state, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    _assert_rel(out, ref)


def test_refuses_what_it_does_not_handle() -> None:
    state = random_state(device=DEVICE, chunk=None)
    with pytest.raises(ValueError, match="query rows per KV head"):
        decode_attention(torch.randn(1, 4, MAX_ROWS, 32).to(DEVICE), state)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(torch.randn(1, 4, 1, 16).to(DEVICE), state)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(torch.randn(1, 3, 1, 32).to(DEVICE), state)
    with pytest.raises(ValueError, match="attention_mask covers"):
        decode_attention(torch.randn(1, 4, 1, 32).to(DEVICE), state, torch.ones(1, 1, 1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="softcap"):
        decode_attention(torch.randn(1, 4, 1, 32).to(DEVICE), state, None, None, -1.0)
    pre = random_state(device=DEVICE, key_space="pre_rope")
    pre.rope_inv_freq = None
    with pytest.raises(ValueError, match="rope_inv_freq"):
        decode_attention(torch.randn(1, 4, 1, 32).to(DEVICE), pre)


# ----------------------------------------------------------------------------- dispatch


def test_backend_knob_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from spectralcache.attention.triton import dispatch
    from spectralcache.config import SpectralConfig

    assert SpectralConfig().attention_backend == "auto"
    with pytest.raises(ValueError, match="attention_backend"):
        SpectralConfig(attention_backend="cuda")
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert dispatch.resolve_backend("torch") == "torch"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    assert dispatch.resolve_backend("torch") == "triton"  # the environment overrides the config
    monkeypatch.setenv(dispatch.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="SPECTRALCACHE_ATTENTION_BACKEND"):
        dispatch.resolve_backend("auto")


def test_attend_routes_decode_and_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    from spectralcache.attention.triton import decode, dispatch

    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    calls = []
    real = decode.decode_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_attention", counting)
    state = random_state(device=DEVICE, seed=next(_seed), chunk=1)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    ref = spectral_attention(query, state)
    torch.testing.assert_close(dispatch.attend(query, state, None, None, None, "torch"), ref)
    assert calls == []
    out = dispatch.attend(query, state, None, None, None, "triton")
    assert len(calls) == 1
    _assert_rel(out, ref)
    dispatch.attend(query, state, None, None, None, "auto")
    assert len(calls) == (2 if query.is_cuda else 1)  # auto never runs the interpreter on CPU
    # a prefill (more query rows than the kernel takes) stays on the reference even when forced
    long = random_state(device=DEVICE, seed=next(_seed), chunk=40, hot=40)
    q_long = torch.randn(1, 4, 40, 32).to(DEVICE)
    dispatch.attend(q_long, long, None, None, None, "triton")
    assert len(calls) == (2 if query.is_cuda else 1)


def test_state_on_another_device_is_refused_clearly() -> None:
    state = random_state(device=DEVICE, seed=next(_seed))
    state.hot_values = state.hot_values.to("meta")
    with pytest.raises(ValueError, match="is on meta"):
        decode_attention(torch.randn(1, 4, 1, 32).to(DEVICE), state)


def test_mask_broadcast_over_batch() -> None:
    """A [1, 1, q, kv] mask applies to every batch row (stride 0 over the batch)."""
    state = random_state(batch=3, device=DEVICE, seed=next(_seed), chunk=2)
    query = torch.randn(3, 4, 2, 32).to(DEVICE)
    mask = _padded_mask(1, 2, state.seq_len, torch.tensor([7]))
    out = torch.full_like(query, float("nan"))
    decode_attention(query, state, mask.to(DEVICE), out=out, blocks_per_split=1, block_t=16)
    _assert_rel(out, spectral_attention(query, state, mask.to(DEVICE)))


def test_query_and_output_with_transposed_strides() -> None:
    """transformers hands a [B, q, Hq, D] buffer transposed to [B, Hq, q, D]; strides are honoured."""
    state = random_state(batch=2, device=DEVICE, seed=next(_seed), chunk=3)
    query = torch.randn(2, 3, 4, 32).to(DEVICE).transpose(1, 2)
    out = torch.full((2, 4, 3, 32), float("nan")).to(DEVICE)
    decode_attention(query, state, out=out, blocks_per_split=2, block_t=16)
    _assert_rel(out, spectral_attention(query, state))


# ----------------------------------------------------------------------------- device-side sizes


def test_device_sizes_match_host_sizes() -> None:
    """Sizes read on the device (grid sized for the buffers' capacity) = sizes passed by the host."""
    from spectralcache.attention.triton.graph import DecodeGraphSizes

    for kw in (dict(key_bits=8), dict(key_bits=4, key_space="pre_rope"), dict(blocks=0), dict(chunk=None)):
        state = random_state(device=DEVICE, seed=next(_seed), batch=2, **kw)
        query = torch.randn(2, 4, 1, 32).to(DEVICE)
        host = decode_attention(query, state, blocks_per_split=1, block_t=16)
        sizes = DecodeGraphSizes(state, q_len=1)
        sizes.update(state)
        assert sizes.capacity_exact >= state.hot_keys.shape[2] + state.landmark_keys.shape[2]
        out = torch.full_like(query, float("nan"))
        decode_attention(query, state, out=out, blocks_per_split=1, block_t=16, **sizes.launch_kwargs())
        _assert_rel(out, spectral_attention(query, state))
        _assert_rel(out, host, 1e-6)


# the layer's own codecs: low-rank, and the default's per-channel int4 keys with zero points
_LAYER_CODECS = {
    "lowrank": {},
    "channel_zp": dict(key_codec="channel", value_codec="identity", coeff_bits=4, key_zero_point=True),
}


@pytest.mark.parametrize(
    ("codecs", "block_parts"), [("lowrank", None), ("channel_zp", None), ("channel_zp", 2)]
)
def test_recorded_launch_follows_a_decoding_layer(codecs: str, block_parts: int | None) -> None:
    """One recorded launch (addresses of the state at record time, sizes on the device) reads every
    later decode step of a real SpectralLayer correctly -- new hot tokens, blocks appended into
    spare capacity (key zero points too), the hot window moving after a compression -- until a
    buffer moves, which ``update`` reports as StaleDecodeGraph (then we record again).
    ``block_parts`` 2: 32-token blocks (2 tiles) read in halves by capacity·2 programs, those past
    the live blocks finding nothing to read."""
    from tests.layer_helpers import D, H, kv, small_cfg

    from spectralcache.attention.triton.graph import DecodeGraphSizes, StaleDecodeGraph
    from spectralcache.cache.layer import SpectralLayer

    cfg = dict(_LAYER_CODECS[codecs])
    steps, prefill = 48, 150
    if block_parts is not None:
        cfg["block_size"] = 16 * block_parts
        # 9 blocks as with 16-token ones, and a compression while decoding
        steps, prefill = 40, 9 * 16 * block_parts + 6
    layer = SpectralLayer(small_cfg(**cfg), 0, head_dim=D, num_kv_heads=H)
    k0, v0 = kv(1, prefill, seed=next(_seed))  # 9 blocks: the cold buffers grow with spare capacity
    layer.update(k0.to(DEVICE), v0.to(DEVICE))
    layer.release_chunk()
    k_static = torch.zeros(1, H, 1, D, device=DEVICE)  # the graph's static chunk / query / output
    v_static = torch.zeros_like(k_static)
    q_static = torch.zeros(1, 2 * H, 1, D, device=DEVICE)
    out = torch.zeros_like(q_static)
    g = torch.Generator().manual_seed(next(_seed))
    recorded, sizes = None, None
    reused = reused_new_blocks = records = 0
    for _ in range(steps):
        k_static.copy_(torch.randn(1, H, 1, D, generator=g))
        v_static.copy_(torch.randn(1, H, 1, D, generator=g))
        q_static.copy_(torch.randn(1, 2 * H, 1, D, generator=g))
        layer.update(k_static, v_static)
        state = layer.state()
        try:
            if sizes is None:
                raise StaleDecodeGraph("first step")
            sizes.update(state)
            reused += 1
            reused_new_blocks += state.cold.num_blocks > recorded.cold.num_blocks
        except StaleDecodeGraph:
            recorded, sizes = state, DecodeGraphSizes(state, q_len=1)
            sizes.update(state)
            records += 1
        assert (state.cold.key_offsets is not None) == (codecs == "channel_zp")
        out.fill_(float("nan"))
        # the recorded launch: the *recorded* state's addresses, this step's sizes from the device
        decode_attention(
            q_static, recorded, out=out, block_t=16, block_parts=block_parts, **sizes.launch_kwargs()
        )
        _assert_rel(out, spectral_attention(q_static, state))
        layer.release_chunk()
    assert reused >= 20 and reused_new_blocks >= 1 and records >= 2, (reused, reused_new_blocks, records)


def test_device_sizes_refused_clearly() -> None:
    from spectralcache.attention.triton.graph import DecodeGraphSizes, StaleDecodeGraph

    state = random_state(device=DEVICE, seed=next(_seed))
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    with pytest.raises(ValueError, match="device_sizes must be int32"):
        decode_attention(query, state, device_sizes=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    sizes = DecodeGraphSizes(state, q_len=1)
    with pytest.raises(ValueError, match="capacity"):
        decode_attention(query, state, **{**sizes.launch_kwargs(), "capacity_blocks": 0})
    other = random_state(device=DEVICE, seed=next(_seed))  # same shapes, other buffers
    with pytest.raises(StaleDecodeGraph, match="moved"):
        sizes.update(other)


def test_cold_launch_args_follow_reassigned_fields() -> None:
    """The per-view launch-argument cache must not serve a view whose fields were replaced."""
    state = random_state(device=DEVICE, seed=next(_seed), key_bits=16, value_bits=16)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    decode_attention(query, state, blocks_per_split=1, block_t=16)
    cold = state.cold
    cold.value_coeffs = cold.value_coeffs * 3.0
    out = decode_attention(query, state, blocks_per_split=1, block_t=16)
    _assert_rel(out, spectral_attention(query, state))


# ----------------------------------------------------------------------------- FastLauncher logic


class _Param:
    def __init__(self, name: str, constexpr: bool = False, dns: bool = False) -> None:
        self.name, self.is_constexpr, self.do_not_specialize = name, constexpr, dns


class _RecordingKernel:
    """Stands in for a ``@triton.jit`` kernel where no GPU is present: records Triton-path calls and
    hands back a 'compiled kernel' whose launcher records what FastLauncher passes it."""

    __name__ = "recording_kernel"

    def __init__(self) -> None:
        self.params = [_Param("a_ptr"), _Param("s_a"), _Param("n", dns=True), _Param("scale"),
                       _Param("b_ptr"), _Param("K", constexpr=True)]  # fmt: skip
        self.triton_calls: list = []
        self.launches: list = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.triton_calls.append((grid, args, kwargs))
            kernel = self

            class Compiled:
                function, packed_metadata = "fn", "meta"

                @staticmethod
                def run(*launch_args):
                    kernel.launches.append(launch_args)

            return Compiled

        return run


def test_fast_launcher_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled launcher serves a call only when everything Triton specialises on matches a
    call Triton compiled: pointer dtypes, 16-byte alignment, non-do_not_specialize ints,
    constexprs, options; pointers reach it as data_ptr() integers."""
    from spectralcache.attention.triton.launch import FastLauncher

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    kernel = _RecordingKernel()
    launcher = FastLauncher(kernel)
    launcher.enabled = True  # on CUDA it is; the interpreter turns it off
    a, b = torch.zeros(64), torch.zeros(64, dtype=torch.float16)

    def call(a=a, s_a=16, n=5, b=b, k=8, options=None):
        launcher((3, 2), [a, s_a, n, 0.5, b], {"K": k}, options or {"num_warps": 4})
        return len(kernel.triton_calls), len(kernel.launches)

    assert call() == (1, 0)  # first: Triton compiles and launches
    assert call(n=77) == (1, 1)  # a do_not_specialize int changes nothing
    grid_x, grid_y, grid_z, stream, fn, meta, lm, enter, exit_, *args = kernel.launches[-1]
    assert (grid_x, grid_y, grid_z, stream, fn, meta) == (3, 2, 1, 1234, "fn", "meta")
    assert (lm, enter, exit_) == (None, None, None)
    assert args == [a.data_ptr(), 16, 77, 0.5, b.data_ptr(), 8]  # pointers as ints, constexprs last
    assert call(s_a=32) == (2, 1)  # a specialised int: compile
    assert call(s_a=32) == (2, 2)
    assert call(b=b.float()) == (3, 2)  # another pointer dtype
    assert call(k=16) == (4, 2)  # another constexpr
    assert call(options={"num_warps": 8}) == (5, 2)
    odd = torch.zeros(65)[1:]  # 4 bytes off 16-byte alignment: Triton's path every time
    assert call(a=odd) == (6, 2) and call(a=odd) == (7, 2)
    from triton import knobs

    hook = lambda *args: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert call() == (8, 2)  # a profiler's hook: Triton's path, so the hook runs
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert call() == (8, 3)
    with pytest.raises(TypeError, match="constexprs"):
        launcher((1,), [a, 16, 5, 0.5, b], {"Q": 1}, {"num_warps": 2})
    with pytest.raises(TypeError, match="_ptr parameters"):
        launcher((1,), [a, torch.ones(()), 5, 0.5, b], {"K": 3}, {"num_warps": 2})


@pytest.mark.parametrize(
    "kw", [dict(), dict(blocks=0), dict(key_space="pre_rope", key_bits=4), dict(chunk=None)]
)
def test_launch_arguments_fit_the_kernel_signatures(kw: dict) -> None:
    """What decode_attention hands its launchers matches the kernels' signatures: tensors exactly
    at the *_ptr parameters (FastLauncher's key covers those), scalars elsewhere, every constexpr
    named in order -- checked on the real argument lists, in every tier layout."""
    import inspect

    from spectralcache.attention.triton import decode as dec

    calls = {}

    def recorder(name):
        def call(grid, args, constexprs, options):
            calls[name] = (args, constexprs)

        return call

    state = random_state(device=DEVICE, seed=next(_seed), **kw)
    saved = dec._SPLIT, dec._COMBINE
    dec._SPLIT, dec._COMBINE = recorder("split"), recorder("combine")
    try:
        dec.decode_attention(
            torch.randn(1, 4, 1, 32).to(DEVICE), state, torch.ones(1, 1, 1, state.seq_len, dtype=torch.bool)
        )
    finally:
        dec._SPLIT, dec._COMBINE = saved
    for name, kernel in (("split", saved[0].kernel), ("combine", saved[1].kernel)):
        args, constexprs = calls[name]
        names = list(inspect.signature(kernel.fn).parameters)
        runtime = names[: len(names) - len(constexprs)]
        assert names[len(runtime) :] == list(constexprs)
        assert len(args) == len(runtime)
        for pname, value in zip(runtime, args):
            assert isinstance(value, torch.Tensor) == pname.endswith("_ptr"), (name, pname, type(value))
            if not pname.endswith("_ptr"):
                assert type(value) in (int, float), (name, pname, type(value))


def test_pipelined_block_loop_that_does_not_fit_falls_back_to_the_tile_loop(monkeypatch) -> None:
    """The automatic ``block_stages`` 2 (since stop 20 also for the low-rank layouts) holds two blocks'
    tiles in shared memory; where that does not fit, the launch retries with the run-time tile loop
    (the stop-19 plan for these layouts) instead of refusing the layout; a caller's choice stands."""
    from spectralcache.attention.triton import decode as decode_mod

    class OutOfResources(Exception):
        pass

    real = decode_mod._SPLIT
    tried = []

    def two_stage_too_big(grid, args, constexprs, options):
        tried.append(constexprs["BLOCK_STAGES"])
        if constexprs["BLOCK_STAGES"]:
            raise OutOfResources("out of resource: shared memory, Required: 300000, Hardware limit: 232448")
        return real(grid, args, constexprs, options)

    monkeypatch.setattr(decode_mod, "_SPLIT", two_stage_too_big)
    monkeypatch.setattr(decode_mod, "_DOES_NOT_FIT", set())
    state = random_state(device=DEVICE, seed=next(_seed), head_dim=32, block_size=32, blocks=4, key_bits=8)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    out = decode_attention(query, state, block_t=16)
    assert tried == [2, 0]
    _assert_rel(out, spectral_attention(query, state))
    with pytest.raises(decode_mod.KernelDoesNotFit):
        decode_attention(query, state, block_t=16, block_stages=2)  # asked for: not replaced


def test_layout_that_does_not_fit_on_chip_is_refused_once_compiled_then_at_once(monkeypatch) -> None:
    """The H100 run of the lossless preset on real Gemma 3 (float32, rank = head_dim = 256) died in
    Triton's compile with OutOfResources (shared memory) at every decode step. Now the first
    failure becomes KernelDoesNotFit (a ValueError: ``attend``'s auto mode falls back to the
    torch reference), remembered per launch shape, so later calls do not compile again."""
    from spectralcache.attention.triton import decode as decode_mod
    from spectralcache.attention.triton import dispatch

    class OutOfResources(Exception):  # the name Triton's error has; its module moved over releases
        pass

    calls = []

    def no_room(grid, args, constexprs, options):
        calls.append(grid)
        raise OutOfResources("out of resource: shared memory, Required: 1097856, Hardware limit: 232448")

    monkeypatch.setattr(decode_mod, "_SPLIT", no_room)
    monkeypatch.setattr(decode_mod, "_DOES_NOT_FIT", set())
    state = random_state(batch=1, kv_heads=2, head_dim=32, dtype=torch.float32, seed=7, device=DEVICE)
    query = torch.randn(1, 4, 1, 32).to(DEVICE)
    with pytest.raises(decode_mod.KernelDoesNotFit, match=r"does not fit.*head_dim 32.*shared memory"):
        decode_attention(query, state)
    with pytest.raises(decode_mod.KernelDoesNotFit, match="attention_backend='torch'"):
        decode_attention(query, state)
    # one compile each for the automatic plan's pipelined block loop (one-tile blocks) and the run-time
    # tile loop it falls back to; the second call was refused without compiling
    assert len(calls) == 2
    # a forced triton backend surfaces the clear error; the torch backend answers
    with pytest.raises(ValueError, match="does not fit"):
        dispatch.attend(query, state, None, None, None, backend="triton")
    ref = spectral_attention(query, state, None)
    torch.testing.assert_close(dispatch.attend(query, state, None, None, None, backend="torch"), ref)

    def other_error(grid, args, constexprs, options):
        raise RuntimeError("an unrelated compile error")

    monkeypatch.setattr(decode_mod, "_SPLIT", other_error)
    other = random_state(batch=1, kv_heads=2, head_dim=16, dtype=torch.float32, seed=8, device=DEVICE)
    with pytest.raises(RuntimeError, match="unrelated"):  # only resource errors are translated
        decode_attention(torch.randn(1, 4, 1, 16).to(DEVICE), other)
