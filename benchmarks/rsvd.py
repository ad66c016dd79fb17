"""Randomized SVD benchmark (same as ``spectralcache bench svd``); logic in ``spectralcache.bench.svd``.

python benchmarks/rsvd.py [--device cpu|cuda] [--shapes 8x512x128:16,...] [--repeats 20] [--sweep]
"""

from spectralcache.bench.svd import main

if __name__ == "__main__":
    raise SystemExit(main())
