"""spectralcache.linalg: batched randomized SVD, its batched Jacobi eigensolver, per-row quantization."""

from spectralcache.linalg.jacobi import jacobi_eigh
from spectralcache.linalg.quant import QuantizedRows, dequantize_rows, pack_int4, quantize_rows, unpack_int4
from spectralcache.linalg.rsvd import (
    ORTH_METHODS,
    RandomizedSVD,
    RSVDInfo,
    randomized_svd,
    reset_rsvd_stats,
    rsvd_stats,
    truncated_svd,
)

__all__ = [
    "ORTH_METHODS",
    "QuantizedRows",
    "RSVDInfo",
    "RandomizedSVD",
    "dequantize_rows",
    "jacobi_eigh",
    "pack_int4",
    "quantize_rows",
    "randomized_svd",
    "reset_rsvd_stats",
    "rsvd_stats",
    "truncated_svd",
    "unpack_int4",
]
