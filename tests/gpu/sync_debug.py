"""Where a CUDA call synchronizes the host: ``torch.cuda.set_sync_debug_mode("warn")`` turns each
synchronizing CUDA operation into a warning attributed to its Python caller."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def sync_sites(fn: Callable[[], object]) -> list[str]:
    """``file:line`` of the Python caller of each synchronizing CUDA call ``fn`` makes (work
    queued before the call is flushed first, so it is not counted)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
