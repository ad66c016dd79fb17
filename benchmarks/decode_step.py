"""Decode step at 4K tokens: SpectralCache vs DynamicCache side by side (CPU), table + JSON.

    python benchmarks/decode_step.py [--tokens 4096] [--steps 30] [--threads 1] [--key-space both]

The logic lives in ``spectralcache.bench.decode``.
"""

from spectralcache.bench.decode import main

if __name__ == "__main__":
    raise SystemExit(main())
