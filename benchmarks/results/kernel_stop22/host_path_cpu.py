"""Host microseconds of one ``decode_attention`` call with both kernel launches stubbed (interpreter mode,
CPU tensors): the Python + torch work of the launch path. Run it with ``PYTHONPATH`` set to each source tree
to compare them (stop 22: ``git archive a20f41f src | tar -x -C /tmp/old``), alternating processes::

    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old/src python benchmarks/results/kernel_stop22/host_path_cpu.py old
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/results/kernel_stop22/host_path_cpu.py new

Prints the median and the fastest of 7 rounds of 2000 calls (aggressive layout: 8 blocks, bf16).
"""

from __future__ import annotations

import os
import statistics
import sys
import time


def main(label: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first import below)
    import torch

    import spectralcache.attention.triton.decode as dec
    from spectralcache.attention.triton.synthetic import random_state

    dec._launch_split = lambda *a, **k: None
    dec._COMBINE = lambda *a, **k: None
    st = random_state(batch=1, kv_heads=8, head_dim=128, block_size=512, blocks=8, outliers=16, rank_keys=16,
                      rank_values=32, key_bits=4, dtype=torch.bfloat16, hot=40, landmarks=16, seed=0)  # fmt: skip
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    for _ in range(200):
        dec.decode_attention(q, st, out=out)
    rounds = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(2000):
            dec.decode_attention(q, st, out=out)
        rounds.append((time.perf_counter() - t) / 2000 * 1e6)
    print(f"{label}: us/call median {statistics.median(rounds):.2f} fastest {min(rounds):.2f}",
          [round(x, 1) for x in rounds])  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tree")
