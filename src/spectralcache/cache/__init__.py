"""spectralcache.cache: the compressed KV cache (layers, blocks, RoPE handling, state contract).

Names are imported lazily so that ``spectralcache.cache.state`` (the contract the attention
code reads) does not pull in transformers' cache machinery.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SpectralCache": "spectralcache.cache.cache",
    "get_active_spectral_layer": "spectralcache.cache.cache",
    "SpectralLayer": "spectralcache.cache.layer",
    "LayerCheckpoint": "spectralcache.cache.layer",
    "compress_blocks": "spectralcache.cache.block",
    "held_bytes": "spectralcache.cache.memory",
    "RopeRotator": "spectralcache.cache.rope",
    "rotate_block_keys": "spectralcache.cache.rope",
    "ColdBlocks": "spectralcache.cache.state",
    "SpectralLayerState": "spectralcache.cache.state",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spectralcache.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
