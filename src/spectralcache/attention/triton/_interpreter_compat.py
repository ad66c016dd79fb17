"""Make Triton's interpreter (``TRITON_INTERPRET=1``) work with numpy >= 2.4.

The interpreter keeps every scalar as a one-element numpy array and converts it with
``int(array)`` when a kernel loops ``for i in range(lo, hi)`` over run-time bounds. numpy 2.4
turned that conversion of a 1-D array into a TypeError ("only 0-dimensional arrays can be
converted to Python scalars"), so every kernel with a run-time loop bound fails under the
interpreter (seen with Triton 3.6.0 + numpy 2.4.6). We wrap the interpreter's tensor patching
so ``__index__`` uses ``.item()``, which accepts any one-element array. Compiled (GPU) kernels
never touch this code; it is applied only when the interpreter is enabled and numpy needs it.
"""

from __future__ import annotations

import numpy as np

_APPLIED = False


def _numpy_rejects_1d_int() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def apply() -> None:
    """Idempotent; a no-op when numpy still converts one-element arrays."""
    global _APPLIED
    if _APPLIED or not _numpy_rejects_1d_int():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        # registered after the original, so the scope restores both in reverse order
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _APPLIED = True
