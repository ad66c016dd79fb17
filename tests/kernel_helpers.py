"""Helpers shared by the decode-kernel tests: what a ``decode_attention`` call launched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def record_launch(fn: Callable[[], Any], ablate_bits: int = 0) -> tuple[Any, dict]:
    """Run ``fn`` (a ``decode_attention`` call); return (its output, the split launch's constexprs, with
    its compile options under ``"_options"``). ``ablate_bits``: launch with ``ABLATE`` = those bits
    instead (the timing-only ablation, as ``attention_kernel_dev.py``'s hook does; results wrong)."""
    import spectralcache.attention.triton.decode as dec

    seen: dict = {}
    launch = dec._launch_split

    def record(grid, args, constexprs, options, device):
        seen.update(constexprs, _options=options)
        if ablate_bits:
            constexprs = {**constexprs, "ABLATE": ablate_bits}
        return launch(grid, args, constexprs, options, device)

    dec._launch_split = record
    try:
        out = fn()
    finally:
        dec._launch_split = launch
    return out, seen
