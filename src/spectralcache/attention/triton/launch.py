"""Cheap kernel launches: call a compiled Triton kernel's launcher directly, once it is compiled.

Why: ``kernel[grid](*args)`` runs Triton's per-call binder every time -- a dict of every
parameter, a specialisation tuple (type, 16-alignment of every pointer, ``== 1`` / ``% 16`` of
every int), a cache-key hash, launch metadata for the profiling hooks -- and its launcher asks the
driver to validate each tensor pointer (``cuPointerGetAttribute``). For the decode kernel (about
150 parameters) that was ~90 us a launch on an H100 host, twice per layer and token
(docs/kernel_notes.md), more than the kernel itself below ~64K tokens.

:class:`FastLauncher` keeps the compiled kernel of every specialisation it has seen, keyed by
exactly what Triton specialises on -- the current device, each pointer's dtype, every int
argument that is not ``do_not_specialize`` (the strides, whose ``== 1`` / ``% 16`` properties
Triton compiles in), the constexprs and the compile options -- and calls its launcher with the
pointers as plain integers (Triton's launcher accepts them: no driver query). Pointers not all
16-byte aligned take Triton's own path every time (Triton compiles per-pointer alignment, which
this key does not record). The first call of a key also goes through Triton (it compiles and
launches), so results never depend on which path ran. Triton's interpreter
(``TRITON_INTERPRET=1``), a registered launch hook (profilers), or ``SPECTRALCACHE_TRITON_FAST_LAUNCH=0``
select Triton's own path always.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import torch

__all__ = ["FAST_LAUNCH_ENV", "FastLauncher"]

FAST_LAUNCH_ENV = "SPECTRALCACHE_TRITON_FAST_LAUNCH"
# float parameters of our kernels: never specialised by Triton (always fp32), so not in the key
_FLOAT_PARAMS = frozenset({"mask_floor", "scale", "softcap"})


_RUNTIME = None


def _knobs_runtime() -> Any:
    global _RUNTIME
    if _RUNTIME is None:
        from triton import knobs

        _RUNTIME = knobs.runtime
    return _RUNTIME


def _fast_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") != "1" and os.environ.get(FAST_LAUNCH_ENV, "1") != "0"


class FastLauncher:
    """Launch ``kernel`` (a ``@triton.jit`` function whose constexpr parameters come last).

    ``launcher(grid, args, constexprs, options)``: ``args`` = the runtime arguments in signature
    order (a list; tensors for pointers -- it is modified in place), ``constexprs`` = a dict of
    the constexpr parameters in signature order, ``options`` = compile options (``num_warps``...).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.enabled = _fast_enabled()
        self._compiled: dict[tuple, Any] = {}
        self._layout: tuple | None = None
        self.fast_calls = 0  # launches that skipped Triton's binder (tests and benchmarks read it)
        self.slow_calls = 0

    def _init_layout(self) -> tuple:
        params = self.kernel.params
        n_const = sum(p.is_constexpr for p in params)
        if any(p.is_constexpr for p in params[: len(params) - n_const]):
            raise RuntimeError(f"{self.kernel.__name__}: constexpr parameters must come last")
        runtime = params[: len(params) - n_const]
        ptr_pos = tuple(i for i, p in enumerate(runtime) if p.name.endswith("_ptr"))
        spec_pos = [
            i
            for i, p in enumerate(runtime)
            if not p.name.endswith("_ptr") and not p.do_not_specialize and p.name not in _FLOAT_PARAMS
        ]
        spec_get = operator.itemgetter(*spec_pos) if len(spec_pos) > 1 else (lambda a: (a[spec_pos[0]],))
        const_names = tuple(p.name for p in params[len(runtime) :])
        self._layout = (ptr_pos, spec_get, const_names, len(runtime))
        return self._layout

    def _slow(self, grid: tuple, args: list, constexprs: dict, options: dict) -> Any:
        self.slow_calls += 1
        return self.kernel[grid](*args, **constexprs, **options)

    def __call__(self, grid: tuple, args: list, constexprs: dict, options: dict) -> None:
        if not self.enabled:
            self._slow(grid, args, constexprs, options)
            return
        runtime = _knobs_runtime()
        # Triton 3.6 keeps (empty) hook chains here; a profiler adds to them or sets a function
        if any(
            h is not None and getattr(h, "calls", True)
            for h in (runtime.launch_enter_hook, runtime.launch_exit_hook)
        ):
            self._slow(grid, args, constexprs, options)  # a profiler wants its hooks called
            return
        ptr_pos, spec_get, const_names, n_runtime = self._layout or self._init_layout()
        tensors = [args[i] for i in ptr_pos]
        ptrs = [t.data_ptr() for t in tensors]
        if any(p & 15 for p in ptrs):
            # Triton compiles each pointer's 16-byte alignment in; this key does not record
            # which pointer is unaligned, so such a call is never served from the cache
            self._slow(grid, args, constexprs, options)
            return
        device = torch.cuda.current_device()
        const_vals = tuple(constexprs.values())
        key = (device, tuple(t.dtype for t in tensors), spec_get(args), const_vals, tuple(options.items()))
        compiled = self._compiled.get(key)
        if compiled is None:
            if tuple(constexprs) != const_names or len(args) != n_runtime:
                raise TypeError(
                    f"{self.kernel.__name__}: expected {n_runtime} runtime arguments and constexprs "
                    f"{const_names}, got {len(args)} and {tuple(constexprs)}"
                )
            # the key covers tensors only at *_ptr parameters: anything else must be a plain scalar
            stray = [i for i, x in enumerate(args) if isinstance(x, torch.Tensor) != (i in ptr_pos)]
            if stray:
                raise TypeError(
                    f"{self.kernel.__name__}: tensors must be passed exactly at the *_ptr parameters; "
                    f"positions {stray} disagree"
                )
            compiled = self._slow(grid, args, constexprs, options)
            if hasattr(compiled, "result"):  # Triton's asynchronous compile mode hands a future
                compiled = compiled.result()
            self._compiled[key] = compiled
            return
        for i, p in zip(ptr_pos, ptrs):
            args[i] = p
        self.fast_calls += 1
        compiled.run(
            grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            torch._C._cuda_getCurrentRawStream(device), compiled.function, compiled.packed_metadata,
            None, None, None, *args, *const_vals,
        )  # fmt: skip
