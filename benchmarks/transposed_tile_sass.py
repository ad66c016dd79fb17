"""SASS of the default preset's cold tile in two orientations, compiled for sm_90a on the CPU (no GPU).

Stop 24's question for the next kernel work. The split kernel scores a tile as ``s = q · Kᵀ``: the 4 query
rows of a KV head (GQA 4) are the mma's M operand, padded to 16, so scores, exponents and probabilities are
computed for 12 empty rows. Triton 3.6 accepts dots with M or N below 16 (``min_dot_size``: it pads), so the
tile can be turned over: ``sᵀ = K · qᵀ`` ([tokens, rows]: tokens fill M, the 4 rows are N, padded to 8 by
m16n8k16), the softmax reduces over axis 0, and the values meet the probabilities as ``accᵀ += Vᵀ · pᵀ`` --
``Vᵀ`` ([D/2, tokens]) being exactly how the cache stores the default preset's value bytes
(tokens-contiguous since stop 21).

This script compiles a stripped tile loop in both orientations -- packed int4 key / value nibbles widened
by the kernel's own PTX (``decode_splits._widen_int4``), per-token value scales (and the stop-24 outlier
flags they carry), the online softmax with a deferred denominator -- and prints what
``attention_kernel_dev.py``'s sass section prints for the real kernel: registers, spills, the tile loop's
steady-state instructions, barriers and HMMAs. It times nothing and is not the kernel: a prototype's
instruction counts, to decide whether the real tile is worth turning over.

    python benchmarks/transposed_tile_sass.py
    TRITON_INTERPRET=1 python benchmarks/transposed_tile_sass.py --check   # both orientations = torch
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_kernel_dev import _compile_sm90, _sass_facts
from spectralcache.attention.triton.decode_splits import _exp, _widen_int4


@triton.jit
def tile_loop_kernel(
    q_ptr, k_ptr, v_ptr, vs_ptr, out_ptr, n_tiles, t_total,
    R: tl.constexpr, DH: tl.constexpr, BT: tl.constexpr, TRANS: tl.constexpr,
):  # fmt: skip
    """One KV head's tiles: int4 key rows [t, DH bytes] (row-major), int4 value bytes [DH, t]
    (tokens-contiguous), value scales [t] (-1 = outlier row); R query rows; DH = head_dim / 2."""
    rows = tl.arange(0, R)
    hc = tl.arange(0, DH)
    tt = tl.arange(0, BT)
    q_lo = tl.load(q_ptr + rows[:, None] * (2 * DH) + (2 * hc)[None, :]).to(tl.float16)
    q_hi = tl.load(q_ptr + rows[:, None] * (2 * DH) + (2 * hc + 1)[None, :]).to(tl.float16)
    m = tl.full((R,), float("-inf"), dtype=tl.float32)
    if TRANS:
        qt_lo = tl.trans(q_lo)  # [DH, R]
        qt_hi = tl.trans(q_hi)
        den = tl.zeros((BT, R), dtype=tl.float32)
        acc_lo = tl.zeros((DH, R), dtype=tl.float32)
        acc_hi = tl.zeros((DH, R), dtype=tl.float32)
    else:
        den = tl.zeros((R, BT), dtype=tl.float32)
        acc_lo = tl.zeros((R, DH), dtype=tl.float32)
        acc_hi = tl.zeros((R, DH), dtype=tl.float32)
    for i in tl.range(0, n_tiles, num_stages=3):
        t = i * BT + tt
        kb = tl.load(k_ptr + t[:, None] * DH + hc[None, :])
        klo, khi = _widen_int4(kb, 2, False)  # [BT, DH] float16
        vs = tl.load(vs_ptr + t).to(tl.float32)
        if TRANS:
            s = tl.dot(klo, qt_lo, out_dtype=tl.float32) + tl.dot(khi, qt_hi, out_dtype=tl.float32)  # [BT, R]
            s = tl.where((vs >= 0.0)[:, None], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            alpha = _exp(m - m_new)
            p = _exp(s - m_new[None, :])
            den = den * alpha[None, :] + p
            vb = tl.load(v_ptr + hc[:, None] * t_total + t[None, :])  # [DH, BT] bytes
            vlo, vhi = _widen_int4(vb, 2, False)
            pv = (p * vs[:, None]).to(tl.float16)
            acc_lo = acc_lo * alpha[None, :] + tl.dot(vlo, pv, out_dtype=tl.float32)  # [DH, R]
            acc_hi = acc_hi * alpha[None, :] + tl.dot(vhi, pv, out_dtype=tl.float32)
        else:
            s = tl.dot(q_lo, tl.trans(klo), out_dtype=tl.float32) + tl.dot(
                q_hi, tl.trans(khi), out_dtype=tl.float32
            )  # [R, BT]
            s = tl.where((vs >= 0.0)[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = _exp(m - m_new)
            p = _exp(s - m_new[:, None])
            den = den * alpha[:, None] + p
            vb = tl.load(v_ptr + hc[None, :] * t_total + t[:, None])  # [BT, DH] bytes
            vlo, vhi = _widen_int4(vb, 2, False)
            pv = (p * vs[None, :]).to(tl.float16)
            acc_lo = acc_lo * alpha[:, None] + tl.dot(pv, vlo, out_dtype=tl.float32)  # [R, DH]
            acc_hi = acc_hi * alpha[:, None] + tl.dot(pv, vhi, out_dtype=tl.float32)
        m = m_new
    if TRANS:
        l_row = tl.sum(den, axis=0)
        # [DH, R] accumulators stored through transposed pointers: row r, columns 2j / 2j+1
        tl.store(out_ptr + rows[None, :] * (2 * DH) + (2 * hc)[:, None], acc_lo)
        tl.store(out_ptr + rows[None, :] * (2 * DH) + (2 * hc + 1)[:, None], acc_hi)
    else:
        l_row = tl.sum(den, axis=1)
        tl.store(out_ptr + rows[:, None] * (2 * DH) + (2 * hc)[None, :], acc_lo)
        tl.store(out_ptr + rows[:, None] * (2 * DH) + (2 * hc + 1)[None, :], acc_hi)
    tl.store(out_ptr + 2 * R * DH + rows, l_row)
    tl.store(out_ptr + 2 * R * DH + R + rows, m)


def check() -> int:
    """Both orientations against torch on random int4 data (run with TRITON_INTERPRET=1 on a CPU)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        print("--check runs the interpreter: set TRITON_INTERPRET=1")
        return 2
    g = torch.Generator().manual_seed(0)
    r, dh, bt, tokens = 4, 64, 64, 256
    q = torch.randn(r, 2 * dh, generator=g).to(torch.bfloat16)
    kb = torch.randint(0, 256, (tokens, dh), generator=g, dtype=torch.uint8)
    vb = torch.randint(0, 256, (dh, tokens), generator=g, dtype=torch.uint8)
    vs = torch.rand(tokens, generator=g).to(torch.float16)
    vs[torch.randperm(tokens, generator=g)[:20]] = -1.0

    def nibbles(b: torch.Tensor) -> torch.Tensor:  # [..., n] bytes -> [..., 2n] two's complement nibbles
        lo = (b.to(torch.int16) & 15) ^ 8
        hi = ((b.to(torch.int16) >> 4) & 15) ^ 8
        return torch.stack([lo - 8, hi - 8], -1).flatten(-2).float()

    keys = nibbles(kb)  # [tokens, 2dh]
    vals = nibbles(vb.t().contiguous())  # [tokens, 2dh]
    s_scaled = q.float() @ keys.t()
    s_scaled = s_scaled.masked_fill((vs < 0)[None, :], float("-inf"))
    p = torch.softmax(s_scaled, -1)
    ref = (p * vs.float().clamp_min(0)[None, :]) @ vals
    for trans in (False, True):
        out = torch.zeros(5 * r * dh, dtype=torch.float32)
        tile_loop_kernel[(1,)](q, kb, vb, vs, out, tokens // bt, tokens, R=r, DH=dh, BT=bt, TRANS=trans)
        acc = out[: 2 * r * dh].view(r, 2 * dh)
        den = out[2 * r * dh : 2 * r * dh + r]
        got = acc / den[:, None]
        err = float((got - ref).norm() / ref.norm())
        print(f"TRANS={trans}: relative error against torch {err:.2e}")
        if not err < 1e-2:
            return 1
    return 0


def main() -> int:
    r, dh, bt, tokens = 4, 64, 64, 4096
    args = [
        torch.zeros(r, 2 * dh, dtype=torch.bfloat16),
        torch.zeros(tokens, dh, dtype=torch.uint8),
        torch.zeros(dh, tokens, dtype=torch.uint8),
        torch.zeros(tokens, dtype=torch.float16),
        torch.zeros(5 * r * dh, dtype=torch.float32),
        tokens // bt,
        tokens,
    ]
    rows = []
    for trans in (False, True):
        compiled = _compile_sm90(
            tile_loop_kernel,
            args,
            {"R": r, "DH": dh, "BT": bt, "TRANS": trans},
            {"num_warps": 4, "maxnreg": 128},
        )
        facts = _sass_facts(compiled, 128)
        rows.append(
            {"orientation": "transposed (s^T = K q^T)" if trans else "as the kernel (s = q K^T)", **facts}
        )
        tl_ = facts["tile_loop"]
        print(
            f"{rows[-1]['orientation']:>28}: {facts['registers']} registers, spills {facts['spill_bytes']} B; tile loop "
            f"{tl_.get('steady')} instructions, BAR {tl_.get('BAR')}, HMMA {tl_.get('HMMA')}; top ops {tl_.get('ops')}"
        )
    out = Path("benchmarks/results/lead_stop24/transposed_tile_sass.json")
    out.write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(check() if "--check" in sys.argv else main())
