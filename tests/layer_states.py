"""Attention states built around given cold blocks, for reference / kernel tests.

``state_around(cold, ...)``: a :class:`SpectralLayerState` whose cold tier is ``cold`` (blocks
starting after ``landmarks`` tokens), with random landmarks, a hot window of ``hot`` tokens and a
current chunk of ``chunk`` tokens (the last ``chunk`` cache indices, read from the chunk, not the
hot window: ``cache/state.py``)."""

from __future__ import annotations

import torch

from spectralcache.cache.state import ColdBlocks, SpectralLayerState


def state_around(
    cold: ColdBlocks, *, landmarks: int, hot: int, chunk: int, seed: int, key_space: str = "post_rope"
) -> SpectralLayerState:
    b, h = cold.key_coeffs.shape[:2]
    d = cold.outlier_keys.shape[-1]
    g = torch.Generator().manual_seed(seed)
    hot_start = landmarks + cold.num_blocks * cold.block_size
    seq = hot_start + hot
    inv_freq = None
    if key_space == "pre_rope":
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return SpectralLayerState(
        layer_idx=0,
        seq_len=seq,
        landmark_keys=torch.randn(b, h, landmarks, d, generator=g),
        landmark_values=torch.randn(b, h, landmarks, d, generator=g),
        cold=cold,
        hot_keys=torch.randn(b, h, hot, d, generator=g),
        hot_values=torch.randn(b, h, hot, d, generator=g),
        hot_start=hot_start,
        chunk_keys=torch.randn(b, h, chunk, d, generator=g),
        chunk_values=torch.randn(b, h, chunk, d, generator=g),
        chunk_start=seq - chunk,
        key_space=key_space,
        rope_inv_freq=inv_freq,
    )
