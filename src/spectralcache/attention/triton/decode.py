"""Fused decode attention over a compressed layer: host side (checks, split plan, two launches).

``decode_attention(query, state, attention_mask, scaling, softcap)`` computes exactly what
:func:`spectralcache.attention.reference.spectral_attention` computes, for a small query
(decode, or a few speculative tokens: ``groups * q_len <= MAX_ROWS``), reading the cold tier's
int8 / packed-int4 coefficients directly (no float copy in memory) with the flash-decoding
plan of ``decode_splits`` (one program per KV head and range of blocks, plus programs for the
exact tiers) and the log-sum-exp reduction of ``combine_splits``.

It runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter; that is how CI tests it). Everything it does not support raises a ValueError
naming the problem; the torch reference is the fallback for those cases
(:func:`spectralcache.attention.interface.attend` chooses).
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable

import torch
import triton.language as tl

from spectralcache.attention.triton.combine_splits import combine_splits_kernel
from spectralcache.attention.triton.decode_splits import SIZE_FIELDS, spectral_decode_split_kernel
from spectralcache.attention.triton.dispatch import MAX_ROWS
from spectralcache.attention.triton.launch import FastLauncher
from spectralcache.cache.state import ColdBlocks, SpectralLayerState

__all__ = [
    "MAX_ROWS",
    "SIZE_FIELDS",
    "KernelDoesNotFit",
    "decode_attention",
    "decode_sizes",
    "interpreter_enabled",
]

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# fixed when the kernels are decorated (this import): triton.jit reads TRITON_INTERPRET then
_INTERPRET = interpreter_enabled()
if _INTERPRET:
    from spectralcache.attention.triton import _interpreter_compat

    _interpreter_compat.apply()


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int, floor: int = 16) -> int:
    # plain Python: triton.next_power_of_2 goes through Triton's constexpr machinery (~8 us a call)
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


@functools.lru_cache(maxsize=8)
def _dummies(device: torch.device) -> dict[torch.dtype, torch.Tensor]:
    """One-element stand-ins for absent tensors (the kernel never reads them: flags say so)."""
    return {dt: torch.zeros(1, dtype=dt, device=device) for dt in (torch.int64, torch.int8, torch.float16)}


def _t(x: torch.Tensor | None, ndim: int, dummy: torch.Tensor, device: torch.device) -> tuple:
    """(tensor, strides...) for a kernel argument; an absent or empty tensor becomes ``dummy``."""
    if x is None or x.numel() == 0:
        return (dummy, *([0] * ndim))
    if x.dim() != ndim:
        raise ValueError(f"expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"a state tensor of shape {tuple(x.shape)} is on {x.device}, the query on {device}")
    return (x, *x.stride())


def _resolve_inv_freq(state: SpectralLayerState, device: torch.device) -> torch.Tensor:
    """The RoPE inverse frequencies pre-RoPE blocks are re-rotated with (``state.rope_inv_freq``)."""
    inv_freq = getattr(state, "rope_inv_freq", None)
    if inv_freq is None:
        raise ValueError(
            "pre_rope cold blocks need state.rope_inv_freq (the model's RoPE inverse frequencies) "
            "for the Triton kernel"
        )
    if inv_freq.device != device or inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
        inv_freq = inv_freq.to(device=device, dtype=torch.float32).contiguous()
    return inv_freq


def _check(query: torch.Tensor, state: SpectralLayerState) -> tuple[int, int, int, int, int]:
    bsz, n_q, q_len, head_dim, n_kv = state.check_query(query)
    if query.dtype not in _TL_DTYPES:
        raise TypeError(f"query must be float32, float16 or bfloat16, got {query.dtype}")
    if (n_q // n_kv) * q_len > MAX_ROWS:
        raise ValueError(
            f"decode_attention handles groups*q_len <= {MAX_ROWS} query rows per KV head, got "
            f"{n_q // n_kv}*{q_len}; use the torch reference (spectral_attention) for prefill"
        )
    if not query.is_cuda and not _INTERPRET:
        raise ValueError("decode_attention needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return bsz, n_q, q_len, head_dim, n_kv


def _coeff_width(bits: int, rank: int) -> int:
    if bits not in (4, 8, 16):
        raise ValueError(f"coefficient bits must be 4, 8 or 16, got {bits}")
    return (rank + 1) // 2 if bits == 4 else rank


# Constexprs and options are built once per distinct launch shape (lru_cache; callers never
# mutate the returned dicts): ~8 power-of-two roundings and two dicts less per decode call.
@functools.lru_cache(maxsize=512)
def _split_constexprs(
    groups: int, rows: int, head_dim: int, t: int, block_t: int, rk: int, rv: int, n_out: int, block_e: int,
    kbits: int, vbits: int, key_identity: bool, value_identity: bool, pre_rope: bool, rot_half: int,
    has_mask: bool, mask_bool: bool, has_softcap: bool, has_chunk: bool, f32: bool, sizes_on_device: bool,
    block_stages: int, out_split: bool, dequant_asm: bool, min_rows: int, kc_t: int, vc_t: int,
    key_channel: bool = False, int4_bytes: int = 0, int4_pad: bool = False, key_offsets: bool = False,
    block_parts: int = 1, split_k: bool = False, split_v: bool = False, int4_asm: int = 0,
    defer_den: bool = False, flat: int = 0, key_raw: bool = False, out_cols: bool = False,
    pdl: int = 0, t_v: int = 0, vs_pad: bool = False, out_flag: bool = False, tile_t: bool = False,
) -> dict:  # fmt: skip
    # an identity side's coefficient tile meets head_dim-wide tiles (the query, the accumulator): it
    # keeps D_P columns (int4_pad at head_dim 16 made it 32 wide, and the dots refused to compile)
    rk_p = _int4_width(rk, kbits, int4_bytes, int4_pad and not key_identity)
    rv_p = _int4_width(rv, vbits, int4_bytes, int4_pad and not value_identity)
    return dict(
        G=groups, R=rows, R_P=_next_pow2(rows, min_rows), D=head_dim, D_P=_next_pow2(head_dim), T=t, BLOCK_T=block_t,
        RK=rk, RK_P=rk_p, RV=rv, RV_P=rv_p,
        N_OUT=n_out, N_OUT_P=_next_pow2(n_out),
        OUT_WORDS=_next_pow2(-(-t // 32), 1),
        BLOCK_E=block_e, KEY_BITS=kbits, VALUE_BITS=vbits,
        KEY_IDENTITY=key_identity, VALUE_IDENTITY=value_identity, PRE_ROPE=pre_rope, ROT_HALF=rot_half,
        HAS_MASK=has_mask, MASK_BOOL=mask_bool, HAS_SOFTCAP=has_softcap, HAS_CHUNK=has_chunk,
        F32=f32, SIZES_ON_DEVICE=sizes_on_device, BLOCK_STAGES=block_stages,
        OUT_SPLIT=out_split, DQ_ASM=dequant_asm, KC_T=kc_t, VC_T=vc_t, KEY_CHANNEL=key_channel,
        INT4_BYTES_K=kbits == 4 and 0 < int4_bytes <= rk_p, INT4_BYTES_V=vbits == 4 and 0 < int4_bytes <= rv_p,
        KEY_OFFSETS=key_offsets, BLOCK_PARTS=block_parts, PART_T=_part_tokens(t, block_t, block_parts),
        SPLIT_K=split_k, SPLIT_V=split_v, I4_ASM=int4_asm if 4 in (kbits, vbits) else 0, DEFER_DEN=defer_den,
        FLAT=flat, FLAT_TILES=-(-t // block_t), KEY_RAW=key_raw, OUT_COLS=out_cols,
        # timing-only ablations of the tile work (decode_splits._cold_tile): never on here
        ABLATE=0,
        PDL=pdl,
        T_V=t_v,
        VS_PAD=vs_pad,
        OUT_FLAG=out_flag,
        TILE_T=tile_t,
    )  # fmt: skip


def _part_tokens(t: int, block_t: int, block_parts: int) -> int:
    """Tokens of a block part: whole ``block_t`` tiles, the block's tiles shared out as evenly as
    powers of two allow (the last part may hold fewer tokens, or none); ``t`` without parts."""
    if block_parts <= 1:
        return t
    tiles = -(-t // block_t)
    return -(-tiles // block_parts) * block_t


def _max_block_parts(t: int, block_t: int, min_tiles: int) -> int:
    """The most parts (a power of two) a ``t``-token block splits into with at least ``min_tiles``
    ``block_t`` tiles each (at least 1)."""
    tiles = -(-t // block_t)
    parts = 1
    while tiles // (2 * parts) >= max(1, min_tiles):
        parts *= 2
    return parts


# the automatic plan splits blocks while the programs per (batch row, KV head) stay within this
# factor of the wanted count (programs_per_sm slots per SM shared out over the (b, h) pairs)
_PARTS_PROGRAM_SLACK = 1.25


def _auto_block_parts(
    want_splits: int, max_parts: int, programs: Callable[[int], int], block_tiles: int | None = None
) -> int:
    """Block parts for the automatic plan: the largest power of two ``P <= max_parts`` whose plan
    keeps ``programs(P)`` (cold + outlier + exact programs per (batch row, KV head)) within
    ``_PARTS_PROGRAM_SLACK`` of ``want_splits``; 1 if none does. Except: where that P cuts the
    block's ``block_tiles`` tiles into one-tile parts and its programs overflow ``want_splits``
    while ``P / 2``'s fit, ``P / 2`` (the overflow would be a second wave of programs as long as the
    first; a two-tile program has its second tile's loads in flight with the first). H200, stop 23
    (``benchmarks/results/lead_stop23/scan1/``, a real cache's default preset, graph replays, L2
    cleared): 4K batch 1 (8 blocks of 501 tokens per KV head, 66 slots per head) -- 8 parts, 67
    programs: 0.0168 ms; 4 parts, 35: 0.0161 (blocks of 496: 0.0172 against 0.0154; SDPA 0.0160).

    Measured on the H100 (Llama-8B shape, bf16, graph replay; ``benchmarks/results/kernel_stop18/
    block_parts/``): at 4K batch 1 the per-channel layout's 7-8 blocks × 8 KV heads were a few dozen
    programs, each a chain of 8 dependent 64-token tiles -- 4 parts: 0.0112 vs 0.0204 ms; at 16K 2
    parts (75 programs for 66 wanted) 0.0231 vs 0.0301; where the grid already fills the card more
    programs only add partials (32K: 2 parts 0.0427 vs 0.0392 ms; 4K batch 8: 0.0424 vs 0.0402)."""
    parts = max(1, max_parts)
    while parts > 1 and programs(parts) > _PARTS_PROGRAM_SLACK * want_splits:
        parts //= 2
    one_tile = block_tiles is not None and -(-block_tiles // parts) == 1
    if parts > 1 and one_tile and programs(parts) > want_splits >= programs(parts // 2):
        parts //= 2
    return parts


def _int4_width(rank: int, bits: int, int4_bytes: int, int4_pad: bool) -> int:
    """Padded columns of a coefficient tile: the next power of two (at least 16); with ``int4_pad``,
    packed int4 tiles narrower than ``int4_bytes`` are zero-padded up to it so that they too are read
    byte-once (masked loads: no extra bytes, a little more on-chip math)."""
    width = _next_pow2(rank)
    return max(width, int4_bytes) if bits == 4 and int4_bytes > 0 and int4_pad else width


@functools.lru_cache(maxsize=512)
def _combine_constexprs(
    groups: int, rows: int, head_dim: int, block_s: int, pdl: bool = False, d_block: int = 0
) -> dict:
    return dict(
        G=groups, R=rows, D=head_dim, D_P=_next_pow2(head_dim), BLOCK_S=block_s, PDL=pdl, D_BLOCK=d_block
    )


# the combine kernel's automatic plan (:func:`_combine_plan`): output columns per program, partials per round
_COMBINE_BLOCK_D = 64
_COMBINE_BLOCK_S = 128


@functools.lru_cache(maxsize=256)
def _combine_plan(
    n_splits: int, head_dim: int, combine_block_d: int | None, combine_block_s: int | None
) -> tuple[int, int]:
    """``(D_BLOCK, BLOCK_S)`` of the combine kernel: the caller's, or the automatic choice. ``D_BLOCK``
    0 = one program per output row; else a power of two >= 16 (0 when it covers the padded head_dim).

    Automatic: 64 columns per program (two programs per row at head_dim 128, four at 256) and up to
    :data:`_COMBINE_BLOCK_S` partials per load round. H200 stop 24 (``benchmarks/decode_breakdown_gpu.py``,
    default preset, the cache's own state, torch.profiler over graph replays with the L2 cleared): the
    combine kernel took 2.53 us against 3.71 (whole rows, 64 partials a round) at 128K batch 1 -- the step
    0.0710 against 0.0724 ms --, 2.34 against 3.46 at 32K batch 1, 2.21 against 2.37 at 4K, 3.30 against
    3.87 at 128K batch 8; 32 columns 2.54 / 2.32, 16 columns 2.66 / 2.40, whole rows with 128 partials a
    round 2.85 / 2.69 (``breakdown2/``)."""
    d_p = _next_pow2(head_dim)
    if combine_block_d is None:
        d_block = _COMBINE_BLOCK_D if d_p > _COMBINE_BLOCK_D else 0
    else:
        d_block = int(combine_block_d)
        if d_block and (d_block < 16 or d_block & (d_block - 1)):
            raise ValueError(f"combine_block_d must be 0 or a power of two >= 16, got {combine_block_d}")
        d_block = 0 if d_block >= d_p else d_block
    if combine_block_s is None:
        block_s = min(_COMBINE_BLOCK_S, _next_pow2(n_splits, 2))
    else:
        block_s = int(combine_block_s)
        if block_s < 2 or block_s & (block_s - 1):
            raise ValueError(f"combine_block_s must be a power of two >= 2, got {combine_block_s}")
        block_s = min(block_s, _next_pow2(n_splits, 2))
    return d_block, block_s


@functools.lru_cache(maxsize=64)
def _options(num_warps: int, num_stages: int | None, maxnreg: int | None, pdl: bool = False) -> dict:
    options: dict = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    if pdl:
        options["launch_pdl"] = True
    return options


_COMBINE_OPTIONS = {"num_warps": 4}
_COMBINE_OPTIONS_PDL = {"num_warps": 4, "launch_pdl": True}


def _use_pdl(pdl: bool | int | None, device: torch.device) -> int:
    """Programmatic dependent launch (``launch_pdl``; Hopper and later, compiled CUDA only -- never in
    the interpreter, never on ROCm): 1 (True) both kernels launched as dependents of the previous launch,
    2 the combine kernel only (a dependent of our own split kernel: nothing outside the call is assumed);
    0 elsewhere or when turned off (False / 0). None: 2 -- H200 stop 24 (``benchmarks/decode_breakdown_gpu.py``,
    the cache's own state, graph replays with the L2 cleared, two runs, against off): default preset batch 1
    4K 0.0145 / 0.0148 ms against 0.0152-0.0157, 32K 0.0301 / 0.0315 against 0.0303-0.0317, 128K 0.0705 /
    0.0721 against 0.0709-0.0725, aggressive 128K 0.0510 / 0.0527 against 0.0513-0.0530; batch 8 128K
    0.4563 / 0.4732 against 0.4557-0.4702 (level within the runs' spread). Form 1 also makes the split
    kernel a dependent of whatever ran before it (in a model: not ours) and lost at 4K in stop 22."""
    form = 2 if pdl is None else 1 if pdl is True else int(pdl or 0)
    if form not in (0, 1, 2):
        raise ValueError(f"pdl must be None, a bool, 1 or 2, got {pdl!r}")
    if not form or _INTERPRET or device.type != "cuda" or torch.version.hip is not None:
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return form if _capability(index) >= 9 else 0


@functools.lru_cache(maxsize=8)
def _capability(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


class KernelDoesNotFit(ValueError):
    """The split kernel's tiles for this layout exceed the card's on-chip memory.

    Seen on an H100 with the ``lossless`` preset on Gemma 3 in float32 (rank = head_dim = 256,
    16-bit coefficients): a 256 x 256 float32 basis tile alone is 256 KiB, above the 227 KiB of
    shared memory a block may use. A ValueError, so ``dispatch.attend`` in ``auto`` mode falls
    back to the torch reference (warning once); a forced ``triton`` backend raises it.
    """


# Launch shapes whose compile ran out of on-chip resources: refused at once afterwards, instead
# of paying a failing compile on every decode step.
_DOES_NOT_FIT: set[tuple] = set()


def _launch_split(grid: tuple, args: list, constexprs: dict, options: dict, device: torch.device) -> None:
    if _DOES_NOT_FIT and _fit_key(constexprs, options, device) in _DOES_NOT_FIT:
        raise KernelDoesNotFit(_no_fit_message(constexprs))
    try:
        _SPLIT(grid, args, constexprs, options)
    except Exception as exc:
        # triton.runtime.errors.OutOfResources (matched by name: its module moved between releases)
        if type(exc).__name__ != "OutOfResources":
            raise
        _DOES_NOT_FIT.add(_fit_key(constexprs, options, device))
        raise KernelDoesNotFit(f"{_no_fit_message(constexprs)} ({exc})") from exc


def _fit_key(constexprs: dict, options: dict, device: torch.device) -> tuple:
    return (str(device), tuple(constexprs.values()), tuple(options.items()))


def _no_fit_message(constexprs: dict) -> str:
    return (
        "the Triton decode kernel does not fit this layout in on-chip memory (head_dim "
        f"{constexprs['D']}, ranks {constexprs['RK']}/{constexprs['RV']}, coefficient bits "
        f"{constexprs['KEY_BITS']}/{constexprs['VALUE_BITS']}, float32 {constexprs['F32']}); "
        "use attention_backend='torch' (or 'auto', which falls back to the torch reference)"
    )


_SPLIT = FastLauncher(spectral_decode_split_kernel)
_COMBINE = FastLauncher(combine_splits_kernel)
_COLD_FIELDS = ColdBlocks.tensor_fields()


# id(ColdBlocks view) -> (weakref to it, guard, its fields, (args, facts)); an entry dies with its view
_COLD_ARGS: dict[int, tuple] = {}


def _forget_cold(ref: weakref.ref, key: int) -> None:
    entry = _COLD_ARGS.get(key)
    if entry is not None and entry[0] is ref:
        del _COLD_ARGS[key]


def _cold_segment(cold: ColdBlocks, head_dim: int, device: torch.device, dummy: dict) -> tuple:
    """Kernel arguments and launch facts of a cold tier, cached per ``ColdBlocks`` object.

    Keyed by the object (held weakly) and checked against the identity of its tensor fields
    and its integer fields: a layer hands out the same view object while its cold buffers and
    block count stay (``SpectralLayer._cold_view``), so a decode step reuses ~50 arguments
    instead of re-deriving them. The entry holds the field tensors, so their ids cannot be
    reused while it lives; a field reassigned on the object misses the cache."""
    fields = tuple(getattr(cold, name) for name in _COLD_FIELDS)
    guard = (
        *map(id, fields),
        cold.block_size, cold.coeff_bits, cold.value_coeff_bits, cold.rank_keys, cold.rank_values,
        head_dim, device,
    )  # fmt: skip
    key = id(cold)
    cached = _COLD_ARGS.get(key)
    if cached is not None and cached[0]() is cold and cached[1] == guard:
        return cached[3]
    t = int(cold.block_size)
    rk, rv = int(cold.rank_keys), int(cold.rank_values)
    kbits, vbits = int(cold.coeff_bits), int(cold.value_bits)
    key_identity, value_identity = cold.key_basis is None, cold.value_basis is None
    key_channel = cold.key_scales_per_channel
    if key_channel and not key_identity:
        raise ValueError(
            "per-channel key scales need identity keys (key_basis None), as key_codec='channel' stores"
        )
    if key_channel and cold.key_scales.shape[-2] != 1:
        # key_group_size: the kernel folds one scale row per block into the query
        raise ValueError(
            f"the decode kernel reads one key scale row per block; these blocks hold "
            f"{cold.key_scales.shape[-2]} groups (SpectralConfig.key_group_size): the torch "
            "reference reads them (attention_backend 'auto' or 'torch')"
        )
    key_offsets = cold.key_offsets is not None
    if key_offsets:
        _check_key_offsets(cold, key_channel)
    for name, coeffs, bits, rank, ident in (
        ("key", cold.key_coeffs, kbits, rk, key_identity),
        ("value", cold.value_coeffs, vbits, rv, value_identity),
    ):
        if coeffs.shape[-1] != _coeff_width(bits, rank) or coeffs.shape[-2] != t:
            raise ValueError(
                f"cold {name}_coeffs shape {tuple(coeffs.shape)} does not fit block_size={t}, "
                f"rank={rank}, {bits}-bit coefficients"
            )
        if ident and rank != head_dim:
            raise ValueError(f"identity {name} codec needs rank == head_dim, got {rank} vs {head_dim}")
    starts = cold.block_starts
    if starts.device != device or starts.dtype != torch.int64:
        starts = starts.to(device=device, dtype=torch.int64)
    i8, f16, i64 = dummy[torch.int8], dummy[torch.float16], dummy[torch.int64]
    args = (
        starts,
        *_t(cold.key_coeffs, 5, i8, device),
        # per-row scales [.., nb, T, 1]: their row stride; per-channel [.., nb, 1, D]: the channel stride
        *_key_scale_args(cold.key_scales, key_channel, f16, device),
        # zero points [.., nb, 1, D] (key_zero_point): (tensor, b, h, n, channel strides)
        *_key_scale_args(cold.key_offsets, True, f16, device),
        *_t(cold.key_basis, 5, f16, device),
        *_t(cold.value_coeffs, 5, i8, device),
        *(_t(cold.value_scales, 5, f16, device)[:5]),
        *_t(cold.value_basis, 5, f16, device),
        *_t(cold.outlier_keys, 5, f16, device),
        *_t(cold.outlier_values, 5, f16, device),
        *_t(cold.outlier_index, 4, i64, device),
    )
    t_v = _value_tokens_padded(cold, t, vbits)
    facts = (
        cold.num_blocks,
        t,
        rk,
        rv,
        kbits,
        vbits,
        key_identity,
        value_identity,
        int(cold.outlier_index.shape[-1]),
        _row_stride(cold.key_coeffs),
        _row_stride(cold.value_coeffs),
        key_channel,
        key_offsets,
        t_v,
        _value_scales_padded(cold, t, t_v),
        _outlier_flags(cold, vbits),
    )
    segment = (args, facts)
    _COLD_ARGS[key] = (weakref.ref(cold, functools.partial(_forget_cold, key=key)), guard, fields, segment)
    return segment


def _tile_transposed(tile_transposed: bool | None, flat: int, key_raw: bool | None) -> bool:
    """TILE_T (``decode_splits._cold_tile_t``): the flat loop's tiles scored as ``sᵀ = K · qᵀ`` (tokens as
    the mma's M, the query rows as N) with the values as ``Vᵀ · pᵀ``. Only the flat nibble-split layout (the
    default preset's) has it, without ``key_raw``. None / False: off -- not yet timed on a GPU (stop 24: the
    interpreter says the same function; sm_90a SASS of a stripped tile loop, ``benchmarks/
    transposed_tile_sass.py``, 382 against 466 instructions a tile, half the HMMAs, 87 against 119
    registers); True where it does not apply: ValueError."""
    if not tile_transposed:
        return False
    if not flat or key_raw:
        raise ValueError(
            "tile_transposed needs the flat nibble-split tile loop (packed int4 identity keys and values, "
            "post-RoPE, outliers in programs of their own, whole blocks) and key_raw off"
        )
    return True


def _outlier_flags(cold: ColdBlocks, vbits: int) -> bool:
    """Whether the kernel may find a tile's outlier rows from its value scales (OUT_FLAG): the blocks say
    their per-row scales are -1 there (``ColdBlocks.value_scales_flag_outliers``, written by
    ``compress_blocks`` since stop 24), the values are quantized and the blocks have outliers."""
    return (
        bool(cold.value_scales_flag_outliers)
        and vbits != 16
        and cold.value_scales is not None
        and cold.value_scales.shape[-1] == 1
        and cold.outlier_index.shape[-1] > 0
    )


def _check_key_offsets(cold: ColdBlocks, key_channel: bool) -> None:
    """Key zero points as ``ColdBlocks`` documents them: floating ``[B, H, nb, 1, D]``, beside
    per-channel key scales of the same shape (``key_codec="channel"`` with 4- or 8-bit keys)."""
    offsets = cold.key_offsets
    if not key_channel or int(cold.coeff_bits) not in (4, 8):
        raise ValueError(
            "key_offsets (key zero points) need per-channel key scales with 4- or 8-bit keys "
            f"(key_codec='channel'); got {int(cold.coeff_bits)}-bit keys, per-channel scales {key_channel}"
        )
    if not offsets.is_floating_point() or offsets.shape != cold.key_scales.shape:
        raise ValueError(
            f"key_offsets must be floating [B, H, nb, 1, D] like the key scales {tuple(cold.key_scales.shape)}, "
            f"got {offsets.dtype} {tuple(offsets.shape)}"
        )


def _key_scale_args(
    scales: torch.Tensor | None, per_channel: bool, dummy: torch.Tensor, device: torch.device
) -> tuple:
    """(tensor, stride_b, stride_h, stride_n, stride_x) of the key scales: ``x`` is the row for
    per-row scales and the channel for per-channel ones (the kernel reads one or the other)."""
    full = _t(scales, 5, dummy, device)
    return (*full[:4], full[5]) if per_channel else full[:5]


def _int4_asm_form(int4_asm: bool | int | None) -> int:
    """PTX widening of packed int4 (``decode_splits`` I4_ASM): 0 off, 1 the stop-19 form (two byte
    permutes, four logic ops, two shifts, four float16x2 subtractions per four bytes), 2 the paired form
    (one permute, one shift, four logic ops, two subtractions, two float16x2 FMAs). None / True: the
    automatic form (2; never on ROCm), False / 0: off; 1 / 2 as given."""
    if int4_asm is None or int4_asm is True:
        return 2 if _use_asm(None) else 0
    form = int(int4_asm)
    if form not in (0, 1, 2):
        raise ValueError(f"int4_asm must be None, a bool, 1 or 2, got {int4_asm!r}")
    return form


def _use_asm(dequant_asm: bool | None) -> bool:
    """Inline-PTX widening of int8 coefficients: on unless switched off; by default never on
    ROCm (no PTX there). Packed int4 is widened by tensor ops (``int4_bytes``, decode_splits)."""
    return (torch.version.hip is None) if dequant_asm is None else bool(dequant_asm)


def _nibble_split(
    nibble_split: bool | str | None, kbits: int, vbits: int, key_identity: bool, value_identity: bool, pre_rope: bool,
    head_dim: int,
) -> tuple[bool, bool]:  # fmt: skip
    """(keys, values) read nibble-split: packed int4 identity rows whose low / high nibbles meet the
    even / odd columns of the query (post-RoPE keys) or of the output (values) in separate dots, with
    no interleave inside the tile loop (``decode_splits._load_int4_halves``). On unless
    ``nibble_split`` is False; needs at least 32 padded columns (each half a 16-wide dot operand)."""
    if nibble_split is not None and not nibble_split:
        return False, False
    wide = _next_pow2(head_dim) >= 32
    return (
        wide and kbits == 4 and key_identity and not pre_rope,
        wide and vbits == 4 and value_identity and nibble_split != "keys",
    )


def _flat_tiles(
    flat_tiles: int | None, split_k: bool, split_v: bool, pre_rope: bool, out_split: bool, n_out: int,
    block_parts: int, block_stages: int,
) -> int:  # fmt: skip
    """One pipelined loop over a program's tiles across its blocks (``decode_splits`` FLAT) for
    nibble-split identity keys and values (post-RoPE), outliers in programs of their own (or none),
    whole blocks, a run-time tile loop: 0 (off), 1 (a block's setup data read at its first tile), 2
    (read at every tile, so that it is prefetched with the tiles) or 3 (read one block ahead: at the
    previous block's first tile, so that its latency hides behind that block's tiles; stop 21). ``flat_tiles`` None: 1 where it
    applies, False / 0: off.

    H200 (``benchmarks/results/kernel_stop19/``, default layout, 512-token blocks, graph replay): 128K
    batch 8 0.7133 ms with 1, 0.8222 without, 0.8268 with 2; batch 1 0.0858 / 0.0855 / 0.0948 ms; 32K
    batch 1 0.0283 / 0.0275 / 0.0309. Reading the setup data at every tile costs more than its latency."""
    if flat_tiles is not None and not flat_tiles:
        return 0
    applies = split_k and split_v and not pre_rope and (out_split or n_out == 0) and block_parts == 1
    if not applies or block_stages:
        return 0
    return 1 if flat_tiles is None or flat_tiles is True else int(flat_tiles)


def _auto_block_stages(t: int, block_t: int) -> int:
    """``block_stages`` of the automatic plan: 2 (a block's tiles unrolled, the block loop pipelined
    two stages deep) for layouts whose blocks hold at most two tiles, else 0 (a run-time tile loop);
    since stop 20 whether the layout reads nibble-split rows no longer matters.

    H200 stop 20 (``benchmarks/results/kernel_stop20/scan/``, low-rank layouts, 512-token blocks in
    256-token tiles, graph replay): ``lowrank`` 128K batch 1 0.0745 ms with 2 against 0.0839 without,
    batch 8 0.4956 / 0.6155, 32K batch 1 0.0296 / 0.0296; ``aggressive`` (with ``int4_row_stride``, which
    the automatic plan turns on for these layouts) 0.0510 / 0.0556 at 128K batch 1, 0.3878 / 0.4479 at
    batch 8.

    H200 (``benchmarks/results/kernel_stop19/``, default codecs in 128-token blocks with 2 outliers,
    64-token tiles, graph replay, batch 1): 128K 0.0989 ms with 2 against 0.1081 (run-time tile loop,
    flat) and 0.1041 (flat, setup at each block's first tile); 32K 0.0314 / 0.0331 / 0.0320; 4K 0.0107 /
    0.0112. With 512-token blocks (8 tiles unrolled) it is far slower: 128K 0.1855 against 0.0948 ms."""
    return 2 if -(-t // block_t) <= 2 else 0


def _auto_programs_per_sm(
    programs_per_sm: int | None, block_stages: int, nibble_split: bool, int4: bool, n_bh: int, sms: int
) -> int:
    """Resident programs per SM the cold tier is planned for: the caller's, else 4 -- or, for packed int4
    low-rank layouts (read without the nibble split) under the pipelined block loop, 8 when 4 per SM
    would leave at most 8 programs per (batch row, KV head) (the aggressive preset at batch 8) and 3 when
    they would give it at least 64 (batch 1 at 8 KV heads on 132 SMs; ``decode_attention`` then lifts
    its automatic register cap from 128 to ``_MAXNREG_3_PER_SM``: a longer per-program chain without
    spills).

    H200 stop 23 (``benchmarks/results/lead_stop23/final3/``, the aggressive preset through a real cache,
    graph replays with the L2 cleared, same process), batch 1, 3 per SM with 168 registers against 4 with
    128: 4K 0.0129 / 0.0136 ms, 16K 0.0177 / 0.0203, 32K 0.0234 / 0.0268, 64K 0.0330 / 0.0362, 128K
    0.0523 / 0.0536 (scan1 / final1: 0.0528 / 0.0538, 0.0526 / 0.0538); the default layout lost with it
    (128K 0.0803 / 0.0730). The kernel engineer's stop 22 (dev script): batch 8 lost (0.3498 against 0.2950
    with 8 per SM), so it applies where 4 per SM give a pair >= 64 programs only.

    H200 stop 21 (``benchmarks/results/kernel_stop21/``, aggressive, graph replay, same process): 128K
    batch 8 0.2953 ms with 8 against 0.3183 (3.25x against 3.01x SDPA), 32K batch 8 0.0867 / 0.0894;
    batch 1 (66 programs per KV head at 4) 0.0512 against 0.0493 -- so 4 there; the default layout
    (nibble split) at batch 8 lost with 8 (128K 0.5335 against 0.5206, 32K 0.1403 / 0.1384)."""
    if programs_per_sm is not None:
        return int(programs_per_sm)
    per_pair = (4 * sms) // max(1, n_bh)
    if block_stages and int4 and not nibble_split:
        if per_pair <= 8:
            return 8
        if per_pair >= 64:
            return 3
    return 4


# the automatic register cap where the plan holds 3 programs per SM (``_auto_programs_per_sm``): 168 x
# 128 threads x 3 programs fit the 64K registers of an SM
_MAXNREG_3_PER_SM = 168


def _value_tokens_padded(cold: ColdBlocks, t: int, vbits: int) -> int:
    """The value tile's token mask bound (``decode_splits._cold_tile``'s T_V): ``t`` rounded up to 16
    where the value coefficient rows are tokens-contiguous integers whose rows hold that many bytes
    (``cache/layer.py`` pads them since stop 22), else 0 (the mask is ``t < T``).

    Why: the mask of a tokens-contiguous tile is constant over as many tokens as ``T`` is divisible by;
    with a compressed tail's block length (``compress_tail``, the default preset: 511 at 128K) that is
    one, and the loads became single bytes. H200 (``benchmarks/results/lead_stop22/``): the default
    preset through ``spectralcache bench attention`` (a real cache, T' = 511) took 0.126-0.138 ms at
    128K batch 1 against 0.066 for 512-token blocks. Reading the padding is safe: each row's stride
    covers it, integers are finite, and those tokens meet ``p · scale`` = 0."""
    tv = -(-t // 16) * 16
    vc = cold.value_coeffs
    if tv == t or vbits not in (4, 8) or vc.shape[-2] != t or vc.stride(-2) != 1:
        return 0
    if vc.stride(-1) < tv or vc.stride(-1) % 16:
        return 0
    return tv


def _value_scales_padded(cold: ColdBlocks, t: int, t_v: int) -> bool:
    """Whether the kernel may load a tile's value scales with the value tile's mask (``t < T_V``,
    ``T_V`` from :func:`_value_tokens_padded`) -- ``decode_splits._cold_tile``'s VS_PAD: the per-token
    scales ``[.., nb, T, 1]`` are dense along the tokens and each block's row holds at least ``T_V``
    entries, 16-aligned (``cache/layer.py`` pads them so since stop 23, ``padded_token_rows``). The
    padding is read but multiplied by nothing: the kernel zeroes the scales past ``T`` in registers.

    Why: with the mask ``t < T`` over a block length like 506 the scales were loaded two bytes at a time,
    outside the software pipeline (sm_90a SASS: ``LDG.E.U16`` in the tile loop, no ``cp.async``); the
    16-token mask and aligned block starts let them be copied a tile ahead like the 512-token blocks'."""
    vs = cold.value_scales
    if not t_v or vs is None or vs.dim() != 5 or vs.shape[-2] != t or vs.shape[-1] != 1:
        return False
    return vs.stride(-2) == 1 and vs.stride(-3) >= t_v and vs.stride(-3) % 16 == 0


def _auto_num_stages(
    num_stages: int | None, flat: int, tiles_per_program: int, value_tokens_contiguous: bool = False
) -> int | None:
    """Software-pipelining depth of the launch: the caller's, or for the flat tile loop (the default
    preset's layout) 2 when a cold program reads at most 32 tiles, else Triton's default (3). Value bytes
    stored tokens-contiguous (the default preset's values since stop 21, ``cache/layer.py``): 2 only up
    to 8 tiles.

    H200 stop 21 (``benchmarks/results/kernel_stop21/final/``, graph replay, same process, one run): the
    tokens-contiguous layout at 128K batch 1 (32 tiles) 0.0667 ms with 3 against 0.0738-0.0739 with 2
    (the row-major layout there: 0.0751 against 0.0744-0.0745); the lead's call with the cache storing it
    (``kernel_stop21/lead_final/``): 0.0670-0.0675 with 3 against 0.0738 with 2; not measured at 8 tiles
    or fewer.

    H200 stop 20 (``benchmarks/results/kernel_stop20/scan/``, default layout, graph replay): batch 1 --
    4K (one tile per program) 0.0100 ms with 2 against 0.0107, 32K (8 tiles) 0.0249 / 0.0258, 128K (32
    tiles) 0.0787 / 0.0796; batch 8 -- 32K (64 tiles) 0.1937 / 0.1758, 128K (256 tiles) 0.7181 / 0.6358:
    a long loop keeps the deeper pipeline's loads in flight, a short one pays its prologue."""
    if num_stages is not None or not flat:
        return num_stages
    return 2 if tiles_per_program <= (8 if value_tokens_contiguous else 32) else None


# rows per outlier / exact program of the automatic plan where the programs overflow the resident slots
_SHORT_ROWS = 128


def _auto_short_rows(
    want_splits: int, block_e: int, plan: tuple[int, int, int, int, int], int4: bool = True
) -> int | None:
    """``short_rows`` of the automatic plan: 128 for packed int4 layouts (the default and aggressive
    presets') where the cold tier is planned for at least 32 programs per (batch row, KV head) (few pairs:
    batch 1-4 at the Llama-8B shape), the plan's programs overflow them (the outlier and exact programs then
    run as a second wave, after the first cold programs end) and an outlier or exact program holds more than
    128 rows; else None (the plan's own rows).

    H200 stop 22 (``benchmarks/results/kernel_stop22/``, graph replay, same process): aggressive 128K
    batch 1 (64 cold + 16 outlier + 3 exact programs per pair against 66 wanted) 0.0473 / 0.0474 ms with
    128 rows (101 programs) against 0.0492 / 0.0491 (two calls; 64 rows: 0.0492); the default layout there
    0.0663 / 0.0662 against 0.0669 / 0.0671; 32K batch 1 level (0.0189 / 0.0188-0.0190, 0.0225 / 0.0225);
    at batch 8 (8-16 wanted: not applied) 128 rows measured level for aggressive and slower for the default
    layout (0.4843 against 0.4680). The int8 ``lowrank`` layout was not timed side by side: its 128K batch-1
    time with 128 rows (0.0764 ms, the final call's table) was above stop 21's without (0.0735, another
    call), so it keeps its rows."""
    n_cold, exact_per, out_per, n_out_splits, n_exact = plan
    if (
        not int4
        or want_splits < 32
        or n_cold + n_out_splits + n_exact <= want_splits
        or _SHORT_ROWS % block_e
    ):
        return None
    return (
        _SHORT_ROWS
        if max(out_per if n_out_splits else 0, exact_per if n_exact else 0) > _SHORT_ROWS
        else None
    )


def _auto_row_stride(int4_row_stride: bool | None, split_k: bool, split_v: bool) -> bool:
    """Packed int4 row strides compiled in (``int4_row_stride``): the caller's choice, or on for layouts
    read without the nibble split (the low-rank int4 presets: Triton then loads their 8- / 16-byte rows
    with vector copies into shared memory, not byte by byte from global memory). H200 stop 20,
    ``aggressive`` at 128K batch 1: 0.0534 ms against 0.0556 (block loop unpipelined), 0.0510 against
    0.0575 (``block_stages`` 2); batch 8 0.4205 / 0.4479 and 0.3878 / 0.4380."""
    if int4_row_stride is not None:
        return bool(int4_row_stride)
    return not (split_k or split_v)


def _key_raw(key_raw: bool | None, split_k: bool, key_channel: bool, f32: bool) -> bool:
    """Raw key nibbles (``decode_splits`` KEY_RAW): nibble-split per-channel keys widened to the
    float16 ``1032 + n`` without the per-element subtraction, the offset ``1032·Σ(query half)`` removed
    once per block with the zero-point term -- 31 fewer SASS instructions per 64-token tile and thread
    (sm_90a, default layout). Never in float32 mode: the dot then sums terms ~1032x larger than the
    score in float32 (about 2e-5 relative to it), outside that mode's 1e-5 contract. True: on where it
    applies; None / False: off -- on the H200 (stop 20, same run, graph replay) it was not faster:
    128K batch 1 0.0800 ms with it against 0.0778 without, batch 8 0.5583-0.5624 against 0.5612, and
    the bfloat16 output moved by 6e-4 (relative norm) against the exact path."""
    if not key_raw:
        return False
    return split_k and key_channel and not f32


def _outlier_cols(
    outlier_cols: bool | None, flat: int, n_out: int, t: int, block_t: int, tiles_per_program: int
) -> bool:
    """The block's outlier mask as one int32 per tile column (``decode_splits`` OUT_COLS: bit k of
    column c <=> token ``k·block_t + c``), so a tile tests its tokens with one shift instead of gathering
    its two mask words through shared memory (a store, a barrier and a load per tile; sm_90a: 7 -> 5
    barriers a tile). Applies to the flat tile loop (the default preset's layout) with outliers and at
    most 31 tiles a block. None: on where it applies and a cold program reads at least 32 tiles (the
    deep-pipeline cells and 128K batch 1), True: on where it applies, False: off. Where the blocks flag
    their outlier rows in the value scales (OUT_FLAG, :func:`_outlier_flags`, stop 24) the tiles mask from
    those and no bit mask is built.

    H200 stop 21 (``benchmarks/results/kernel_stop21/``, default layout, paired int4 widening, graph
    replay, same process): 128K batch 8 (256 tiles a program) 0.5206-0.5219 ms with it against 0.5392,
    32K batch 8 (64 tiles) 0.1384-0.1389 / 0.1403; batch 1 (<= 32 tiles, 2 pipeline stages) no gain --
    128K 0.0762-0.0763 against 0.0745, 32K 0.0236-0.0239 / 0.0237. H200 stop 23, the cache's own state
    (tokens-contiguous value rows, ``benchmarks/results/lead_stop23/knobs*/``, graph replays, L2 cleared):
    128K batch 1 (32 tiles a program) 0.0718 / 0.0715 ms with it against 0.0731 / 0.0730 in two runs, 32K
    batch 1 (8 tiles) level (0.0311 / 0.0313 against 0.0311 / 0.0314)."""
    if outlier_cols is not None and not outlier_cols:
        return False
    if not (bool(flat) and n_out > 0 and -(-t // block_t) <= 31):
        return False
    return outlier_cols is not None or tiles_per_program >= 32


def _row_stride(coeffs: torch.Tensor) -> int:
    """A coefficient tensor's row stride when its rows are contiguous (compiled in as a constant:
    Triton then knows the alignment of every row), else 0 (read at run time). Packed int4 (uint8)
    rows use it only with the ``int4_row_stride`` launch option (:func:`_auto_row_stride`; stop 16's H100
    runs found it right but no faster there; the ed66d10 int4 error was the byte-once unpacking of
    16-column tiles)."""
    return int(coeffs.stride(-2)) if coeffs.stride(-1) == 1 else 0


def _split_plan(
    plan_blocks: int, plan_exact: int, blocks_per_split: int, *, t: int, block_e: int, n_out: int,
    out_split: bool, exact_spread: bool, want_splits: int, block_parts: int = 1, short_rows: int | None = None,
) -> tuple[int, int, int, int, int]:  # fmt: skip
    """Programs per (batch row, KV head) for ``blocks_per_split`` cold blocks per program, or with
    ``block_parts`` P > 1 one part of a block per program (``blocks_per_split`` must then be 1):
    ``(n_cold_splits, exact_per_split, out_per_split, n_out_splits, n_exact_splits)``. ``short_rows``
    (a multiple of ``block_e``): at most that many rows per outlier and exact program (stop 22)."""
    if block_parts > 1:
        if blocks_per_split != 1:
            raise ValueError(f"block_parts={block_parts} needs blocks_per_split=1, got {blocks_per_split}")
        n_cold_splits = plan_blocks * block_parts
    else:
        n_cold_splits = -(-plan_blocks // blocks_per_split) if plan_blocks else 0
    # outlier rows of the cold blocks in programs of their own (outlier_split), about as many bytes
    # per program as a cold program's blocks hold (a cold block of T tokens ~ T/8 outlier rows)
    if out_split:
        out_per_split = max(block_e, -(-(blocks_per_split * t // 8) // block_e) * block_e)
        n_out_splits = -(-(plan_blocks * n_out) // out_per_split)
    else:
        out_per_split, n_out_splits = block_e, 0
    if exact_spread and plan_exact:
        # exact_spread: an exact program gets about a compressed block's bytes (T/8 exact rows of
        # 4·D bytes per block, like the outlier programs: T/2 made them the longest chains), and at
        # short contexts, where few cold programs leave most of the wanted programs free, the exact
        # tiers spread over those (4K: a 496-token hot window was 2 programs of 8 serial tiles)
        exact_per_split = max(block_e, -(-(blocks_per_split * t // 8) // block_e) * block_e)
        if want_splits:
            per_free = -(-plan_exact // max(1, want_splits - n_cold_splits - n_out_splits))
            exact_per_split = max(block_e, min(exact_per_split, -(-per_free // block_e) * block_e))
    else:
        # an exact token costs ~2*D*2 bytes, a cold block ~T*(rk+rv+...) bytes: give exact programs
        # about as many bytes as a cold program
        exact_per_split = max(block_e, -(-(blocks_per_split * t // 2) // block_e) * block_e)
    if short_rows:
        out_per_split = min(out_per_split, short_rows)
        n_out_splits = -(-(plan_blocks * n_out) // out_per_split) if out_split else 0
        exact_per_split = min(exact_per_split, short_rows)
    n_exact_splits = -(-plan_exact // exact_per_split) if plan_exact else (0 if n_cold_splits else 1)
    return n_cold_splits, exact_per_split, out_per_split, n_out_splits, n_exact_splits


def _resolve_block_parts(
    block_parts: int | None, min_tiles: int | None, auto_split: bool, blocks_per_split: int,
    plan_blocks: int, want_splits: int, t: int, block_t: int, programs: Callable[[int], int],
) -> int:  # fmt: skip
    """The launch's block parts: a caller's power of two clamped to the block's tiles (it then
    needs ``blocks_per_split`` 1 or automatic), or the automatic choice (:func:`_auto_block_parts`,
    only when the plan itself gave one block per program; ``programs(P)``: the plan's programs per
    (batch row, KV head) with P parts)."""
    min_tiles = 1 if min_tiles is None else int(min_tiles)
    if min_tiles < 1:
        raise ValueError(f"block_parts_min_tiles must be >= 1, got {min_tiles}")
    if block_parts is None:
        if not plan_blocks or not auto_split or blocks_per_split != 1:
            return 1
        return _auto_block_parts(
            want_splits, _max_block_parts(t, block_t, min_tiles), programs, -(-t // block_t)
        )
    parts = int(block_parts)
    if parts < 1 or parts & (parts - 1):
        raise ValueError(f"block_parts must be a power of two (1, 2, 4, 8, ...), got {block_parts!r}")
    if parts > 1 and not auto_split and blocks_per_split != 1:
        raise ValueError(f"block_parts={parts} reads one block per program: it needs blocks_per_split=1, "
                         f"got {blocks_per_split}")  # fmt: skip
    return min(parts, _max_block_parts(t, block_t, 1)) if plan_blocks else 1


def decode_sizes(state: SpectralLayerState, q_len: int, hot_lo: int = 0) -> list[int]:
    """The per-step sizes of ``state`` for a ``q_len``-token query, in ``SIZE_FIELDS`` order
    (what ``device_sizes`` holds).

    ``hot_lo``: rows between the hot-buffer pointer the launch was recorded with and the first
    live hot row of ``state`` (0 when they coincide)."""
    seq_len = int(state.seq_len)
    n_chunk = int(state.chunk_keys.shape[2]) if state.chunk_keys is not None else 0
    tier_end = int(state.chunk_start) if state.chunk_keys is not None else seq_len
    values = {
        "n_land": int(state.landmark_keys.shape[2]),
        "hot_start": int(state.hot_start),
        "n_hot": int(state.hot_keys.shape[2]),
        "chunk_start": int(state.chunk_start),
        "n_chunk": n_chunk,
        "q_first": seq_len - q_len,
        "seq_len": seq_len,
        "tier_end": tier_end,
        "n_blocks": state.cold.num_blocks if state.cold is not None else 0,
        "hot_lo": int(hot_lo),
    }
    return [values[name] for name in SIZE_FIELDS]


def decode_attention(
    query: torch.Tensor,
    state: SpectralLayerState,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    *,
    out: torch.Tensor | None = None,
    blocks_per_split: int | None = None,
    block_parts: int | None = None,
    block_parts_min_tiles: int | None = None,
    block_t: int | None = None,
    block_e: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    programs_per_sm: int | None = None,
    maxnreg: int | None = -1,
    block_stages: int | None = None,
    outlier_split: bool | None = None,
    dequant_asm: bool | None = None,
    int4_bytes: int = 32,
    int4_pad: bool = True,
    int4_row_stride: bool | None = None,
    nibble_split: bool | str | None = None,
    int4_asm: bool | int | None = None,
    defer_den: bool | None = None,
    flat_tiles: int | None = None,
    key_raw: bool | None = None,
    outlier_cols: bool | None = None,
    pdl: bool | None = None,
    short_rows: int | None = None,
    combine_block_d: int | None = None,
    combine_block_s: int | None = None,
    outlier_flags: bool | None = None,
    tile_transposed: bool | None = None,
    min_rows: int | None = None,
    exact_spread: bool = True,
    device_sizes: torch.Tensor | None = None,
    capacity_blocks: int | None = None,
    capacity_exact: int | None = None,
) -> torch.Tensor:
    """Attention of a small ``query`` [B, Hq, q, D] over a compressed layer -> [B, Hq, q, D].

    Same function as ``spectral_attention`` (same arguments, same masking by cache index, zeros
    for fully masked rows). ``out`` (optional, [B, Hq, q, D] in the query's dtype, any strides)
    receives the result; by default it is a view of a ``[B, q, Hq, D]`` buffer, so transformers'
    ``transpose(1, 2).contiguous()`` costs nothing. ``blocks_per_split`` / ``block_t`` /
    ``block_e`` / ``num_warps`` / ``num_stages`` / ``programs_per_sm`` / ``maxnreg`` (-1: by
    coefficient width, None: no cap) override the launch plan
    (tests and tuning; by default the cold tier is cut into about ``programs_per_sm`` programs per
    multiprocessor, rounded down per (batch row, KV head), enough independent loads in flight to cover
    memory latency; ``programs_per_sm`` None: :func:`_auto_programs_per_sm`; ``num_stages`` None:
    :func:`_auto_num_stages`). Kernel variants
    (defaults from the v6 H100 runs, docs/kernel_notes.md; every setting computes the same
    function): ``min_rows`` (query-tile rows at least this, rounded to a power of two; default 1,
    16 = the v5 padding), ``int4_bytes`` (packed int4 coefficient tiles of at least this many
    padded columns load each byte once and interleave its nibbles on chip; default 32; 0: one
    load per nibble everywhere -- Triton 3.6 compiled that interleave (join + reshape) wrongly on
    the H100 for 16-column int4 tiles (8-byte rows) and rightly from 32 columns up,
    docs/kernel_notes.md "Stop 16"), ``int4_pad`` (narrower int4 tiles zero-padded up to
    ``int4_bytes`` columns so they are read byte-once too; on since stop 17: three H100 runs
    0.0567-0.0571 / 0.0564 ms vs 0.0583-0.0589 at 128K batch 1 aggressive, same output) and ``int4_row_stride`` (packed int4 row strides compiled in; None: :func:`_auto_row_stride`),
    ``dequant_asm`` (inline-PTX widening of int8 coefficients on CUDA;
    default on; int4 has no PTX form), ``outlier_split`` (the blocks' exact outlier rows in programs of their own;
    default on), ``exact_spread`` (exact-tier programs of about a block's bytes, spread over free
    programs at short contexts; default on), ``block_stages`` (> 0: a block's tiles unrolled and
    the block loop software-pipelined that many stages deep; 0: a run-time tile loop; None: automatic,
    :func:`_auto_block_stages`), ``block_parts`` (a power of
    two P: each cold block read by P programs, part j = tokens ``[j·T/P, (j+1)·T/P)`` in whole tiles,
    one block per program; clamped to the block's tile count; 1: whole blocks; None: automatic -- P > 1
    only when the plan gives one block per program, then the largest P (each part at least
    ``block_parts_min_tiles`` tiles, default 1) whose programs stay within 1.25x of the wanted ones:
    :func:`_auto_block_parts`), ``nibble_split`` (packed int4 identity rows -- the default preset's
    channel keys and per-token values -- read as low / high nibble tiles that meet the query's /
    output's even / odd columns in separate dots, no interleave in the tile loop; None / True: on where
    it applies (:func:`_nibble_split`), "keys": keys only, False: off), ``int4_asm`` (packed int4
    widened by one PTX block per four bytes on CUDA; None: on except on ROCm, in the form
    :func:`_int4_asm_form` picks; 1 / 2 name a form) and ``defer_den`` (the
    softmax denominator kept per tile column and summed once per program; None: on), ``flat_tiles``
    (one pipelined tile loop across a program's blocks for those nibble-split layouts: 1 / 2 / 3 / 0,
    None: automatic, :func:`_flat_tiles`), ``key_raw`` (True: per-channel int4 key nibbles scored
    without the per-element offset subtraction, :func:`_key_raw`; None / False: off, as measured),
    ``outlier_cols`` (the flat loop's outlier mask kept per tile column, :func:`_outlier_cols`; None:
    automatic, False: off), ``pdl`` (True / 1: programmatic dependent launch of both kernels on Hopper, so a kernel's
    launch overlaps the previous one's tail; 2: the combine kernel only; ignored elsewhere; None: 2 since
    stop 24, :func:`_use_pdl`; False / 0: off) and
    ``short_rows`` (at most this many rows per outlier / exact program, a multiple of ``block_e``: where the
    plan has more programs than resident slots, the short programs run in a second wave, and their
    length is the step's tail; None: automatic, :func:`_auto_short_rows`; 0: the plan's own rows; stop 22),
    ``combine_block_d`` / ``combine_block_s`` (the combine kernel's output columns per program -- 0: a whole
    row, a power of two >= 16: that many -- and partials per load round; None: :func:`_combine_plan`),
    ``outlier_flags`` (the cold tiles find their outlier rows from the value scales where the blocks flag
    them, :func:`_outlier_flags`; None / True: on where it applies, False: the per-block bit mask),
    ``tile_transposed`` (the flat loop's tiles turned over, :func:`_tile_transposed`; None / False: off).

    CUDA-graph mode (``device_sizes``, an int32 tensor of ``len(SIZE_FIELDS)`` on the query's
    device, see :func:`decode_sizes` and :class:`spectralcache.attention.triton.graph.DecodeGraphSizes`):
    the kernel reads the per-step sizes from that tensor instead of ``state``'s, and the grid
    covers ``capacity_blocks`` cold blocks and ``capacity_exact`` exact tokens (defaults: this
    state's), so one launch -- or a captured graph of it -- serves every later state whose
    tensors sit at the same addresses (the hot window may start ``hot_lo`` rows later) and fit.
    """
    bsz, n_q, q_len, head_dim, n_kv = _check(query, state)
    device = query.device
    groups = n_q // n_kv
    rows = groups * q_len
    seq_len = int(state.seq_len)
    chunk_k = state.chunk_keys
    has_chunk = chunk_k is not None
    n_chunk = int(chunk_k.shape[2]) if has_chunk else 0
    chunk_start = int(state.chunk_start)
    if has_chunk and chunk_start + n_chunk != seq_len:
        raise ValueError(
            f"chunk covers cache indices {chunk_start}..{chunk_start + n_chunk - 1}"
            f" but the layer holds {seq_len} tokens"
        )
    tier_end = chunk_start if has_chunk else seq_len
    q_first = seq_len - q_len
    scale = head_dim**-0.5 if scaling is None else float(scaling)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    dummy = _dummies(device)
    f16 = dummy[torch.float16]

    # ---- mask
    if attention_mask is None:
        mask_args: tuple = (dummy[torch.int8], 0, 0, 0, 0.0)
        has_mask = mask_bool = False
    else:
        if attention_mask.dim() != 4:
            raise ValueError(
                f"attention_mask must be 4D [batch, 1, q_len, kv_len], got shape {tuple(attention_mask.shape)}"
            )
        mb, mh, mq, mk = attention_mask.shape
        if mb not in (1, bsz) or mh != 1 or mq != q_len:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not fit batch={bsz}, q_len={q_len}"
                " (expected [batch, 1, q_len, kv_len])"
            )
        if mk < seq_len:
            raise ValueError(
                f"attention_mask covers {mk} cache positions but the layer holds {seq_len} tokens"
            )
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, the query on {device}")
        if attention_mask.dtype == torch.bool:
            mask, floor, mask_bool = attention_mask.view(torch.uint8), 0.0, True
        elif attention_mask.is_floating_point():
            mask, floor, mask_bool = attention_mask, torch.finfo(attention_mask.dtype).min / 2, False
        else:
            raise TypeError(f"attention_mask must be bool or floating, got {attention_mask.dtype}")
        has_mask = True
        ms = mask.stride()
        mask_args = (mask, 0 if mb == 1 else ms[0], ms[2], ms[3], floor)

    # ---- cold tier
    cold = state.cold
    pre_rope = False
    rot_half = 1
    if cold is not None and cold.num_blocks:
        cold_args, facts = _cold_segment(cold, head_dim, device, dummy)
        (
            n_blocks, t, rk, rv, kbits, vbits, key_identity, value_identity, n_out, kc_t, vc_t, key_channel,
            key_offsets, t_v, vs_pad, out_flag,
        ) = facts  # fmt: skip
        if state.key_space == "pre_rope":
            pre_rope = True
            inv_freq = _resolve_inv_freq(state, device)
            rot_half = int(inv_freq.numel())
            if rot_half == 0 or 2 * rot_half > head_dim:
                raise ValueError(
                    f"rope_inv_freq with {rot_half} frequencies does not fit head_dim={head_dim}"
                )
        else:
            inv_freq = f16
    else:
        n_blocks, t, rk, rv, kbits, vbits, n_out, kc_t, vc_t = 0, 16, head_dim, head_dim, 8, 8, 0, 0, 0
        t_v, vs_pad, out_flag = 0, False, False
        key_identity = value_identity = True
        key_channel = key_offsets = False
        i8, i64 = dummy[torch.int8], dummy[torch.int64]
        cold_args = (i64, i8, 0, 0, 0, 0, 0, f16, 0, 0, 0, 0, f16, 0, 0, 0, 0, f16, 0, 0, 0, 0, 0,
                     i8, 0, 0, 0, 0, 0, f16, 0, 0, 0, 0, f16, 0, 0, 0, 0, 0,
                     f16, 0, 0, 0, 0, 0, f16, 0, 0, 0, 0, 0, i64, 0, 0, 0, 0)  # fmt: skip
        inv_freq = f16

    # ---- exact tiers
    n_land = int(state.landmark_keys.shape[2])
    n_hot = int(state.hot_keys.shape[2])

    # ---- launch plan
    # defaults from the variant scan on an H100 at 128K (docs/kernel_notes.md, v3): 256-token tiles,
    # 4 warps, 4 programs per SM; a 128-register cap helps the int4 kernel (0.102 -> 0.086 ms) and
    # hurts the int8 one (0.113 -> 0.193 ms)
    auto_block_t = block_t is None
    if block_t is None:
        # wide coefficient rows (identity / per-channel codecs: head_dim columns per side) in 64-token
        # tiles: at the Llama-8B shape with per-channel int4 keys + per-token int4 values (256 columns)
        # 64-token tiles took 0.1297 ms at 128K batch 1 against 0.2441 ms for 256-token ones, 32K 0.0384
        # vs 0.0716 (H100, results/kernel_stop17/channel_block_t/); the low-rank presets (64-96
        # columns) stay at 256, their measured best (docs/kernel_notes.md, v3 and stop 16 scans)
        wide = _next_pow2(rk) + _next_pow2(rv) > 128
        block_t = min(_next_pow2(t), 64 if wide else 256)
    auto_maxnreg = maxnreg == -1
    if maxnreg == -1:
        maxnreg = 128 if 4 in (kbits, vbits) else None
    block_e = 32 if block_e is None else block_e
    if short_rows is not None and (short_rows < 0 or short_rows % block_e):
        raise ValueError(f"short_rows must be 0 or a multiple of block_e={block_e}, got {short_rows}")
    split_k, split_v = _nibble_split(
        nibble_split, kbits, vbits, key_identity, value_identity, pre_rope, head_dim
    )
    auto_stages = block_stages is None
    if block_stages is None:
        block_stages = _auto_block_stages(t, block_t)
    n_bh = bsz * n_kv
    n_exact = n_land + n_hot + n_chunk
    plan_blocks, plan_exact = n_blocks, n_exact
    if device_sizes is not None:
        if device_sizes.dtype != torch.int32 or device_sizes.numel() != len(SIZE_FIELDS):
            raise ValueError(f"device_sizes must be int32 [{len(SIZE_FIELDS)}] ({', '.join(SIZE_FIELDS)})")
        if device_sizes.device != device:
            raise ValueError(f"device_sizes is on {device_sizes.device}, the query on {device}")
        plan_blocks = n_blocks if capacity_blocks is None else int(capacity_blocks)
        plan_exact = n_exact if capacity_exact is None else int(capacity_exact)
        if plan_blocks < n_blocks or plan_exact < n_exact:
            raise ValueError(
                f"capacity ({plan_blocks} blocks, {plan_exact} exact tokens) below this state's "
                f"({n_blocks}, {n_exact})"
            )
        if plan_blocks and not n_blocks:
            raise ValueError(
                "capacity_blocks > 0 needs a state with cold blocks (their buffers are recorded)"
            )
    want_splits = 0
    auto_split = blocks_per_split is None
    if blocks_per_split is None:
        if query.is_cuda:
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            per_sm = _auto_programs_per_sm(
                programs_per_sm, block_stages, split_k or split_v, 4 in (kbits, vbits), n_bh, sms
            )
            if auto_maxnreg and per_sm == 3 and maxnreg is not None:
                maxnreg = _MAXNREG_3_PER_SM
            slots = per_sm * sms
        else:
            slots = 2
        # as many cold programs per (batch row, KV head) as fit the resident slots, rounded down: at
        # batch 8 (64 pairs, 528 slots) rounding up gave 9 programs each -- 576, a second partial wave
        # -- and 8 measured 0.567 against 0.636 ms at 128K, 0.149 against 0.176 at 32K (H200 stop 20)
        want_splits = max(1, slots // n_bh)
        blocks_per_split = max(1, -(-plan_blocks // want_splits)) if plan_blocks else 1
    out_split = (outlier_split is None or bool(outlier_split)) and n_out > 0 and plan_blocks > 0

    def programs(parts: int) -> int:
        plan = _split_plan(
            plan_blocks, plan_exact, 1, t=t, block_e=block_e, n_out=n_out, out_split=out_split,
            exact_spread=exact_spread, want_splits=want_splits, block_parts=parts, short_rows=short_rows,
        )  # fmt: skip
        return plan[0] + plan[3] + plan[4]

    block_parts = _resolve_block_parts(
        block_parts, block_parts_min_tiles, auto_split, blocks_per_split, plan_blocks, want_splits, t, block_t,
        programs,
    )  # fmt: skip
    if block_parts > 1:
        blocks_per_split = 1
    if (
        short_rows is None and want_splits >= 32 and 4 in (kbits, vbits)
    ):  # cheap tests first: a plan call is ~1 us
        short_rows = _auto_short_rows(
            want_splits, block_e,
            _split_plan(
                plan_blocks, plan_exact, blocks_per_split, t=t, block_e=block_e, n_out=n_out, out_split=out_split,
                exact_spread=exact_spread, want_splits=want_splits, block_parts=block_parts,
            ),
            4 in (kbits, vbits),
        )  # fmt: skip
    n_cold_splits, exact_per_split, out_per_split, n_out_splits, n_exact_splits = _split_plan(
        plan_blocks, plan_exact, blocks_per_split, t=t, block_e=block_e, n_out=n_out, out_split=out_split,
        exact_spread=exact_spread, want_splits=want_splits, block_parts=block_parts, short_rows=short_rows,
    )  # fmt: skip
    n_splits = n_cold_splits + n_out_splits + n_exact_splits

    # one allocation for every partial: acc [BH, S, R, D] | m [BH, S, R] | l [BH, S, R]
    n_part = n_bh * n_splits * rows
    partials = torch.empty(n_part * (head_dim + 2), dtype=torch.float32, device=device)
    if out is None:
        # a [B, q, Hq, D] buffer seen as [B, Hq, q, D]: transformers' transpose(1, 2) is then free
        out = torch.empty_strided(
            (bsz, n_q, q_len, head_dim), (q_len * n_q * head_dim, head_dim, n_q * head_dim, 1),
            dtype=query.dtype, device=device,
        )  # fmt: skip
    elif out.shape != query.shape or out.dtype != query.dtype or out.device != device:
        raise ValueError(
            f"out must be {tuple(query.shape)} {query.dtype} on {device}, got {tuple(out.shape)} {out.dtype}"
        )

    args = [
        query, *query.stride(),
        *mask_args,
        *cold_args,
        inv_freq,
        *_t(state.landmark_keys, 4, f16, device),
        *_t(state.landmark_values, 4, f16, device),
        *_t(state.hot_keys, 4, f16, device),
        *_t(state.hot_values, 4, f16, device),
        *_t(chunk_k, 4, f16, device),
        *_t(state.chunk_values, 4, f16, device),
        n_land, int(state.hot_start), n_hot, chunk_start, n_chunk, 0,
        partials,
        n_kv, q_len, q_first, seq_len, tier_end, n_blocks, blocks_per_split, n_cold_splits, exact_per_split,
        n_out_splits, out_per_split,
        scale, 1.0 if softcap is None else float(softcap),
        dummy[torch.int64] if device_sizes is None else device_sizes,
    ]  # fmt: skip
    use_pdl = _use_pdl(pdl, device)  # validates pdl everywhere; 0 off compiled Hopper
    row_stride = _auto_row_stride(int4_row_stride, split_k, split_v)
    # value bytes stored tokens-contiguous (how cache/layer.py stores the default preset's values since
    # stop 21; any other strides are read as well)
    v_tokens = cold is not None and cold.num_blocks > 0 and cold.value_coeffs.stride(-2) == 1
    while True:
        flat = _flat_tiles(
            flat_tiles, split_k, split_v, pre_rope, out_split, n_out, block_parts, block_stages
        )
        tiles = blocks_per_split * -(-t // block_t)  # tiles a cold program reads
        stages = _auto_num_stages(num_stages, flat, tiles, v_tokens)
        options = _options(num_warps, stages, maxnreg if query.is_cuda else None, use_pdl == 1)
        constexprs = _split_constexprs(
            groups, rows, head_dim, t, block_t, rk, rv, n_out, block_e, kbits, vbits, key_identity, value_identity,
            pre_rope, rot_half, has_mask, mask_bool, softcap is not None, has_chunk, query.dtype == torch.float32,
            device_sizes is not None, block_stages, out_split, _use_asm(dequant_asm),
            1 if min_rows is None else min_rows,
            kc_t if kbits != 4 or row_stride else 0, vc_t if vbits != 4 or row_stride else 0,
            key_channel, int(int4_bytes), bool(int4_pad), key_offsets, block_parts, split_k, split_v,
            _int4_asm_form(int4_asm), defer_den is None or bool(defer_den),
            flat, _key_raw(key_raw, split_k, key_channel, query.dtype == torch.float32),
            _outlier_cols(outlier_cols, flat, n_out, t, block_t, tiles),
            use_pdl,
            t_v,
            vs_pad,
            out_flag and (outlier_flags is None or bool(outlier_flags)),
            _tile_transposed(tile_transposed, flat, key_raw),
        )  # fmt: skip
        try:
            _launch_split((n_bh, n_splits), args, constexprs, options, device)
            break
        except KernelDoesNotFit:
            if auto_stages and block_stages:
                # the automatic pipelined block loop keeps two blocks' tiles in shared memory (since
                # stop 20 also for the low-rank layouts): fall back to the run-time tile loop first
                block_stages = 0
                continue
            # the token tile is the one size chosen here: halve it (down to 64) before refusing, so
            # layouts like identity int4 values at head_dim 256 in float32 (270-289 KB of shared
            # memory at 256-token tiles on an H100) still run on the kernel; a caller's block_t stands
            if not auto_block_t or block_t <= 64:
                raise
            block_t //= 2

    d_block, block_s = _combine_plan(n_splits, head_dim, combine_block_d, combine_block_s)
    _COMBINE(
        (n_bh * rows, -(-head_dim // d_block) if d_block else 1),
        [partials, out, *out.stride(), n_kv, n_splits, q_len],
        _combine_constexprs(groups, rows, head_dim, block_s, use_pdl > 0, d_block),
        _COMBINE_OPTIONS_PDL if use_pdl else _COMBINE_OPTIONS,
    )  # fmt: skip
    return out
