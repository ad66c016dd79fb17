"""spectralcache.attention.triton: fused Triton kernels over the compressed cache state.

``decode_attention(query, state, attention_mask=None, scaling=None, softcap=None)`` is the
fused decode attention (host side in ``decode.py``; kernels in ``decode_splits.py`` and
``combine_splits.py``). ``dispatch.attend`` chooses between it and the torch reference.

Importing this package does not import Triton (``dispatch`` must work without it); the kernel
entry points are loaded on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_ROWS", "decode_attention", "interpreter_enabled"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from spectralcache.attention.triton import decode

        return getattr(decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
