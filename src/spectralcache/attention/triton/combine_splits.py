"""Reduction kernel of the fused decode attention: merge the per-split partials by log-sum-exp.

Math: split ``s`` of one (batch row, KV head) left, per query row ``r``, a running max
``m_s``, a denominator ``l_s = Σ exp(score - m_s)`` and an unnormalised output
``acc_s = Σ exp(score - m_s)·v``. With ``M = max_s m_s`` the exact softmax attention over the
union of the splits is ``Σ_s exp(m_s - M)·acc_s / Σ_s exp(m_s - M)·l_s``. A row whose every
key was masked has ``l = 0`` everywhere and is written as zeros (as the torch reference does),
never NaN. One program handles every row of one (batch row, KV head) and writes them into the
output ``[B, Hq, q, D]`` through its strides, in the output's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["combine_splits_kernel"]


@triton.jit
def combine_splits_kernel(
    pacc_ptr, pm_ptr, pl_ptr,
    out_ptr, s_ob, s_oh, s_oq, s_od,
    n_kv, n_splits, q_len,
    G: tl.constexpr, R: tl.constexpr, R_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    b = pid_bh // n_kv
    h = pid_bh % n_kv
    rows = tl.arange(0, R_P)
    rows_ok = rows < R
    dcols = tl.arange(0, D_P)
    d_ok = dcols < D
    tile_ok = rows_ok[:, None] & d_ok[None, :]

    m_run = tl.full((R_P,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((R_P,), dtype=tl.float32)
    acc = tl.zeros((R_P, D_P), dtype=tl.float32)
    for s in range(0, n_splits):
        part = pid_bh * n_splits + s
        m_s = tl.load(pm_ptr + part * R + rows, mask=rows_ok, other=float("-inf"))
        l_s = tl.load(pl_ptr + part * R + rows, mask=rows_ok, other=0.0)
        a_s = tl.load(pacc_ptr + (part * R + rows)[:, None] * D + dcols[None, :], mask=tile_ok, other=0.0)
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp(m_run - m_safe)
        w_s = tl.exp(m_s - m_safe)
        l_run = l_run * w_old + l_s * w_s
        acc = acc * w_old[:, None] + a_s * w_s[:, None]
        m_run = m_new
    out = tl.where(l_run[:, None] > 0, acc / tl.where(l_run > 0, l_run, 1.0)[:, None], 0.0)
    rows_g = rows // q_len
    rows_q = rows % q_len
    ptrs = (
        out_ptr + b * s_ob + (h * G + rows_g)[:, None] * s_oh + rows_q[:, None] * s_oq + dcols[None, :] * s_od
    )
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=tile_ok)
