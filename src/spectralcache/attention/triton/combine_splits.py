"""Reduction of the fused decode attention: merge the per-split partials by log-sum-exp.

Math: split ``s`` of one (batch row, KV head) left, per query row ``r``, a running max
``m_s``, a denominator ``l_s = Σ exp(score - m_s)`` and an unnormalised output
``acc_s = Σ exp(score - m_s)·v``. With ``M = max_s m_s`` the exact softmax attention over the
union of the splits is ``Σ_s exp(m_s - M)·acc_s / Σ_s exp(m_s - M)·l_s``. A split that saw no
key of the row (an empty range, or every key masked) has ``m_s = -inf``, ``l_s = 0``,
``acc_s = 0`` and weighs nothing; a row whose every key was masked has ``l = 0`` everywhere and
is written as zeros (as the torch reference does), never NaN.

The splits are read ``BLOCK_S`` at a time (a tile per step, so hundreds of splits cost a few wide
loads, not hundreds of dependent ones) and folded into a running max / denominator / accumulator
(:func:`merge_step`, then :func:`merge_finish`); both work on any tile whose axis 0 is the split
and whose last axis (if any beyond the head dimension) is the query row. Two callers:

* :func:`combine_splits_kernel`: one program per (batch row, KV head, query row), launched after
  the split kernel: ``[BLOCK_S, D]`` tiles (:func:`merge_row`);
* the split kernel's fused tail (``FUSED_COMBINE``: the last split program of a (batch row, KV
  head) merges its rows itself, ``decode_splits``): every query row at once, ``[BLOCK_S, D, RB]``
  tiles (:func:`merge_rows`), one dependent round of loads per ``BLOCK_S`` splits for all rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["combine_splits_kernel", "merge_finish", "merge_row", "merge_rows", "merge_step"]


@triton.jit
def merge_step(m_run, l_run, acc, part_ptr, pm_ptr, pl_ptr, row, ok, dcols_b, d_ok_b, D: tl.constexpr,
               CACHE: tl.constexpr):  # fmt: skip
    """Fold the partials ``row`` (partial-row indices, split on axis 0: ``[S]`` or ``[S, RB]``;
    ``ok`` the same shape) into the running ``(m_run, l_run, acc)`` (``[]``, ``[]``, ``[D_P]`` or
    ``[RB]``, ``[RB]``, ``[D_P, RB]``). ``dcols_b`` / ``d_ok_b``: the head-dimension columns shaped
    to follow ``row`` with a new axis 1 (``[1, D_P]`` or ``[1, D_P, 1]``). ``CACHE``: the loads'
    cache modifier ("" or ".cg": L2 only, for partials other programs of this launch wrote)."""
    m_s = tl.load(pm_ptr + row, mask=ok, other=float("-inf"), cache_modifier=CACHE)
    l_s = tl.load(pl_ptr + row, mask=ok, other=0.0, cache_modifier=CACHE)
    a_s = tl.load(
        part_ptr + tl.expand_dims(row, 1) * D + dcols_b,
        mask=tl.expand_dims(ok, 1) & d_ok_b,
        other=0.0,
        cache_modifier=CACHE,
    )
    m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    w_old = tl.exp(m_run - m_safe)
    w_s = tl.exp(m_s - m_safe)
    l_run = l_run * w_old + tl.sum(l_s * w_s, axis=0)
    acc = acc * w_old + tl.sum(a_s * tl.expand_dims(w_s, 1), axis=0)
    return m_new, l_run, acc


@triton.jit
def merge_finish(l_run, acc):
    """The merged rows ``acc / l``; zeros where no key was seen (``l = 0``), never NaN."""
    return tl.where(l_run > 0, acc / tl.where(l_run > 0, l_run, 1.0), 0.0)


@triton.jit
def merge_row(
    part_ptr, n_part, out_ptr, s_ob, s_oh, s_oq, s_od, bh, r, n_kv, n_splits, q_len,
    G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, BLOCK_S: tl.constexpr,
    CACHE: tl.constexpr,
):  # fmt: skip
    """Merge the ``n_splits`` partials of query row ``r`` of ``bh`` (= b·n_kv + h) and store it.

    ``part_ptr``: the split kernel's float32 buffer acc [BH, S, R, D] | m [BH, S, R] | l [BH, S, R]
    with ``n_part = BH·S·R`` partial rows."""
    dcols = tl.arange(0, D_P)
    d_ok = dcols < D
    m_run = tl.full((), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((D_P,), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m_run, l_run, acc = merge_step(
            m_run, l_run, acc, part_ptr, part_ptr + n_part * D, part_ptr + n_part * (D + 1),
            (bh * n_splits + ss) * R + r, ss < n_splits, dcols[None, :], d_ok[None, :], D, CACHE,
        )  # fmt: skip
    b = bh // n_kv
    tl.store(
        out_ptr + b * s_ob + ((bh % n_kv) * G + r // q_len) * s_oh + (r % q_len) * s_oq + dcols * s_od,
        merge_finish(l_run, acc).to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )


@triton.jit
def merge_rows(
    part_ptr, n_part, out_ptr, s_ob, s_oh, s_oq, s_od, bh, r0, n_kv, n_splits, q_len,
    G: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_S: tl.constexpr, CACHE: tl.constexpr,
):  # fmt: skip
    """:func:`merge_row` for query rows ``r0 .. r0+RB-1`` (those < R) together: ``[BLOCK_S, D_P, RB]``
    tiles (split, column, row), so each step's loads cover every row."""
    dcols = tl.arange(0, D_P)
    d_ok = dcols < D
    rr = r0 + tl.arange(0, RB)
    r_ok = rr < R
    m_run = tl.full((RB,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((RB,), dtype=tl.float32)
    acc = tl.zeros((D_P, RB), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m_run, l_run, acc = merge_step(
            m_run, l_run, acc, part_ptr, part_ptr + n_part * D, part_ptr + n_part * (D + 1),
            (bh * n_splits + ss)[:, None] * R + rr[None, :], (ss < n_splits)[:, None] & r_ok[None, :],
            dcols[None, :, None], d_ok[None, :, None], D, CACHE,
        )  # fmt: skip
    b = bh // n_kv
    tl.store(
        out_ptr + b * s_ob + (((bh % n_kv) * G + rr // q_len) * s_oh + (rr % q_len) * s_oq)[None, :]
        + dcols[:, None] * s_od,
        merge_finish(l_run, acc).to(out_ptr.dtype.element_ty),
        mask=d_ok[:, None] & r_ok[None, :],
    )  # fmt: skip


@triton.jit(do_not_specialize=["n_splits"])  # changes with the context length: no recompiles
def combine_splits_kernel(
    part_ptr,
    out_ptr, s_ob, s_oh, s_oq, s_od,
    n_kv, n_splits, q_len,
    G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One program per (batch row, KV head, query row): :func:`merge_row` of that row."""
    pid = tl.program_id(0)
    merge_row(
        part_ptr, tl.num_programs(0) * n_splits, out_ptr, s_ob, s_oh, s_oq, s_od, pid // R, pid % R, n_kv,
        n_splits, q_len, G, R, D, D_P, BLOCK_S, "",
    )  # fmt: skip
