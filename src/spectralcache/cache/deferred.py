"""Device-side results a forward reads back once, at its end, instead of once per layer.

A prefill through an enabled model refuses bad input (NaN / inf keys or values, blocks with
more rows too large for their coefficients than ``outliers_per_block``) and times its block
compressions. Read back layer by layer, each of those is a host synchronization: on a GPU the
host then waits for the queue to drain before it may launch the layer's compression, and the
compression's launch cost is no longer hidden behind the previous layers' kernels (measured:
a 32K prefill of the Llama-3.1-8B-shaped model spent ~14 ms per layer in compression that runs
in ~8 ms alone).

Inside a forward opened by the hooks :func:`spectralcache.enable` installs, the cache instead
collects :class:`DeferredCheck` flags (device bools) and :class:`DeviceSeconds` timings; the
forward's end reads every flag with one synchronization (:func:`first_failure`) and, if one is
set, rolls every layer back to its state before the forward and raises. The guarantee is the
same as with checks read at once -- nothing bad is kept in the cache and the caller sees a
ValueError naming the layer -- only later in the forward: layers after the one that noticed run
on the bad values (their output is discarded). While a check is pending, bad rows are kept out
of the fit (``compress_blocks`` treats them like rows too large to fit), so no solver sees a
NaN. Outside such a forward (direct ``update`` calls) every check is read at once, as before.

Deferral is used on CUDA only (a CPU has no queue to keep busy); :func:`deferring` forces it
on every device so the CPU tests exercise the same path.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["DeferredCheck", "DeviceSeconds", "deferring", "first_failure", "should_defer"]

_DEFER_ON_EVERY_DEVICE = False


@dataclass(frozen=True)
class DeferredCheck:
    """A refusal decided on the device: ``failed`` is a bool scalar tensor; ``message()`` says
    what was wrong (called only once ``failed`` was read back true; it may synchronize)."""

    failed: torch.Tensor
    message: Callable[[], str]


def should_defer(x: torch.Tensor) -> bool:
    """Whether checks on ``x`` are deferred when a forward collects them."""
    return x.is_cuda or _DEFER_ON_EVERY_DEVICE


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """Defer checks on every device, CPU included, inside the block (for tests)."""
    global _DEFER_ON_EVERY_DEVICE
    before = _DEFER_ON_EVERY_DEVICE
    _DEFER_ON_EVERY_DEVICE = True
    try:
        yield
    finally:
        _DEFER_ON_EVERY_DEVICE = before


def first_failure(checks: list[DeferredCheck]) -> str | None:
    """The message of the first failed check, or None: one host synchronization for all."""
    if not checks:
        return None
    flags = torch.stack([c.failed.reshape(()).to(device=checks[0].failed.device) for c in checks])
    for check, failed in zip(checks, flags.tolist(), strict=True):
        if failed:
            return check.message()
    return None


class DeviceSeconds:
    """Seconds between two points of the device's queue, read when first asked for.

    On CUDA: two timing events, no synchronization when recorded (``float()`` waits for the
    end event). On CPU: host wall time between ``start()`` and ``stop()``.
    """

    __slots__ = ("_end", "_seconds", "_start", "_stopped")

    def __init__(self, device: torch.device) -> None:
        self._seconds: float | None = None
        self._stopped = False
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start, self._end = time.perf_counter(), None

    def stop(self) -> DeviceSeconds:
        self._stopped = True
        if isinstance(self._start, float):
            self._seconds = time.perf_counter() - self._start
        else:
            self._end.record()
        return self

    def __float__(self) -> float:
        if self._seconds is None:
            if not self._stopped:
                raise RuntimeError("DeviceSeconds read before stop()")
            self._end.synchronize()
            self._seconds = self._start.elapsed_time(self._end) / 1e3
        return self._seconds

    def __repr__(self) -> str:
        return f"DeviceSeconds({float(self):.6f})"
