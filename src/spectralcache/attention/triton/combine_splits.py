"""Reduction kernel of the fused decode attention: merge the per-split partials by log-sum-exp.

Math: split ``s`` of one (batch row, KV head) left, per query row ``r``, a running max
``m_s``, a denominator ``l_s = Σ exp(score - m_s)`` and an unnormalised output
``acc_s = Σ exp(score - m_s)·v``. With ``M = max_s m_s`` the exact softmax attention over the
union of the splits is ``Σ_s exp(m_s - M)·acc_s / Σ_s exp(m_s - M)·l_s``. A row whose every
key was masked has ``l = 0`` everywhere and is written as zeros (as the torch reference does),
never NaN.

One program per (batch row, KV head, query row) reads its splits ``BLOCK_S`` at a time (a
``[BLOCK_S, D]`` tile per step, so hundreds of splits cost a few wide loads, not hundreds of
dependent ones) and writes one output row ``[D]`` through the output's strides, in its dtype.

Stop 22: ``PDL`` -- the kernel is launched as a programmatic dependent of the split kernel (Hopper's
programmatic dependent launch, the ``launch_pdl`` compile option): its programs may start while the
split kernel's last programs run and wait (``griddepcontrol.wait``) for its partials, so the launch
gap between the two kernels is hidden (``decode_attention(pdl=...)``; on by default on Hopper since stop 24).

Stop 24: ``D_BLOCK`` -- the output row's columns split over programs (grid axis 1: ``D / D_BLOCK``
programs per row, each reading ``[BLOCK_S, D_BLOCK]`` tiles; every one recomputes the row's tiny
``m`` / ``l`` merge). At batch 1 the one-program-per-row form gave 32 programs for the whole card, each
reading 88 splits' ``[S, 128]`` partials in two dependent rounds: 3.8 us of a 72 us step at 128K on the
H200 (``benchmarks/decode_breakdown_gpu.py``). 0: one program per row (all ``D_P`` columns).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["combine_splits_kernel", "grid_trigger", "grid_wait"]

# Hopper grid dependency control (PTX ``griddepcontrol``), as triton.language.extra.cuda.gdc_* emit it
# (written out here: the interpreter, CI's, never runs it, and the module path differs between releases)
_GDC_WAIT = tl.constexpr("griddepcontrol.wait; // dummy $0")
_GDC_LAUNCH = tl.constexpr("griddepcontrol.launch_dependents; // dummy $0")


@triton.jit
def grid_trigger():
    """Programmatic dependent launch (compiled CUDA only): let the next dependent grid be scheduled."""
    tl.inline_asm_elementwise(_GDC_LAUNCH, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def grid_wait(LAUNCH_DEPENDENTS: tl.constexpr):
    """Programmatic dependent launch (compiled CUDA only): wait until the grid this one depends on has
    finished and its writes are visible; with ``LAUNCH_DEPENDENTS`` first let the next dependent grid
    be scheduled (its programs then wait the same way). Both are no-ops for a normal launch."""
    if LAUNCH_DEPENDENTS:
        grid_trigger()
    tl.inline_asm_elementwise(_GDC_WAIT, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["n_splits"])  # changes with the context length: no recompiles
def combine_splits_kernel(
    part_ptr,
    out_ptr, s_ob, s_oh, s_oq, s_od,
    n_kv, n_splits, q_len,
    G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr = False, D_BLOCK: tl.constexpr = 0,
):  # fmt: skip
    if PDL:
        # launched as the split kernel's programmatic dependent (compiled only): wait for its partials;
        # a next dependent grid (the next step's split kernel under ``pdl``) may be scheduled meanwhile
        grid_wait(True)
    pid = tl.program_id(0)
    bh = pid // R
    r = pid % R
    b = bh // n_kv
    h = bh % n_kv
    if D_BLOCK > 0:
        dcols = tl.program_id(1) * D_BLOCK + tl.arange(0, D_BLOCK)
        acc = tl.zeros((D_BLOCK,), dtype=tl.float32)
    else:
        dcols = tl.arange(0, D_P)
        acc = tl.zeros((D_P,), dtype=tl.float32)
    d_ok = dcols < D
    # partials of the split kernel, one buffer: acc [BH, S, R, D] | m [BH, S, R] | l [BH, S, R]
    n_part = tl.num_programs(0) * n_splits
    pm_ptr = part_ptr + n_part * D
    pl_ptr = part_ptr + n_part * (D + 1)

    m_run = tl.full((), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < n_splits
        row = (bh * n_splits + ss) * R + r  # [BLOCK_S] partial rows
        m_s = tl.load(pm_ptr + row, mask=s_ok, other=float("-inf"))
        l_s = tl.load(pl_ptr + row, mask=s_ok, other=0.0)
        a_s = tl.load(
            part_ptr + row[:, None] * D + dcols[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
        )
        m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp(m_run - m_safe)
        w_s = tl.exp(m_s - m_safe)
        l_run = l_run * w_old + tl.sum(l_s * w_s, axis=0)
        acc = acc * w_old + tl.sum(a_s * w_s[:, None], axis=0)
        m_run = m_new
    out = tl.where(l_run > 0, acc / tl.where(l_run > 0, l_run, 1.0), 0.0)
    g = r // q_len
    qi = r % q_len
    tl.store(
        out_ptr + b * s_ob + (h * G + g) * s_oh + qi * s_oq + dcols * s_od,
        out.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )
