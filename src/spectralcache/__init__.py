"""spectralcache: spectral (low-rank) KV-cache compression for Hugging Face transformers.

Public names are imported lazily so that ``import spectralcache`` stays cheap and a
missing optional dependency only fails the feature that needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SpectralConfig": "spectralcache.config",
    "SpectralCache": "spectralcache.cache.cache",
    "enable": "spectralcache.integrations.transformers",
    "disable": "spectralcache.integrations.transformers",
    "is_enabled": "spectralcache.integrations.transformers",
    "GraphedDecoder": "spectralcache.integrations.graphed",
    "graphed_generate": "spectralcache.integrations.graphed",
    "randomized_svd": "spectralcache.linalg.rsvd",
    "truncated_svd": "spectralcache.linalg.rsvd",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spectralcache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
