"""Small-layer helpers shared by the cache-layer tests: one block geometry, random K/V, RoPE."""

from __future__ import annotations

import torch

from spectralcache.cache.rope import RopeRotator
from spectralcache.config import SpectralConfig

H, D, T = 2, 16, 16  # KV heads, head_dim, block size


def small_cfg(**overrides) -> SpectralConfig:
    """A config whose blocks fill after a few dozen tokens (rank < D, outliers, landmarks, hot)."""
    base = dict(block_size=T, rank_keys=4, rank_values=6, hot_size=4, landmarks=3, outliers_per_block=2)
    base.update(overrides)
    return SpectralConfig(**base)


def kv(
    b: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random keys and values ``[b, H, n, D]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, n, D, generator=g).to(dtype), torch.randn(b, H, n, D, generator=g).to(dtype)


def rotator() -> RopeRotator:
    return RopeRotator(1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float) / D)), D)
