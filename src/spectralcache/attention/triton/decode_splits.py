"""Split kernel of the fused decode attention: one program = one KV head × one range of the cache.

Math (per batch row ``b``, KV head ``h``; the ``G = Hq / Hkv`` query heads of ``h`` and the
``q`` query positions are packed as ``R = G·q`` rows of one tile, row ``r = g·q + i``):

* scores of an exact token ``k``: ``s = softcap((q·k)·scale)`` plus the mask bias of its cache
  index (``-inf`` when masked, or an additive float mask value);
* cold block ``n`` with low-rank post-RoPE keys: ``qB = (q·B_Kᵀ)·scale`` ([R, rk], once per
  block), then ``s[:, t] = (qB·C_K[t]ᵀ)·σ_K[t]`` (σ the per-row scale; the integer
  coefficients are widened on chip, never in memory). Identity keys: ``s = (q·C_Kᵀ)·σ_K·scale``.
  Pre-RoPE keys: a key tile ``K = (C_K·σ_K)·B_K`` and its rotate-half partner
  ``K' = (C_K·σ_K)·B_K'`` (``B_K'`` = the basis with its rotary columns swapped and negated)
  are built on chip and ``K·cos + K'·sin`` (angle ``float32(cache index)·inv_freq``) is scored;
* per-channel key scales (``key_codec="channel"``: identity keys, one scale ``c_K[d]`` per
  channel and block, KEY_CHANNEL): post-RoPE ``s[:, t] = ((q·c_K/c_max)·C_K[t]ᵀ)·c_max·scale`` --
  the scales fold into the query once per block, the integer rows are scored as stored, and
  dividing by the block's largest scale ``c_max`` keeps the folded query inside float16's
  range; pre-RoPE: the key tile ``C_K·c_K`` (and its partner ``sign·C_K[:, partner]·c_K[partner]``)
  is rebuilt and rotated as above;
* per-channel zero points (``key_zero_point``: ``key_offsets`` z [D] float32 per block, KEY_OFFSETS,
  only with KEY_CHANNEL; key row ``k_t = C_K[t] ⊙ c_K + z``): post-RoPE
  ``s[:, t] = q·(C_K[t] ⊙ c_K + z)·scale = ((q ⊙ c_K/c_max)·C_K[t]ᵀ)·c_max·scale + (q·z)·scale`` --
  ``qz = (q·z)·scale`` ([R] float32) once per block, added to every raw score of the block before
  the softcap (outlier rows are masked anyway); pre-RoPE: z is added to the rebuilt tile
  ``C_K·c_K + z`` and ``sign·z[partner]`` to its partner ``sign·(C_K[:, partner]·c_K[partner] + z[partner])``
  before the rotation. The integers then span every level ([-8, 7] / [-128, 127]); the widening
  below is exact for all of them;
* rows of a cold block that are kept exact as outliers are masked (``-inf``) in the low-rank
  scores and attended through their exact copy in the same step;
* one online softmax over everything the program reads: running max ``m``, denominator
  ``den``, accumulator ``acc`` [R, D]; low-rank values stay latent within a block:
  ``lat += (p·σ_V)·C_V`` ([R, rv]) for each token tile, and ``acc += lat·B_V`` once at the end
  of the block (identity values: ``acc += (p·σ_V)·C_V`` directly). ``lat`` is rescaled with
  ``acc`` whenever the running max moves, so the result is exact.

Programs ``0 .. n_cold_splits-1`` take ``blocks_per_split`` consecutive cold blocks each, or, with
``BLOCK_PARTS`` = P > 1 (block parts), part ``j = p % P`` of block ``p // P`` each: ``PART_T`` tokens
(whole tiles) from token ``j·PART_T`` on. A part redoes the block's setup (channel scales, zero
points, q·B_Kᵀ, the outlier bit mask), keeps its own latent ``lat`` and multiplies it by B_V at its
end (linear, so the parts sum to the block); part 0 alone attends the block's exact outliers. The
remaining programs take ``exact_per_split`` tokens each of the exact tiers laid end to end
(landmarks | hot buffer | current chunk). Each program writes its ``(m, den, acc)`` partial;
``combine_splits`` merges them by log-sum-exp.

Masking is by cache index, as in the torch reference: cache indices ``>= tier_end`` are read
from the chunk only (their copies in the other tiers are masked), and the mask is either the
bool / float ``[B|1, 1, q, kv_len]`` tensor transformers passes or, without one, causality
(query ``i`` sits at cache index ``q_first + i``).

Precision: with float32 queries every product is a float32 ("ieee") dot. Otherwise exact
tiers use the model dtype as flash attention does, and the cold tier multiplies in float16
(integer coefficients up to 127 are exact in float16, probabilities and orthonormal basis rows
are bounded), always accumulating in float32.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from spectralcache.attention.triton.combine_splits import grid_trigger, grid_wait

__all__ = ["SIZE_FIELDS", "spectral_decode_split_kernel"]

# Triton's interpreter (TRITON_INTERPRET=1, used by the CPU tests) multiplies bfloat16 dot
# operands as raw bits (Triton 3.6: off by 1e10); there, bfloat16 dots run in float32 instead.
_BF16_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
# compiled (not interpreted): inline PTX is available
_COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _dot(a, b, F32: tl.constexpr, LP: tl.constexpr):
    """a @ b in float32 (exact "ieee" mode) or with both operands in the low-precision type LP."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif LP == tl.bfloat16 and not _BF16_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(LP), b.to(LP), out_dtype=tl.float32)


@triton.jit
def _softcap(s, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at ±inf, no NaN for large |x|
        x = s / softcap
        s = (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * softcap
    return s


@triton.jit
def _mask_bias(
    mask_ptr,
    stride_mq,
    stride_mk,
    mask_floor,
    rows_q,
    rows_ok,
    idx,
    idx_ok,
    q_first,
    tier_end,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
):
    """Additive float32 bias [R, N] for cache indices ``idx`` [N]: 0 / mask value, or -inf.

    ``mask_ptr`` already points at this batch row; ``rows_q`` [R] is each row's query position
    (0..q-1)."""
    ok = rows_ok[:, None] & idx_ok[None, :] & (idx < tier_end)[None, :]
    if HAS_MASK:
        mp = mask_ptr + rows_q[:, None] * stride_mq + idx[None, :] * stride_mk
        if MASK_BOOL:
            mv = tl.load(mp, mask=ok, other=0)
            ok = ok & (mv != 0)
            bias = tl.zeros(ok.shape, dtype=tl.float32)
        else:
            bias = tl.load(mp, mask=ok, other=0.0).to(tl.float32)
            ok = ok & (bias > mask_floor)
    else:
        ok = ok & (idx[None, :] <= (q_first + rows_q)[:, None])
        bias = tl.zeros(ok.shape, dtype=tl.float32)
    return tl.where(ok, bias, float("-inf"))


# e^x for the softmax, compiled: one ex2.approx.ftz (MUFU.EX2) of x·log2(e). Triton's exp lowers to the
# non-flushing ex2.approx, which ptxas wraps in a subnormal fix-up (a compare and two predicated
# multiplies around every MUFU.EX2: a sixth of the aggressive layout's tile loop in the SASS). Results
# under 2^-126 (weights < 1e-38 of the running max's) become 0; -inf still gives 0.
_EX2_FTZ_ASM = tl.constexpr("ex2.approx.ftz.f32 $0, $1;")
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x):
    if _COMPILED:
        return tl.inline_asm_elementwise(
            _EX2_FTZ_ASM, "=f,f", [x * _LOG2E], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp(x)


@triton.jit
def _online_step(m, den, s, AXIS: tl.constexpr = 1):
    """New running max, rescale factor for the old state, and the tile's probabilities (tokens along
    ``AXIS`` of ``s``: 1 for ``[rows, tokens]``, 0 for a tile turned over, TILE_T)."""
    m_new = tl.maximum(m, tl.max(s, axis=AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: exp(-inf) = 0
    alpha = _exp(m - m_safe)
    p = _exp(s - tl.expand_dims(m_safe, AXIS))
    return m_new, alpha, p


# int8 -> float16, four bytes per call: flip the sign bits (u = c + 128), place each byte under the
# float16 exponent byte 0x64 (bits 0x64uu = 1024 + u exactly), subtract 1152 = 1024 + 128 (exact)
_I8_F16_ASM = tl.constexpr("""
{
.reg .b32 t, e, m;
xor.b32 t, $2, 0x80808080;
mov.b32 e, 0x64646464;
prmt.b32 $0, t, e, 0x4140;
prmt.b32 $1, t, e, 0x4342;
mov.b32 m, 0x64806480;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}
""")


# packed int4 -> two float16 tensors (low / high nibbles), four bytes per call: bytes b0 b1 b2 b3 of
# $4 are spread into two words [b0, 0, b1, 0] and [b2, 0, b3, 0] (prmt); each nibble n, masked into
# the mantissa of 0x6400 with its sign bit flipped (^ 8), is the float16 1024 + (n + 8) exactly, and
# one float16x2 subtraction of 1032 leaves n. $0 $1: low nibbles of b0..b3, $2 $3: high nibbles.
_I4_F16_SPREAD = """
.reg .b32 t, u, m, e;
mov.b32 m, 0x000F000F;
mov.b32 e, 0x64086408;
prmt.b32 t, $4, 0, 0x4140;
prmt.b32 u, $4, 0, 0x4342;
lop3.b32 $0, t, m, e, 0x6a;
lop3.b32 $1, u, m, e, 0x6a;
shr.u32 t, t, 4;
shr.u32 u, u, 4;
lop3.b32 $2, t, m, e, 0x6a;
lop3.b32 $3, u, m, e, 0x6a;
"""
_I4_F16_ASM = tl.constexpr(
    "{"
    + _I4_F16_SPREAD
    + "sub.f16x2 $0, $0, e;\nsub.f16x2 $1, $1, e;\nsub.f16x2 $2, $2, e;\nsub.f16x2 $3, $3, e;\n}"
)
# the same without the four subtractions: each nibble n comes back as the float16 1032 + n (KEY_RAW)
_I4_F16_RAW_ASM = tl.constexpr("{" + _I4_F16_SPREAD + "}")
# the same widening in fewer instructions (I4_ASM 2, stop 21): one byte permute puts b0 / b1 in the low
# bytes of the two 16-bit halves and b2 / b3 (after one shift) there too, so each 3-input logic op widens
# two nibbles straight into their float16x2 output: low nibbles under mask 0x000F give 1024 + (n ^ 8) as
# above; high nibbles stay in bits 4-7 (mask 0x00F0, sign flip 0x80), the float16 1024 + 16·(n ^ 8), and
# one float16x2 FMA by 1/16 and -72 leaves n (every step exact). 10 instructions per four bytes (was 12)
_I4_F16_PAIR = """
.reg .b32 t, u, m, n, e, f, s, c;
mov.b32 m, 0x000F000F;
mov.b32 n, 0x00F000F0;
mov.b32 e, 0x64086408;
mov.b32 f, 0x64806480;
mov.b32 s, 0x2C002C00;
prmt.b32 t, $4, 0, 0x3120;
shr.u32 u, t, 8;
lop3.b32 $0, t, m, e, 0x6a;
lop3.b32 $1, u, m, e, 0x6a;
lop3.b32 $2, t, n, f, 0x6a;
lop3.b32 $3, u, n, f, 0x6a;
"""
# c: -72 (0xD480) -- n; RAW: 960 (0x6380) -- 1032 + n, as the low nibbles are left
_I4_F16_PAIR_ASM = tl.constexpr(
    "{"
    + _I4_F16_PAIR
    + "mov.b32 c, 0xD480D480;\nsub.f16x2 $0, $0, e;\nsub.f16x2 $1, $1, e;\n"
    + "fma.rn.f16x2 $2, $2, s, c;\nfma.rn.f16x2 $3, $3, s, c;\n}"
)
_I4_F16_PAIR_RAW_ASM = tl.constexpr(
    "{" + _I4_F16_PAIR + "mov.b32 c, 0x63806380;\nfma.rn.f16x2 $2, $2, s, c;\nfma.rn.f16x2 $3, $3, s, c;\n}"
)
# the offset RAW nibbles carry: the float16 1032 + n stands for n
_I4_RAW_OFFSET = tl.constexpr(1032.0)


@triton.jit
def _load_int4_halves(
    base, rows, rows_ok, stride_t, stride_c, RANK: tl.constexpr, RANK_P: tl.constexpr, I4_ASM: tl.constexpr,
    RAW: tl.constexpr = False, TRANS: tl.constexpr = False,
):  # fmt: skip
    """Packed int4 coefficient rows as two float16 tiles [N, RANK_P/2] of exact small integers:
    ``lo[:, j]`` = column 2j (low nibble of byte j), ``hi[:, j]`` = column 2j+1 (high nibble).

    Nibble-split scoring: consumers pair ``lo`` / ``hi`` with the even / odd columns of the other
    operand (the query, the value accumulator) instead of interleaving the nibbles back into column
    order on chip. ``I4_ASM`` (compiled CUDA only): the widening as one PTX block per four bytes
    (1: byte permutes, 3-input logic ops, float16x2 subtractions; 2: the paired form, one permute and
    float16x2 FMAs for the high nibbles); otherwise the same arithmetic as
    tensor ops (``_load_coeffs``' int4 path). ``RAW``: the widened values are left as the float16
    ``1032 + n`` (no subtraction; padded and masked entries read 1032): the caller removes
    ``1032 · Σ other operand`` once per block (KEY_RAW). ``TRANS``: the tiles turned over, [RANK_P/2, N]
    (byte column j down, rows across: how tokens-contiguous value bytes lie in memory; TILE_T)."""
    bcols = tl.arange(0, RANK_P // 2)
    b_ok = bcols < (RANK + 1) // 2
    if TRANS:
        okb = b_ok[:, None] & rows_ok[None, :]
        byte = tl.load(base + bcols[:, None] * stride_c + rows[None, :] * stride_t, mask=okb, other=0)
    else:
        okb = rows_ok[:, None] & b_ok[None, :]
        byte = tl.load(base + rows[:, None] * stride_t + bcols[None, :] * stride_c, mask=okb, other=0)
    return _widen_int4(byte, I4_ASM, RAW)


@triton.jit
def _widen_int4(byte, I4_ASM: tl.constexpr, RAW: tl.constexpr):
    """Packed int4 bytes (any shape) -> their low / high nibbles as float16 (``n``, or ``1032 + n``
    with ``RAW``), as ``_load_int4_halves`` documents."""
    if I4_ASM and _COMPILED:
        # one call; the constexprs pick the asm string at compile time (I4_ASM 1: the stop-19 spread,
        # 2: the paired form)
        lo, hi = tl.inline_asm_elementwise(
            (_I4_F16_PAIR_RAW_ASM if RAW else _I4_F16_PAIR_ASM) if I4_ASM == 2 else
            (_I4_F16_RAW_ASM if RAW else _I4_F16_ASM),
            "=r,=r,=r,=r,r", [byte], dtype=(tl.float16, tl.float16), is_pure=True, pack=4,
        )  # fmt: skip
    else:
        byte = byte.to(tl.int16)
        lo = ((byte & 15) ^ 0x6408).to(tl.float16, bitcast=True)
        hi = (((byte >> 4) & 15) ^ 0x6408).to(tl.float16, bitcast=True)
        if not RAW:
            lo = lo - 1032.0
            hi = hi - 1032.0
    return lo, hi


@triton.jit
def _raw_key_offset(qz, qb, qb_hi, kscale):
    """KEY_RAW: the per-block score term ``qz`` less the raw key nibbles' offset. The tiles score
    ``qb·(1032 + n_lo) + qb_hi·(1032 + n_hi)`` (no subtraction per element); times ``kscale`` (= the
    block's ``kmax·scale``) that is the wanted score plus ``1032·kscale·(Σ qb + Σ qb_hi)``, removed here
    once per block from the very float16 values the dots multiply."""
    tot = tl.sum(qb.to(tl.float32), axis=1) + tl.sum(qb_hi.to(tl.float32), axis=1)
    return qz - tot * (_I4_RAW_OFFSET * kscale)


@triton.jit
def _outlier_words(oidx, o_ok, OUT_WORDS: tl.constexpr):
    """A block's outlier rows ``oidx`` (valid where ``o_ok``) as a bit mask [OUT_WORDS] int32: bit j
    of word w <=> row 32w + j. The indices are distinct, so the sum of their bits is their OR."""
    o_idx = tl.where(o_ok, oidx, 0)
    o_word = tl.where(o_ok, o_idx // 32, -1)
    return tl.sum(
        tl.where(o_word[:, None] == tl.arange(0, OUT_WORDS)[None, :], (1 << (o_idx % 32))[:, None], 0),
        axis=0,
    )


@triton.jit
def _setup_ahead(
    n, n_hi, starts_ptr, oi_n, s_oi_o, orow, o_ok, ks_n, s_ks_t, dcols, d_ok, ko_n, s_ko_d,
    N_OUT: tl.constexpr, KEY_CHANNEL: tl.constexpr, KEY_OFFSETS: tl.constexpr,
):  # fmt: skip
    """FLAT 3: block ``n``'s setup data -- cache index of its first token, outlier rows, channel scales,
    zero points (``oi_n`` / ``ks_n`` / ``ko_n`` point at its rows) -- loaded one block ahead, so
    nothing past ``n_hi`` is read. The vector masks are ``(mask & ok) != 0``: Triton 3.9's interpreter
    types a vector int1 & this scalar comparison as int32, which ``tl.load`` refuses as a mask."""
    ok = n < n_hi
    start = tl.load(starts_ptr + n, mask=ok, other=0).to(tl.int32)
    oidx = 0
    kch = 0.0
    kz = 0.0
    if N_OUT > 0:
        oidx = tl.load(oi_n + orow * s_oi_o, mask=(o_ok & ok) != 0, other=-1).to(tl.int32)
    if KEY_CHANNEL:
        kch = tl.load(ks_n + dcols * s_ks_t, mask=(d_ok & ok) != 0, other=0.0)
        if KEY_OFFSETS:
            kz = tl.load(ko_n + dcols * s_ko_d, mask=(d_ok & ok) != 0, other=0.0)
    return start, oidx, kch, kz


@triton.jit
def _outlier_cols(oidx, o_ok, BLOCK_T: tl.constexpr):
    """A block's outlier rows ``oidx`` (valid where ``o_ok``) as one int32 per tile column [BLOCK_T]:
    bit k of column c <=> row ``k·BLOCK_T + c`` (the block holds at most 31 tiles). A tile then tests
    its tokens with one shift of this mask (OUT_COLS); the indices are distinct, so the sum of their bits
    is their OR."""
    o_idx = tl.where(o_ok, oidx, 0)
    hit = o_ok[:, None] & ((o_idx % BLOCK_T)[:, None] == tl.arange(0, BLOCK_T)[None, :])
    return tl.sum(tl.where(hit, (1 << (o_idx // BLOCK_T))[:, None], 0), axis=0)


@triton.jit
def _load_coeffs(
    base, rows, rows_ok, stride_t, stride_c, RANK: tl.constexpr, RANK_P: tl.constexpr, BITS: tl.constexpr,
    DQ_ASM: tl.constexpr = False, INT4_BYTES: tl.constexpr = False, I4_ASM: tl.constexpr = False,
):  # fmt: skip
    """Coefficient tile [N, RANK_P] (zeros past RANK / outside ``rows_ok``), unscaled.

    int8 and packed int4 come back as exact small integers in float16; 16-bit coefficients
    in their stored dtype. int4: column 2j is the low nibble of byte j, 2j+1 the high one,
    each two's complement (linalg/quant.py). ``INT4_BYTES``: each byte loaded once, both nibbles
    widened and interleaved back (join + reshape; the host sets it only for tiles of >= 32 padded
    columns, where the compiled H100 kernel was checked right: at 16 columns Triton 3.6 compiled it
    wrong); otherwise one load per nibble.

    Widening without an int -> float conversion (those issue at a quarter of the integer
    rate and were the largest single instruction cost of the cold loop): a small integer
    ``u`` in [0, 1023] ORed into the mantissa of the float16 1024.0 (bits 0x6400) *is* the
    float16 ``1024 + u``, exactly; subtracting the offset back is exact too. int8 ``c``:
    ``u = c + 128`` (flip the sign bit); int4 nibble ``n``: ``u = n ^ 8`` (= its value + 8). Both are
    exact for every level, -128 / -8 included (zero-point keys use them; symmetric ones never do).
    ``DQ_ASM`` (int8, compiled CUDA only; the interpreter runs the tensor-op form): the same
    arithmetic on four packed bytes per PTX block (byte permutes, 3-input logic ops and
    float16x2 subtractions) instead of per-element 16-bit ops."""
    if BITS == 4 and INT4_BYTES:
        # each byte loaded once (a [N, RANK_P/2] tile: contiguous rows, so the loads vectorize and
        # can be pipelined), both nibbles widened, then interleaved back into column order
        # (column 2j = low nibble of byte j): join -> [N, RANK_P/2, 2] -> reshape [N, RANK_P]
        lo, hi = _load_int4_halves(base, rows, rows_ok, stride_t, stride_c, RANK, RANK_P, I4_ASM)
        return tl.reshape(tl.join(lo, hi), (rows.shape[0], RANK_P))
    elif BITS == 4:
        # one load per nibble (each byte read twice, from L1): the form for narrow int4 tiles, whose
        # byte-once join + reshape came out wrong compiled on the H100 (16 columns: the aggressive
        # preset's keys) while the interpreter agreed with the reference (DQ_ASM applies to int8)
        cols = tl.arange(0, RANK_P)
        ok = rows_ok[:, None] & (cols < RANK)[None, :]
        byte = tl.load(base + rows[:, None] * stride_t + (cols // 2)[None, :] * stride_c, mask=ok, other=0)
        nib = (byte.to(tl.int16) >> ((cols % 2) * 4).to(tl.int16)[None, :]) & 15
        return (nib ^ 0x6408).to(tl.float16, bitcast=True) - 1032.0
    elif BITS == 8:
        cols = tl.arange(0, RANK_P)
        ok = rows_ok[:, None] & (cols < RANK)[None, :]
        ptrs = base + rows[:, None] * stride_t + cols[None, :] * stride_c
        if DQ_ASM and _COMPILED:
            c = tl.load(ptrs, mask=ok, other=0)
            return tl.inline_asm_elementwise(
                _I8_F16_ASM, "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4
            )
        else:
            c = tl.load(ptrs, mask=ok, other=0).to(tl.int16)
            return ((c & 255) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        cols = tl.arange(0, RANK_P)
        ok = rows_ok[:, None] & (cols < RANK)[None, :]
        ptrs = base + rows[:, None] * stride_t + cols[None, :] * stride_c
        return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _exact_segment(
    m,
    den,
    acc,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    seg_lo,
    seg_hi,
    first_index,
    seg_tier_end,
    mask_ptr,
    stride_mq,
    stride_mk,
    mask_floor,
    rows_q,
    rows_ok,
    q_first,
    scale,
    softcap,
    D: tl.constexpr,
    D_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    F32: tl.constexpr,
):
    """Tokens ``seg_lo .. seg_hi-1`` of one exact tier (K/V [n, D], cache index ``first_index + i``)."""
    dcols = tl.arange(0, D_P)
    d_ok = dcols < D
    for t0 in range(seg_lo, seg_hi, BLOCK_E):
        tt = t0 + tl.arange(0, BLOCK_E)
        t_ok = tt < seg_hi
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + tt[:, None] * stride_kt + dcols[None, :] * stride_kd, mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), F32, k.dtype) * scale
        s = _softcap(s, softcap, HAS_SOFTCAP)
        s += _mask_bias(
            mask_ptr, stride_mq, stride_mk, mask_floor, rows_q, rows_ok, first_index + tt, t_ok,
            q_first, seg_tier_end, HAS_MASK, MASK_BOOL,
        )  # fmt: skip
        m, alpha, p = _online_step(m, den, s)
        v = tl.load(v_base + tt[:, None] * stride_vt + dcols[None, :] * stride_vd, mask=kv_ok, other=0.0)
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, v, F32, v.dtype)
    return m, den, acc


@triton.jit
def _tile_rows(t0, BLOCK_T: tl.constexpr, T: tl.constexpr, T_V: tl.constexpr):
    """A tile's token rows ``t0 .. t0+BLOCK_T-1``, which hold tokens (``< T``), and which hold value bytes
    (``< T_V`` where the value rows are padded past T: see ``_cold_tile``'s docstring)."""
    tt = t0 + tl.arange(0, BLOCK_T)
    t_ok = tt < T
    if T_V > T:
        tv_ok = tt < T_V
    else:
        tv_ok = t_ok
    return tt, t_ok, tv_ok


@triton.jit
def _cold_tile_t(
    m, den, acc_lo, acc_hi, t0, qbt, qbt_hi, kmax, qz, owords, start, open_block,
    kc_n, s_kc_t, s_kc_c, ks_n, s_ks_t, vc_n, s_vc_t, s_vc_c, vs_n, s_vs_t,
    mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, tier_end, scale, softcap,
    T: tl.constexpr, BLOCK_T: tl.constexpr, RK: tl.constexpr, RK_P: tl.constexpr, RV: tl.constexpr,
    RV_P: tl.constexpr, N_OUT: tl.constexpr, OUT_WORDS: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, F32: tl.constexpr, KEY_CHANNEL: tl.constexpr,
    KEY_OFFSETS: tl.constexpr, I4_ASM: tl.constexpr, DEFER_DEN: tl.constexpr, OUT_COLS: tl.constexpr,
    T_V: tl.constexpr, VS_PAD: tl.constexpr, OUT_FLAG: tl.constexpr,
):  # fmt: skip
    """``_cold_tile`` for the flat nibble-split layout, turned over (TILE_T, stop 24; an option, untimed):
    the scores as ``sᵀ = K · qᵀ`` [BLOCK_T, R_P] -- the tile's tokens are the mma's M operand and the
    query rows its N (Triton pads N to the mma's 8 where ``s = q · Kᵀ`` padded the rows to 16) --, the
    softmax over axis 0, and the values as ``accᵀ += Vᵀ · pᵀ`` ([D/2, R_P] halves; ``Vᵀ`` read straight
    from the tokens-contiguous value bytes). ``qbt`` / ``qbt_hi`` [D_P/2, R_P] are the query halves (channel
    scales folded in) turned over once per block; ``den`` [BLOCK_T, R_P] with DEFER_DEN. Same function as
    ``_cold_tile``; sm_90a SASS of a stripped tile loop (``benchmarks/transposed_tile_sass.py``): 382 against
    466 instructions a tile, half the HMMAs, 87 against 119 registers."""
    tt, t_ok, tv_ok = _tile_rows(t0, BLOCK_T, T, T_V)
    klo, khi = _load_int4_halves(kc_n, tt, t_ok, s_kc_t, s_kc_c, RK, RK_P, I4_ASM)
    s = _dot(klo, qbt, F32, tl.float16) + _dot(khi, qbt_hi, F32, tl.float16)  # [BLOCK_T, R_P]
    if KEY_CHANNEL:
        s = s * (kmax * scale)
        if KEY_OFFSETS:
            s = s + qz[None, :]
    else:
        kscale = tl.load(ks_n + tt * s_ks_t, mask=t_ok, other=0.0).to(tl.float32)
        s = s * scale * kscale[:, None]
    s = _softcap(s, softcap, HAS_SOFTCAP)
    vscale = _value_scales(vs_n, tt, t_ok, tv_ok, s_vs_t, T_V, T, VS_PAD)
    if N_OUT > 0:
        t_live = _live_tokens(t0, tt, t_ok, vscale, owords, BLOCK_T, OUT_WORDS, OUT_FLAG, OUT_COLS)
    else:
        t_live = t_ok
    if HAS_MASK or not open_block:
        s += tl.trans(
            _mask_bias(
                mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, start + tt, t_live,
                q_first, tier_end, HAS_MASK, MASK_BOOL,
            )
        )  # fmt: skip
    else:
        s = tl.where(t_live[:, None], s, float("-inf"))
    m, alpha, p = _online_step(m, den, s, 0)
    if DEFER_DEN:
        den = den * alpha[None, :] + p
    else:
        den = den * alpha + tl.sum(p, axis=0)
    vlo, vhi = _load_int4_halves(
        vc_n, tt, tv_ok, s_vc_t, s_vc_c, RV, RV_P, I4_ASM, TRANS=True
    )  # [RV_P/2, BLOCK_T]
    pv = p * vscale[:, None]
    acc_lo = acc_lo * alpha[None, :] + _dot(vlo, pv, F32, tl.float16)
    acc_hi = acc_hi * alpha[None, :] + _dot(vhi, pv, F32, tl.float16)
    return m, den, acc_lo, acc_hi


@triton.jit
def _live_tokens(
    t0, tt, t_ok, vscale, owords, BLOCK_T: tl.constexpr, OUT_WORDS: tl.constexpr, OUT_FLAG: tl.constexpr,
    OUT_COLS: tl.constexpr,
):  # fmt: skip
    """``t_ok`` [BLOCK_T] without the block's outlier rows, found from the tile's value scales (OUT_FLAG:
    -1 there), the per-column mask (OUT_COLS: bit ``t0 / BLOCK_T`` of each column's word, built once per
    block) or the block's bit mask (bit ``t % 32`` of word ``t // 32``: a [N_OUT, BLOCK_T] compare here was
    a fifth of the tile loop's instructions in the SASS; the gather goes through shared memory)."""
    if OUT_FLAG:
        is_out = vscale < 0.0
    elif OUT_COLS:
        is_out = ((owords >> (t0 // BLOCK_T)) & 1) != 0
    else:
        word = tl.gather(owords, tl.minimum(tt // 32, OUT_WORDS - 1), 0)
        is_out = ((word >> (tt % 32)) & 1) != 0
    return t_ok & (~is_out)


@triton.jit
def _value_scales(vs_n, tt, t_ok, tv_ok, s_vs_t, T_V: tl.constexpr, T: tl.constexpr, VS_PAD: tl.constexpr):
    """A tile's per-row value scales [BLOCK_T] float32 (0 past the block's T rows)."""
    if VS_PAD and T_V > T:
        vscale = tl.load(vs_n + tt * s_vs_t, mask=tv_ok, other=0.0).to(tl.float32)
        vscale = tl.where(t_ok, vscale, 0.0)
    else:
        vscale = tl.load(vs_n + tt * s_vs_t, mask=t_ok, other=0.0).to(tl.float32)
    return vscale


@triton.jit
def _cold_tile(
    m, den, acc, acc_hi, lat, t0, q, qb, qb_hi, bk, bk_partner, kch, kch_p, kmax, kz, kz_p, qz, owords, start, open_block,
    kc_n, s_kc_t, s_kc_c, ks_n, s_ks_t, vc_n, s_vc_t, s_vc_c, vs_n, s_vs_t,
    freq, is_rot, partner, sign,
    mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, tier_end, scale, softcap,
    T: tl.constexpr, BLOCK_T: tl.constexpr, RK: tl.constexpr, RK_P: tl.constexpr, RV: tl.constexpr,
    RV_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, N_OUT: tl.constexpr, OUT_WORDS: tl.constexpr,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, KEY_IDENTITY: tl.constexpr, VALUE_IDENTITY: tl.constexpr,
    PRE_ROPE: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    F32: tl.constexpr, DQ_ASM: tl.constexpr, KEY_CHANNEL: tl.constexpr, INT4_BYTES_K: tl.constexpr,
    INT4_BYTES_V: tl.constexpr, KEY_OFFSETS: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_V: tl.constexpr,
    I4_ASM: tl.constexpr, DEFER_DEN: tl.constexpr, KEY_RAW: tl.constexpr = False, OUT_COLS: tl.constexpr = False,
    ABLATE: tl.constexpr = 0, T_V: tl.constexpr = 0, VS_PAD: tl.constexpr = False, OUT_FLAG: tl.constexpr = False,
):  # fmt: skip
    """Tokens ``t0 .. t0+BLOCK_T-1`` of one cold block (coefficient rows at ``kc_n`` / ``vc_n``).

    OUT_FLAG (stop 24; the host's ``ColdBlocks.value_scales_flag_outliers``): the per-row value scales are -1
    at the block's outlier rows and >= 0 elsewhere, so the tile loads its scales before the softmax and
    masks ``scale < 0`` -- the scales arrive in the layout of the scores (they multiply the probabilities),
    where a per-block bit mask (OUT_COLS, the gathered words) must be moved into it every tile. ``owords``
    is then unused. At outlier rows ``p = 0``, so ``p · scale`` is 0 there.

    VS_PAD (with T_V > T; the host's ``_value_scales_padded``): each block's per-token value scales hold
    at least T_V entries (``cache/layer.py`` pads them to 16 since stop 23), so they are loaded with the
    value tile's mask ``t < T_V`` -- whole 16-token groups, copied a tile ahead by the software pipeliner
    -- and zeroed past T in registers (the padding's content never reaches the output).

    T_V > T (the host's ``_value_tokens_padded``): the value coefficient rows are tokens-contiguous and
    hold at least T_V bytes each (``cache/layer.py`` pads them to a multiple of 16), so the value tile is
    loaded with the mask ``t < T_V``: a mask constant over 16-token groups keeps the loads 16-byte
    vectors (``t < T`` with T = 511 -- a compressed tail's block -- made them single bytes, half the
    kernel's speed on the H200). The padding tokens' bytes are integers (finite) and meet ``p · scale``
    = 0 there (the score is masked, the scale loaded as 0), so the result is unchanged.

    KEY_CHANNEL: ``kch`` / ``kch_p`` [D_P] float32 are the block's channel scales at each column
    and at its rotate-half partner (pre-RoPE), ``qb`` the query with ``kch / kmax`` folded in
    (post-RoPE); per-row key scales are then absent. KEY_OFFSETS (with KEY_CHANNEL): ``kz`` [D_P]
    the block's zero points, ``kz_p`` [D_P] the partner's times its sign (pre-RoPE), ``qz`` [R_P]
    ``(q·kz)·scale`` (post-RoPE).

    Nibble split (packed int4 identity rows, post-RoPE): SPLIT_K -- ``qb`` / ``qb_hi`` [R_P, D_P/2] are
    the even / odd columns of the query (with the channel scales folded in under KEY_CHANNEL) and meet
    the low / high nibbles of the key rows (``_load_int4_halves``) in two dots; SPLIT_V -- ``acc`` /
    ``acc_hi`` [R_P, D_P/2] hold the even / odd output columns, fed by the value rows' low / high
    nibbles. No interleaving of nibbles back into column order inside the tile loop.

    OUT_COLS: ``owords`` is the block's outlier mask per tile column ([BLOCK_T] int32, bit k of column
    c <=> token ``k·BLOCK_T + c``, :func:`_outlier_cols`), ``t0`` a multiple of BLOCK_T: the tile's bits
    are one shift away (no gather through shared memory). Otherwise ``owords`` is the bit mask of
    :func:`_outlier_words`.

    ABLATE (timing only, results WRONG; never set by ``decode_attention``, only by the dev script's
    ablation hook; the flat tile loop's nibble-split layout): a bit set of tile work left out -- 1 the
    value side (loads, widening, dot), 2 the key bytes (loads and widening: the score dots multiply
    zeros), 4 the outlier mask, 8 the softmax (no running max, no exponentials: ``p`` = the scores)."""
    tt, t_ok, tv_ok = _tile_rows(t0, BLOCK_T, T, T_V)
    if ABLATE & 2:
        # no key bytes read or widened: the score dots multiply zeros (their HMMAs stay)
        klo = tl.zeros((BLOCK_T, RK_P // 2), dtype=tl.float16)
        khi = tl.zeros((BLOCK_T, RK_P // 2), dtype=tl.float16)
    elif SPLIT_K:
        klo, khi = _load_int4_halves(kc_n, tt, t_ok, s_kc_t, s_kc_c, RK, RK_P, I4_ASM, KEY_RAW)
    else:
        ck = _load_coeffs(kc_n, tt, t_ok, s_kc_t, s_kc_c, RK, RK_P, KEY_BITS, DQ_ASM, INT4_BYTES_K, I4_ASM)
    if KEY_BITS != 16 and not KEY_CHANNEL:
        kscale = tl.load(ks_n + tt * s_ks_t, mask=t_ok, other=0.0).to(tl.float32)
    if PRE_ROPE:
        # rebuild the pre-RoPE key tile, rotate it by its cache indices, then score
        if KEY_CHANNEL:
            cks = ck.to(tl.float32) * kch[None, :]
            if KEY_OFFSETS:
                cks = cks + kz[None, :]
        elif KEY_BITS != 16:
            cks = ck.to(tl.float32) * kscale[:, None]
        else:
            cks = ck.to(tl.float32)
        if KEY_IDENTITY:
            # identity: the partner columns come straight from the coefficient rows
            keys = cks
            keys_partner = _partner_rows(kc_n, tt, t_ok, s_kc_t, s_kc_c, partner, sign, D, D_P, KEY_BITS)
            if KEY_CHANNEL:
                keys_partner = keys_partner * kch_p[None, :]
                if KEY_OFFSETS:
                    keys_partner = keys_partner + kz_p[None, :]
            elif KEY_BITS != 16:
                keys_partner = keys_partner * kscale[:, None]
        else:
            keys = _dot(cks, bk, F32, tl.float16)
            keys_partner = _dot(cks, bk_partner, F32, tl.float16)
        ang = (start + tt).to(tl.float32)[:, None] * freq[None, :]
        cos = tl.where(is_rot[None, :], tl.cos(ang), 1.0)
        sin = tl.where(is_rot[None, :], tl.sin(ang), 0.0)
        keys = keys * cos + keys_partner * sin
        s = _dot(q, tl.trans(keys), F32, tl.float16) * scale
    elif SPLIT_K or (ABLATE & 2):
        # even columns x low nibbles + odd columns x high nibbles (Triton folds the sum into one
        # accumulator)
        s = _dot(qb, tl.trans(klo), F32, tl.float16) + _dot(qb_hi, tl.trans(khi), F32, tl.float16)
        if KEY_CHANNEL:
            s = s * (kmax * scale)
            if KEY_OFFSETS or KEY_RAW:
                # KEY_RAW: qz also holds -1032·Σ(qb)·kmax·scale, the raw nibbles' offset (set per block)
                s = s + qz[:, None]
        else:
            s = s * scale * kscale[None, :]
    elif KEY_CHANNEL:
        s = _dot(qb, tl.trans(ck), F32, ck.dtype) * (kmax * scale)
        if KEY_OFFSETS:
            s = s + qz[:, None]
    elif KEY_IDENTITY:
        s = _dot(q, tl.trans(ck), F32, ck.dtype) * scale
        if KEY_BITS != 16:
            s = s * kscale[None, :]
    else:
        s = _dot(qb, tl.trans(ck), F32, ck.dtype)
        if KEY_BITS != 16:
            s = s * kscale[None, :]
    s = _softcap(s, softcap, HAS_SOFTCAP)
    if OUT_FLAG:
        vscale = _value_scales(vs_n, tt, t_ok, tv_ok, s_vs_t, T_V, T, VS_PAD)
    else:
        vscale = 0.0  # loaded with the values below
    if N_OUT > 0 and not (ABLATE & 4):
        # low-rank rows of tokens kept exact are attended through the exact copy only
        t_live = _live_tokens(t0, tt, t_ok, vscale, owords, BLOCK_T, OUT_WORDS, OUT_FLAG, OUT_COLS)
    else:
        t_live = t_ok
    if HAS_MASK:
        s += _mask_bias(
            mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, start + tt, t_live,
            q_first, tier_end, HAS_MASK, MASK_BOOL,
        )  # fmt: skip
    elif open_block:
        s = tl.where(t_live[None, :], s, float("-inf"))
    else:
        s += _mask_bias(
            mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, start + tt, t_live,
            q_first, tier_end, HAS_MASK, MASK_BOOL,
        )  # fmt: skip
    if ABLATE & 8:
        alpha = tl.full(m.shape, 1.0, tl.float32)
        p = s
    else:
        m, alpha, p = _online_step(m, den, s)
    if DEFER_DEN:
        # den [R_P, BLOCK_T]: per-column partial sums, summed once after the blocks (no cross-warp
        # reduction per tile)
        den = den * alpha[:, None] + p
    else:
        den = den * alpha + tl.sum(p, axis=1)
    if ABLATE & 1:
        acc = acc * alpha[:, None]
    else:
        if SPLIT_V:
            vlo, vhi = _load_int4_halves(vc_n, tt, tv_ok, s_vc_t, s_vc_c, RV, RV_P, I4_ASM)
        else:
            cv = _load_coeffs(
                vc_n, tt, tv_ok, s_vc_t, s_vc_c, RV, RV_P, VALUE_BITS, DQ_ASM, INT4_BYTES_V, I4_ASM
            )
        if VALUE_BITS != 16:
            if not OUT_FLAG:
                vscale = _value_scales(vs_n, tt, t_ok, tv_ok, s_vs_t, T_V, T, VS_PAD)
            pv = p * vscale[None, :]
        else:
            pv = p
        acc = acc * alpha[:, None]
        if SPLIT_V:
            acc += _dot(pv, vlo, F32, tl.float16)
            acc_hi = acc_hi * alpha[:, None] + _dot(pv, vhi, F32, tl.float16)
        elif VALUE_IDENTITY:
            acc += _dot(pv, cv, F32, cv.dtype)
        else:
            lat = lat * alpha[:, None] + _dot(pv, cv, F32, cv.dtype)
    return m, den, acc, acc_hi, lat


@triton.jit
def _outlier_segment(
    m, den, acc, q, starts_ptr,
    ok_bh, s_ok_n, s_ok_o, s_ok_d, ov_bh, s_ov_n, s_ov_o, s_ov_d, oi_bh, s_oi_n, s_oi_o,
    j_lo, j_hi, tier_end,
    mask_ptr, stride_mq, stride_mk, mask_floor, rows_q, rows_ok, q_first, scale, softcap,
    N_OUT: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    """Exact outlier rows ``j_lo .. j_hi-1`` of the cold tier, outlier ``j`` = row ``j % N_OUT`` of
    block ``j // N_OUT`` (cache index ``block_starts[n] + outlier_index[n, o]``), streamed like an
    exact tier instead of inside each block's dependent chain (OUT_SPLIT)."""
    dcols = tl.arange(0, D_P)
    d_ok = dcols < D
    for t0 in range(j_lo, j_hi, BLOCK_E):
        jj = t0 + tl.arange(0, BLOCK_E)
        j_ok = jj < j_hi
        nb = jj // N_OUT
        o = jj % N_OUT
        idx = tl.load(starts_ptr + nb, mask=j_ok, other=0).to(tl.int32)
        idx += tl.load(oi_bh + nb * s_oi_n + o * s_oi_o, mask=j_ok, other=0).to(tl.int32)
        kv_ok = j_ok[:, None] & d_ok[None, :]
        k = tl.load(
            ok_bh + nb[:, None] * s_ok_n + o[:, None] * s_ok_o + dcols[None, :] * s_ok_d,
            mask=kv_ok,
            other=0.0,
        )
        s = _softcap(_dot(q, tl.trans(k), F32, k.dtype) * scale, softcap, HAS_SOFTCAP)
        s += _mask_bias(
            mask_ptr, stride_mq, stride_mk, mask_floor, rows_q, rows_ok, idx, j_ok,
            q_first, tier_end, HAS_MASK, MASK_BOOL,
        )  # fmt: skip
        m, alpha, p = _online_step(m, den, s)
        v = tl.load(
            ov_bh + nb[:, None] * s_ov_n + o[:, None] * s_ov_o + dcols[None, :] * s_ov_d,
            mask=kv_ok,
            other=0.0,
        )
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, v, F32, v.dtype)
    return m, den, acc


# Sizes and positions change at every decode step: specialising on them (value 1, multiple of
# 16) would compile a new kernel variant whenever their combination changes.
_PER_STEP_ARGS = [
    "s_mb", "s_mq", "n_land", "hot_start", "n_hot", "chunk_start", "n_chunk", "q_first", "seq_len",
    "tier_end", "n_blocks", "blocks_per_split", "n_cold_splits", "exact_per_split", "hot_lo",
    "n_out_splits", "out_per_split",
]  # fmt: skip
# Order of the per-step sizes in the ``sizes_ptr`` int32 tensor (SIZES_ON_DEVICE): what a captured
# CUDA graph reads at replay, so one graph serves every step until a buffer moves.
SIZE_FIELDS = (
    "n_land", "hot_start", "n_hot", "chunk_start", "n_chunk", "q_first", "seq_len", "tier_end",
    "n_blocks", "hot_lo",
)  # fmt: skip


@triton.jit(do_not_specialize=_PER_STEP_ARGS)
def spectral_decode_split_kernel(
    # query [B, Hq, q, D]
    q_ptr, s_qb, s_qh, s_qq, s_qd,
    # mask [B|1, 1, q, kv] (uint8 view of bool, or float); stride_mb = 0 broadcasts
    mask_ptr, s_mb, s_mq, s_mk, mask_floor,
    # cold tier
    starts_ptr,
    kc_ptr, s_kc_b, s_kc_h, s_kc_n, s_kc_t, s_kc_c,
    ks_ptr, s_ks_b, s_ks_h, s_ks_n, s_ks_t,  # s_ks_t: row stride, or channel stride (KEY_CHANNEL)
    ko_ptr, s_ko_b, s_ko_h, s_ko_n, s_ko_d,  # key zero points [B, H, nb, 1, D] (KEY_OFFSETS)
    kb_ptr, s_kb_b, s_kb_h, s_kb_n, s_kb_r, s_kb_d,
    vc_ptr, s_vc_b, s_vc_h, s_vc_n, s_vc_t, s_vc_c,
    vs_ptr, s_vs_b, s_vs_h, s_vs_n, s_vs_t,
    vb_ptr, s_vb_b, s_vb_h, s_vb_n, s_vb_r, s_vb_d,
    ok_ptr, s_ok_b, s_ok_h, s_ok_n, s_ok_o, s_ok_d,
    ov_ptr, s_ov_b, s_ov_h, s_ov_n, s_ov_o, s_ov_d,
    oi_ptr, s_oi_b, s_oi_h, s_oi_n, s_oi_o,
    inv_freq_ptr,
    # exact tiers: landmarks, hot buffer, current chunk ([B, H, n, D] each)
    lk_ptr, s_lk_b, s_lk_h, s_lk_t, s_lk_d,
    lv_ptr, s_lv_b, s_lv_h, s_lv_t, s_lv_d,
    hk_ptr, s_hk_b, s_hk_h, s_hk_t, s_hk_d,
    hv_ptr, s_hv_b, s_hv_h, s_hv_t, s_hv_d,
    ck_ptr, s_ck_b, s_ck_h, s_ck_t, s_ck_d,
    cv_ptr, s_cv_b, s_cv_h, s_cv_t, s_cv_d,
    n_land, hot_start, n_hot, chunk_start, n_chunk, hot_lo,
    # partials, one float32 buffer: acc [BH, S, R, D] | m [BH, S, R] | l [BH, S, R], contiguous
    part_ptr,
    # sizes
    n_kv, q_len, q_first, seq_len, tier_end, n_blocks, blocks_per_split, n_cold_splits, exact_per_split,
    n_out_splits, out_per_split,
    scale, softcap,
    # per-step sizes on the device (int32 [len(SIZE_FIELDS)]), read instead of the scalars above
    sizes_ptr,
    G: tl.constexpr, R: tl.constexpr, R_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    T: tl.constexpr, BLOCK_T: tl.constexpr,
    RK: tl.constexpr, RK_P: tl.constexpr, RV: tl.constexpr, RV_P: tl.constexpr,
    N_OUT: tl.constexpr, N_OUT_P: tl.constexpr, OUT_WORDS: tl.constexpr, BLOCK_E: tl.constexpr,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
    KEY_IDENTITY: tl.constexpr, VALUE_IDENTITY: tl.constexpr,
    PRE_ROPE: tl.constexpr, ROT_HALF: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_CHUNK: tl.constexpr, F32: tl.constexpr, SIZES_ON_DEVICE: tl.constexpr, BLOCK_STAGES: tl.constexpr,
    OUT_SPLIT: tl.constexpr, DQ_ASM: tl.constexpr, KC_T: tl.constexpr, VC_T: tl.constexpr,
    KEY_CHANNEL: tl.constexpr, INT4_BYTES_K: tl.constexpr, INT4_BYTES_V: tl.constexpr,
    KEY_OFFSETS: tl.constexpr, BLOCK_PARTS: tl.constexpr, PART_T: tl.constexpr,
    SPLIT_K: tl.constexpr = False, SPLIT_V: tl.constexpr = False, I4_ASM: tl.constexpr = False,
    DEFER_DEN: tl.constexpr = False, FLAT: tl.constexpr = 0, FLAT_TILES: tl.constexpr = 1,
    KEY_RAW: tl.constexpr = False, OUT_COLS: tl.constexpr = False, ABLATE: tl.constexpr = 0,
    PDL: tl.constexpr = 0, T_V: tl.constexpr = 0, VS_PAD: tl.constexpr = False, OUT_FLAG: tl.constexpr = False,
    TILE_T: tl.constexpr = False,
):  # fmt: skip
    # ABLATE: timing only (parts of the tile work left out, results wrong; see _cold_tile). decode_attention
    # always passes 0; only benchmarks/attention_kernel_dev.py's ablation hook sets it.
    if PDL == 1:
        # programmatic dependent launch (compiled only; the host sets PDL only there): let the next
        # dependent grid (the combine kernel, or the next step's split kernel) be scheduled now, then wait
        # for the grid before this one (the previous step's writes: the partials, the query)
        grid_wait(True)
    elif PDL == 2:
        # only the combine kernel is a programmatic dependent: let it be scheduled now (this launch is an
        # ordinary one, so there is nothing to wait for)
        grid_trigger()
    if SIZES_ON_DEVICE:
        # CUDA-graph mode: the grid is sized for capacity; the sizes of this step are device data
        # (programs past the live blocks / exact tokens find empty ranges and write empty partials)
        n_land = tl.load(sizes_ptr + 0)
        hot_start = tl.load(sizes_ptr + 1)
        n_hot = tl.load(sizes_ptr + 2)
        chunk_start = tl.load(sizes_ptr + 3)
        n_chunk = tl.load(sizes_ptr + 4)
        q_first = tl.load(sizes_ptr + 5)
        seq_len = tl.load(sizes_ptr + 6)
        tier_end = tl.load(sizes_ptr + 7)
        n_blocks = tl.load(sizes_ptr + 8)
        hot_lo = tl.load(sizes_ptr + 9)
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // n_kv
    h = pid_bh % n_kv

    # ---- the query tile: rows r = g*q + i of query head h*G + g, position i
    rows = tl.arange(0, R_P)
    rows_ok = rows < R
    rows_g = rows // q_len
    rows_q = rows % q_len
    dcols = tl.arange(0, D_P)
    d_ok = dcols < D
    q_ptrs = (
        q_ptr + b * s_qb + (h * G + rows_g)[:, None] * s_qh + rows_q[:, None] * s_qq + dcols[None, :] * s_qd
    )
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    # products use the query as given (no rounding of q·scale); scores are scaled in float32
    mrow_ptr = mask_ptr + b * s_mb

    m = tl.full((R_P,), float("-inf"), dtype=tl.float32)
    den = tl.zeros((R_P,), dtype=tl.float32)
    acc = tl.zeros((R_P, D_P), dtype=tl.float32)

    if pid_s < n_cold_splits:
        # ------------------------------------------------------------ cold blocks
        if BLOCK_PARTS > 1:
            # block parts: program pid_s reads part j = pid_s % BLOCK_PARTS of block pid_s // BLOCK_PARTS,
            # PART_T tokens (whole BLOCK_T tiles) from token j·PART_T on (the last part may hold fewer,
            # or none); programs past the live blocks (graph capacity) find an empty block range
            n_lo = pid_s // BLOCK_PARTS
            n_hi = tl.minimum(n_lo + 1, n_blocks)
            part_j = pid_s % BLOCK_PARTS
            t_first = part_j * PART_T
            t_end = tl.minimum(t_first + PART_T, T)
        else:
            n_lo = pid_s * blocks_per_split
            n_hi = tl.minimum(n_lo + blocks_per_split, n_blocks)
            part_j = 0
            t_first = 0  # compile-time bounds: without parts the tile loop is today's
            t_end = T
        kc_bh = kc_ptr + b * s_kc_b + h * s_kc_h
        ks_bh = ks_ptr + b * s_ks_b + h * s_ks_h
        kb_bh = kb_ptr + b * s_kb_b + h * s_kb_h
        vc_bh = vc_ptr + b * s_vc_b + h * s_vc_h
        vs_bh = vs_ptr + b * s_vs_b + h * s_vs_h
        vb_bh = vb_ptr + b * s_vb_b + h * s_vb_h
        ok_bh = ok_ptr + b * s_ok_b + h * s_ok_h
        ov_bh = ov_ptr + b * s_ov_b + h * s_ov_h
        oi_bh = oi_ptr + b * s_oi_b + h * s_oi_h
        kr = tl.arange(0, RK_P)
        vr = tl.arange(0, RV_P)
        orow = tl.arange(0, N_OUT_P)
        o_ok = orow < N_OUT
        # nibble split (SPLIT_K / SPLIT_V): even / odd columns 2j / 2j+1 of the query and of the output
        hcols = tl.arange(0, D_P // 2)
        even_ok = 2 * hcols < D
        odd_ok = 2 * hcols + 1 < D
        if SPLIT_K:
            q_row = q_ptr + b * s_qb + (h * G + rows_g)[:, None] * s_qh + rows_q[:, None] * s_qq
            q_lo = tl.load(
                q_row + (2 * hcols)[None, :] * s_qd, mask=rows_ok[:, None] & even_ok[None, :], other=0.0
            )
            q_hi = tl.load(q_row + (2 * hcols + 1)[None, :] * s_qd, mask=rows_ok[:, None] & odd_ok[None, :],
                           other=0.0)  # fmt: skip
        else:
            q_lo = 0.0
            q_hi = 0.0
        if SPLIT_V and TILE_T:
            # TILE_T: the halves turned over, [D_P/2, R_P] (``_cold_tile_t``)
            acc_lo = tl.zeros((D_P // 2, R_P), dtype=tl.float32)
            acc_hi = tl.zeros((D_P // 2, R_P), dtype=tl.float32)
        elif SPLIT_V:
            # the cold programs' output columns as two halves, interleaved back once after the blocks
            acc_lo = tl.zeros((R_P, D_P // 2), dtype=tl.float32)
            acc_hi = tl.zeros((R_P, D_P // 2), dtype=tl.float32)
        else:
            acc_lo = acc
            acc_hi = 0.0
        if DEFER_DEN and TILE_T:
            den = tl.zeros((BLOCK_T, R_P), dtype=tl.float32)
        elif DEFER_DEN:
            den = tl.zeros((R_P, BLOCK_T), dtype=tl.float32)
        if PRE_ROPE:
            # rotate-half partner of column j: -x[j + half] (j < half), x[j - half] (half <= j < 2*half)
            is_rot = dcols < 2 * ROT_HALF
            lo_half = dcols < ROT_HALF
            partner = tl.where(lo_half, dcols + ROT_HALF, tl.where(is_rot, dcols - ROT_HALF, dcols))
            sign = tl.where(lo_half, -1.0, 1.0)
            freq = tl.load(inv_freq_ptr + dcols % ROT_HALF, mask=is_rot, other=0.0)
        else:
            is_rot = 0
            partner = 0
            sign = 0.0
            freq = 0.0
        # coefficient row strides as compile-time constants when the host knows them (KC_T / VC_T > 0:
        # rows of one block contiguous): then Triton sees that an 8-byte int4 key row is 8-byte
        # aligned and loads it with one instruction instead of eight byte loads
        if KC_T > 0:
            kc_t = KC_T
        else:
            kc_t = s_kc_t
        if VC_T > 0:
            vc_t = VC_T
        else:
            vc_t = s_vc_t
        # BLOCK_STAGES > 0: the tiles of a block are unrolled (static_range), so the block loop is the
        # innermost loop and Triton's software pipeliner loads block n+1's coefficients, bases and
        # outliers (cp.async into shared memory) while block n is computed, BLOCK_STAGES buffers deep.
        # 0: a run-time tile loop (pipelined within the block)
        if FLAT:
            # FLAT (1 / 2 / 3): one pipelined loop over the program's tiles across its blocks (the default layout:
            # nibble-split identity rows, post-RoPE, outliers in programs of their own, no block parts),
            # so the next tiles' loads stay in flight over block boundaries; a block's setup (its start,
            # outlier bit mask, channel scales folded into the query halves, q·z) runs at its first tile
            n_tiles = tl.maximum(n_hi - n_lo, 0) * FLAT_TILES
            start = n_lo * 0
            open_block = start < 0
            if OUT_COLS:
                owords = tl.zeros((BLOCK_T,), dtype=tl.int32)
            else:
                owords = tl.zeros((OUT_WORDS,), dtype=tl.int32)
            qz = tl.zeros((R_P,), dtype=tl.float32)
            kmax = tl.sum(tl.zeros((2,), dtype=tl.float32), axis=0) + 1.0
            if KEY_CHANNEL:
                # the folded query halves in the dots' operand type (float16 unless F32), rounded once
                # per block here rather than in every tile (16 conversions a tile in the SASS)
                qb = tl.zeros((R_P, D_P // 2), dtype=tl.float32 if F32 else tl.float16)
                qb_hi = tl.zeros((R_P, D_P // 2), dtype=tl.float32 if F32 else tl.float16)
            else:
                qb = q_lo
                qb_hi = q_hi
            if TILE_T:
                qbt = tl.trans(qb)
                qbt_hi = tl.trans(qb_hi)
            else:
                qbt = 0.0
                qbt_hi = 0.0
            if FLAT == 3:
                # the first block's setup data now; each block's setup then loads the next block's, so
                # its latency hides behind the block's tiles instead of stalling its first tile
                nx_start, nx_oidx, nx_kch, nx_kz = _setup_ahead(
                    n_lo, n_hi, starts_ptr, oi_bh + n_lo * s_oi_n, s_oi_o, orow, o_ok, ks_bh + n_lo * s_ks_n,
                    s_ks_t, dcols, d_ok, ko_ptr + b * s_ko_b + h * s_ko_h + n_lo * s_ko_n, s_ko_d,
                    N_OUT, KEY_CHANNEL, KEY_OFFSETS,
                )  # fmt: skip
            for i in tl.range(0, n_tiles):
                n = n_lo + i // FLAT_TILES
                t0 = (i % FLAT_TILES) * BLOCK_T
                # the block's setup data: FLAT 2 loads it at every tile (cache hits after its first) so
                # that the software pipeliner prefetches it with the tiles; FLAT 1 at its first tile only;
                # FLAT 3 one block ahead (at the previous block's first tile)
                if FLAT == 2:
                    start_n = tl.load(starts_ptr + n).to(tl.int32)
                    if N_OUT > 0:
                        oidx = tl.load(oi_bh + n * s_oi_n + orow * s_oi_o, mask=o_ok, other=-1).to(tl.int32)
                    if KEY_CHANNEL:
                        kch_n = tl.load(ks_bh + n * s_ks_n + dcols * s_ks_t, mask=d_ok, other=0.0)
                        if KEY_OFFSETS:
                            kz_n = tl.load(ko_ptr + b * s_ko_b + h * s_ko_h + n * s_ko_n + dcols * s_ko_d,
                                           mask=d_ok, other=0.0)  # fmt: skip
                if t0 == 0:
                    if FLAT == 3:
                        start_n = nx_start
                        oidx = nx_oidx
                        kch_n = nx_kch
                        kz_n = nx_kz
                        n1 = n + 1
                        nx_start, nx_oidx, nx_kch, nx_kz = _setup_ahead(
                            n1, n_hi, starts_ptr, oi_bh + n1 * s_oi_n, s_oi_o, orow, o_ok, ks_bh + n1 * s_ks_n,
                            s_ks_t, dcols, d_ok, ko_ptr + b * s_ko_b + h * s_ko_h + n1 * s_ko_n, s_ko_d,
                            N_OUT, KEY_CHANNEL, KEY_OFFSETS,
                        )  # fmt: skip
                    elif FLAT != 2:
                        start_n = tl.load(starts_ptr + n).to(tl.int32)
                        if N_OUT > 0:
                            oidx = tl.load(oi_bh + n * s_oi_n + orow * s_oi_o, mask=o_ok, other=-1).to(
                                tl.int32
                            )
                        if KEY_CHANNEL:
                            kch_n = tl.load(ks_bh + n * s_ks_n + dcols * s_ks_t, mask=d_ok, other=0.0)
                            if KEY_OFFSETS:
                                kz_n = tl.load(ko_ptr + b * s_ko_b + h * s_ko_h + n * s_ko_n + dcols * s_ko_d,
                                               mask=d_ok, other=0.0)  # fmt: skip
                    start = start_n
                    open_block = (start + T <= tier_end) & (start + T - 1 <= q_first)
                    if N_OUT > 0 and not OUT_FLAG:
                        if OUT_COLS:
                            owords = _outlier_cols(oidx, o_ok, BLOCK_T)
                        else:
                            owords = _outlier_words(oidx, o_ok, OUT_WORDS)
                    if KEY_CHANNEL:
                        # the channel scales over the largest, split into even / odd columns (the inverse of
                        # join + reshape), folded into the query halves
                        kch_f = kch_n.to(tl.float32)
                        kmax = tl.maximum(tl.max(kch_f, axis=0), 1e-30)
                        kch_lo, kch_hi = tl.split(tl.reshape(kch_f / kmax, (D_P // 2, 2)))
                        qb = (q_lo.to(tl.float32) * kch_lo[None, :]).to(qb.dtype)
                        qb_hi = (q_hi.to(tl.float32) * kch_hi[None, :]).to(qb_hi.dtype)
                        if KEY_OFFSETS:
                            qz = tl.sum(q.to(tl.float32) * kz_n.to(tl.float32)[None, :], axis=1) * scale
                        elif KEY_RAW:
                            qz = tl.zeros((R_P,), dtype=tl.float32)
                        if KEY_RAW:
                            qz = _raw_key_offset(qz, qb, qb_hi, kmax * scale)
                        if TILE_T:
                            qbt = tl.trans(qb)
                            qbt_hi = tl.trans(qb_hi)
                if TILE_T:
                    m, den, acc_lo, acc_hi = _cold_tile_t(
                        m, den, acc_lo, acc_hi, t0, qbt, qbt_hi, kmax, qz, owords, start, open_block,
                        kc_bh + n * s_kc_n, kc_t, s_kc_c, ks_bh + n * s_ks_n, s_ks_t,
                        vc_bh + n * s_vc_n, vc_t, s_vc_c, vs_bh + n * s_vs_n, s_vs_t,
                        mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, tier_end, scale, softcap,
                        T, BLOCK_T, RK, RK_P, RV, RV_P, N_OUT, OUT_WORDS, HAS_MASK, MASK_BOOL, HAS_SOFTCAP, F32,
                        KEY_CHANNEL, KEY_OFFSETS, I4_ASM, DEFER_DEN, OUT_COLS, T_V, VS_PAD, OUT_FLAG,
                    )  # fmt: skip
                else:
                    m, den, acc_lo, acc_hi, lat = _cold_tile(
                        m, den, acc_lo, acc_hi, 0.0, t0, q, qb, qb_hi, 0.0, 0.0, 0.0, 0.0, kmax, 0.0, 0.0, qz, owords,
                        start, open_block,
                        kc_bh + n * s_kc_n, kc_t, s_kc_c, ks_bh + n * s_ks_n, s_ks_t,
                        vc_bh + n * s_vc_n, vc_t, s_vc_c, vs_bh + n * s_vs_n, s_vs_t,
                        freq, is_rot, partner, sign,
                        mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, tier_end, scale, softcap,
                        T, BLOCK_T, RK, RK_P, RV, RV_P, D, D_P, N_OUT, OUT_WORDS, KEY_BITS, VALUE_BITS, KEY_IDENTITY,
                        VALUE_IDENTITY, PRE_ROPE, HAS_MASK, MASK_BOOL, HAS_SOFTCAP, F32, DQ_ASM, KEY_CHANNEL, INT4_BYTES_K,
                        INT4_BYTES_V, KEY_OFFSETS, SPLIT_K, SPLIT_V, I4_ASM, DEFER_DEN, KEY_RAW, OUT_COLS, ABLATE,
                        T_V=T_V, VS_PAD=VS_PAD, OUT_FLAG=OUT_FLAG,
                    )  # fmt: skip
        else:
            for n in tl.range(n_lo, n_hi, num_stages=1 if BLOCK_STAGES == 0 else BLOCK_STAGES):
                start = tl.load(starts_ptr + n).to(tl.int32)
                # decode without a mask: a block wholly before the chunk and before the first query is
                # seen by every row, so only its outlier rows need masking (no per-element bias)
                open_block = (start + T <= tier_end) & (start + T - 1 <= q_first)
                # -- exact outliers of this block, in the same online softmax
                if N_OUT > 0:
                    oidx = tl.load(oi_bh + n * s_oi_n + orow * s_oi_o, mask=o_ok, other=-1).to(tl.int32)
                    owords = _outlier_words(oidx, o_ok, OUT_WORDS)
                else:
                    oidx = 0
                    owords = 0
                if N_OUT > 0 and not OUT_SPLIT:
                    # block parts: part 0 alone attends the block's exact outliers (each exact token once);
                    # the other parts only mask their low-rank rows (owords above)
                    if BLOCK_PARTS > 1:
                        # one integer compare (a scalar bool & a bool tensor is int32 in Triton 3.9's
                        # interpreter, which then refuses it as a load mask): true for part 0 only
                        o_att = orow < N_OUT * (1 - part_j)
                    else:
                        o_att = o_ok
                    okeys = tl.load(
                        ok_bh + n * s_ok_n + orow[:, None] * s_ok_o + dcols[None, :] * s_ok_d,
                        mask=o_att[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    s_out = _softcap(_dot(q, tl.trans(okeys), F32, okeys.dtype) * scale, softcap, HAS_SOFTCAP)
                    s_out += _mask_bias(
                        mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, start + oidx, o_att,
                        q_first, tier_end, HAS_MASK, MASK_BOOL,
                    )  # fmt: skip
                    m, alpha_out, p_out = _online_step(m, den, s_out)
                    ovals = tl.load(
                        ov_bh + n * s_ov_n + orow[:, None] * s_ov_o + dcols[None, :] * s_ov_d,
                        mask=o_att[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    if DEFER_DEN:
                        # the outliers' row sums into column 0 of the deferred denominator
                        den = den * alpha_out[:, None] + tl.where(
                            tl.arange(0, BLOCK_T)[None, :] == 0, tl.sum(p_out, axis=1)[:, None], 0.0
                        )
                    else:
                        den = den * alpha_out + tl.sum(p_out, axis=1)
                    if SPLIT_V:
                        ov_lo = tl.load(
                            ov_bh + n * s_ov_n + orow[:, None] * s_ov_o + (2 * hcols)[None, :] * s_ov_d,
                            mask=o_att[:, None] & even_ok[None, :],
                            other=0.0,
                        )
                        ov_hi = tl.load(
                            ov_bh + n * s_ov_n + orow[:, None] * s_ov_o + (2 * hcols + 1)[None, :] * s_ov_d,
                            mask=o_att[:, None] & odd_ok[None, :],
                            other=0.0,
                        )
                        acc_lo = acc_lo * alpha_out[:, None] + _dot(p_out, ov_lo, F32, ov_lo.dtype)
                        acc_hi = acc_hi * alpha_out[:, None] + _dot(p_out, ov_hi, F32, ov_hi.dtype)
                    else:
                        acc_lo = acc_lo * alpha_out[:, None] + _dot(p_out, ovals, F32, ovals.dtype)
                # -- per-block key projection q·B_Kᵀ (post-RoPE low-rank keys)
                if not KEY_IDENTITY:
                    bk = tl.load(
                        kb_bh + n * s_kb_n + kr[:, None] * s_kb_r + dcols[None, :] * s_kb_d,
                        mask=(kr < RK)[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    if PRE_ROPE:
                        bk_partner = tl.load(
                            kb_bh + n * s_kb_n + kr[:, None] * s_kb_r + partner[None, :] * s_kb_d,
                            mask=(kr < RK)[:, None] & d_ok[None, :],
                            other=0.0,
                        )
                        bk_partner = bk_partner * sign[None, :].to(bk_partner.dtype)
                        qb = 0.0
                    else:
                        qb = _dot(q, tl.trans(bk), F32, bk.dtype) * scale  # [R_P, RK_P] float32
                        bk_partner = 0.0
                else:
                    bk = 0.0
                    bk_partner = 0.0
                    qb = 0.0
                qb_hi = 0.0
                if SPLIT_K and not KEY_CHANNEL:
                    qb = q_lo
                    qb_hi = q_hi
                if KEY_CHANNEL and SPLIT_K:
                    # the block's channel scales at the even / odd columns, folded into the query halves
                    kch_lo = tl.load(ks_bh + n * s_ks_n + (2 * hcols) * s_ks_t, mask=even_ok, other=0.0).to(
                        tl.float32
                    )
                    kch_hi = tl.load(
                        ks_bh + n * s_ks_n + (2 * hcols + 1) * s_ks_t, mask=odd_ok, other=0.0
                    ).to(tl.float32)
                    kmax = tl.maximum(tl.maximum(tl.max(kch_lo, axis=0), tl.max(kch_hi, axis=0)), 1e-30)
                    qb = (q_lo.to(tl.float32) * (kch_lo / kmax)[None, :]).to(
                        tl.float32 if F32 else tl.float16
                    )
                    qb_hi = (q_hi.to(tl.float32) * (kch_hi / kmax)[None, :]).to(
                        tl.float32 if F32 else tl.float16
                    )
                    kch = 0.0
                    kch_p = 0.0
                    kz = 0.0
                    kz_p = 0.0
                    if KEY_OFFSETS:
                        # q·z once per block times the softmax scale, as below (the full query and offsets)
                        kz_full = tl.load(ko_ptr + b * s_ko_b + h * s_ko_h + n * s_ko_n + dcols * s_ko_d,
                                          mask=d_ok, other=0.0).to(tl.float32)  # fmt: skip
                        qz = tl.sum(q.to(tl.float32) * kz_full[None, :], axis=1) * scale
                    else:
                        qz = tl.zeros((R_P,), dtype=tl.float32)
                    if KEY_RAW:
                        qz = _raw_key_offset(qz, qb, qb_hi, kmax * scale)
                elif KEY_CHANNEL:
                    # the block's channel scales (key_scales [.., n, 0, d]: s_ks_t is the channel stride)
                    kch = tl.load(ks_bh + n * s_ks_n + dcols * s_ks_t, mask=d_ok, other=0.0).to(tl.float32)
                    kmax = tl.maximum(tl.max(kch, axis=0), 1e-30)
                    if PRE_ROPE:
                        kch_p = tl.load(ks_bh + n * s_ks_n + partner * s_ks_t, mask=d_ok, other=0.0).to(
                            tl.float32
                        )
                    else:
                        kch_p = 0.0
                        qb = q.to(tl.float32) * (kch / kmax)[None, :]
                    if KEY_OFFSETS:
                        # the block's zero points (key_offsets [.., n, 0, d]); absent columns read 0
                        kz = tl.load(ko_ptr + b * s_ko_b + h * s_ko_h + n * s_ko_n + dcols * s_ko_d,
                                     mask=d_ok, other=0.0).to(tl.float32)  # fmt: skip
                        if PRE_ROPE:
                            # the partner column's zero point, signed as _partner_rows signs its integers
                            kz_p = sign * tl.load(
                                ko_ptr + b * s_ko_b + h * s_ko_h + n * s_ko_n + partner * s_ko_d,
                                mask=d_ok,
                                other=0.0,
                            ).to(tl.float32)
                            qz = 0.0
                        else:
                            # q·z once per block, already times the softmax scale: added to every raw score
                            qz = tl.sum(q.to(tl.float32) * kz[None, :], axis=1) * scale
                            kz_p = 0.0
                    else:
                        kz = 0.0
                        kz_p = 0.0
                        qz = 0.0
                else:
                    kch = 0.0
                    kch_p = 0.0
                    kmax = 1.0
                    kz = 0.0
                    kz_p = 0.0
                    qz = 0.0
                if not VALUE_IDENTITY:
                    lat = tl.zeros((R_P, RV_P), dtype=tl.float32)
                else:
                    lat = 0.0
                if BLOCK_STAGES == 0:
                    # tiles in a run-time loop (Triton pipelines that loop: both tiles' loads up front)
                    for t0 in range(t_first, t_end, BLOCK_T):
                        m, den, acc_lo, acc_hi, lat = _cold_tile(
                            m, den, acc_lo, acc_hi, lat, t0, q, qb, qb_hi, bk, bk_partner, kch, kch_p, kmax, kz, kz_p, qz, owords, start,
                            open_block,
                            kc_bh + n * s_kc_n, kc_t, s_kc_c, ks_bh + n * s_ks_n, s_ks_t,
                            vc_bh + n * s_vc_n, vc_t, s_vc_c, vs_bh + n * s_vs_n, s_vs_t,
                            freq, is_rot, partner, sign,
                            mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, tier_end, scale, softcap,
                            T, BLOCK_T, RK, RK_P, RV, RV_P, D, D_P, N_OUT, OUT_WORDS, KEY_BITS, VALUE_BITS, KEY_IDENTITY,
                            VALUE_IDENTITY, PRE_ROPE, HAS_MASK, MASK_BOOL, HAS_SOFTCAP, F32, DQ_ASM, KEY_CHANNEL, INT4_BYTES_K,
                            INT4_BYTES_V, KEY_OFFSETS, SPLIT_K, SPLIT_V, I4_ASM, DEFER_DEN, KEY_RAW, T_V=T_V, VS_PAD=VS_PAD, OUT_FLAG=OUT_FLAG,
                        )  # fmt: skip
                else:
                    # tiles unrolled: the block loop is then the innermost one, pipelined across blocks
                    # (block parts: PART_T tokens from t_first on; tiles past the block's end are masked)
                    for t0 in tl.static_range(0, PART_T, BLOCK_T):
                        m, den, acc_lo, acc_hi, lat = _cold_tile(
                            m, den, acc_lo, acc_hi, lat, t_first + t0, q, qb, qb_hi, bk, bk_partner, kch, kch_p, kmax, kz, kz_p, qz, owords, start,
                            open_block,
                            kc_bh + n * s_kc_n, kc_t, s_kc_c, ks_bh + n * s_ks_n, s_ks_t,
                            vc_bh + n * s_vc_n, vc_t, s_vc_c, vs_bh + n * s_vs_n, s_vs_t,
                            freq, is_rot, partner, sign,
                            mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, tier_end, scale, softcap,
                            T, BLOCK_T, RK, RK_P, RV, RV_P, D, D_P, N_OUT, OUT_WORDS, KEY_BITS, VALUE_BITS, KEY_IDENTITY,
                            VALUE_IDENTITY, PRE_ROPE, HAS_MASK, MASK_BOOL, HAS_SOFTCAP, F32, DQ_ASM, KEY_CHANNEL, INT4_BYTES_K,
                            INT4_BYTES_V, KEY_OFFSETS, SPLIT_K, SPLIT_V, I4_ASM, DEFER_DEN, KEY_RAW, T_V=T_V, VS_PAD=VS_PAD, OUT_FLAG=OUT_FLAG,
                        )  # fmt: skip
                if not VALUE_IDENTITY:
                    bv = tl.load(
                        vb_bh + n * s_vb_n + vr[:, None] * s_vb_r + dcols[None, :] * s_vb_d,
                        mask=(vr < RV)[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    acc_lo += _dot(lat, bv, F32, tl.float16)
        if SPLIT_V and TILE_T:
            acc = tl.reshape(tl.join(tl.trans(acc_lo), tl.trans(acc_hi)), (R_P, D_P))
        elif SPLIT_V:
            # columns 2j / 2j+1 back in order: [R_P, D_P/2, 2] -> [R_P, D_P], once per program
            acc = tl.reshape(tl.join(acc_lo, acc_hi), (R_P, D_P))
        else:
            acc = acc_lo
        if DEFER_DEN and TILE_T:
            den = tl.sum(den, axis=0)
        elif DEFER_DEN:
            den = tl.sum(den, axis=1)
    elif pid_s < n_cold_splits + n_out_splits:
        # ------------------------------------------------------------ outliers of the cold blocks
        # (OUT_SPLIT; else n_out_splits = 0): outlier j = n * N_OUT + o, out_per_split per program
        if OUT_SPLIT:
            j_lo = (pid_s - n_cold_splits) * out_per_split
            j_hi = tl.minimum(j_lo + out_per_split, n_blocks * N_OUT)
            m, den, acc = _outlier_segment(
                m, den, acc, q, starts_ptr,
                ok_ptr + b * s_ok_b + h * s_ok_h, s_ok_n, s_ok_o, s_ok_d,
                ov_ptr + b * s_ov_b + h * s_ov_h, s_ov_n, s_ov_o, s_ov_d,
                oi_ptr + b * s_oi_b + h * s_oi_h, s_oi_n, s_oi_o,
                j_lo, j_hi, tier_end,
                mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, scale, softcap,
                N_OUT, D, D_P, BLOCK_E, HAS_MASK, MASK_BOOL, HAS_SOFTCAP, F32,
            )  # fmt: skip
    else:
        # ------------------------------------------------------------ exact tiers
        e_lo = (pid_s - n_cold_splits - n_out_splits) * exact_per_split
        e_hi = e_lo + exact_per_split
        # landmarks: virtual [0, n_land)
        m, den, acc = _exact_segment(
            m, den, acc, q,
            lk_ptr + b * s_lk_b + h * s_lk_h, lv_ptr + b * s_lv_b + h * s_lv_h,
            s_lk_t, s_lk_d, s_lv_t, s_lv_d,
            tl.maximum(e_lo, 0), tl.minimum(e_hi, n_land), 0, tier_end,
            mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, scale, softcap,
            D, D_P, BLOCK_E, HAS_MASK, MASK_BOOL, HAS_SOFTCAP, F32,
        )  # fmt: skip
        # hot buffer: virtual [n_land, n_land + n_hot)
        m, den, acc = _exact_segment(
            m, den, acc, q,
            hk_ptr + b * s_hk_b + h * s_hk_h + hot_lo * s_hk_t, hv_ptr + b * s_hv_b + h * s_hv_h + hot_lo * s_hv_t,
            s_hk_t, s_hk_d, s_hv_t, s_hv_d,
            tl.maximum(e_lo - n_land, 0), tl.minimum(e_hi - n_land, n_hot), hot_start, tier_end,
            mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, scale, softcap,
            D, D_P, BLOCK_E, HAS_MASK, MASK_BOOL, HAS_SOFTCAP, F32,
        )  # fmt: skip
        if HAS_CHUNK:
            c0 = n_land + n_hot
            m, den, acc = _exact_segment(
                m, den, acc, q,
                ck_ptr + b * s_ck_b + h * s_ck_h, cv_ptr + b * s_cv_b + h * s_cv_h,
                s_ck_t, s_ck_d, s_cv_t, s_cv_d,
                tl.maximum(e_lo - c0, 0), tl.minimum(e_hi - c0, n_chunk), chunk_start, seq_len,
                mrow_ptr, s_mq, s_mk, mask_floor, rows_q, rows_ok, q_first, scale, softcap,
                D, D_P, BLOCK_E, HAS_MASK, MASK_BOOL, HAS_SOFTCAP, F32,
            )  # fmt: skip

    # ---- this program's partial
    part = pid_bh * n_splits + pid_s
    n_part = tl.num_programs(0) * n_splits * R
    tl.store(part_ptr + n_part * D + part * R + rows, m, mask=rows_ok)
    tl.store(part_ptr + n_part * (D + 1) + part * R + rows, den, mask=rows_ok)
    tl.store(
        part_ptr + (part * R + rows)[:, None] * D + dcols[None, :],
        acc,
        mask=rows_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _partner_rows(base, rows, rows_ok, stride_t, stride_c, partner, sign, D: tl.constexpr, D_P: tl.constexpr,
                  BITS: tl.constexpr):  # fmt: skip
    """Identity pre-RoPE keys: the rotate-half partner tile ``sign[j] * C[t, partner[j]]`` [N, D_P]."""
    ok = rows_ok[:, None] & (tl.arange(0, D_P) < D)[None, :]
    if BITS == 4:
        ptrs = base + rows[:, None] * stride_t + (partner // 2)[None, :] * stride_c
        byte = tl.load(ptrs, mask=ok, other=0).to(tl.int32)
        nib = (byte >> ((partner % 2) * 4)[None, :]) & 15
        vals = ((nib ^ 8) - 8).to(tl.float32)
    else:
        ptrs = base + rows[:, None] * stride_t + partner[None, :] * stride_c
        vals = tl.load(ptrs, mask=ok, other=0).to(tl.float32)
    return vals * sign[None, :]
