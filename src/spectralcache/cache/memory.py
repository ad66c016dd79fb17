"""``held_bytes``: the memory a set of tensors actually keeps allocated.

Measured, not computed from shapes: every distinct untyped storage reachable from the given
objects is counted once, with its whole size (``untyped_storage().nbytes()``). So a view is
charged the storage it pins (a ``[:, :, :nb]`` view of a capacity buffer costs the buffer;
two views of one storage cost it once), and preallocated capacity counts, because it is held.

Reachable means: tensors (wrapper subclasses such as quanto's ``QTensor`` are unwrapped through
``__tensor_flatten__``), and the tensors inside dicts, lists, tuples, sets, dataclasses and plain
objects (their ``__dict__`` / ``__slots__``), to a bounded depth; ``nn.Module``\\ s (weights) and
types are skipped. Pass one ``seen`` set to several calls to count storages shared between
them once (e.g. per layer of a cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["held_bytes", "logical_bytes", "storage_key"]

_MAX_DEPTH = 8
_ATOMS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identity of the storage behind ``t``: (device, base address)."""
    return (str(t.device), t.untyped_storage().data_ptr())


def _tensor_bytes(t: torch.Tensor, seen: set[tuple[str, int]]) -> int:
    if t.device.type == "meta":
        return 0  # no data is held
    st = t.untyped_storage()
    nbytes = st.nbytes()
    if nbytes == 0:
        return 0
    key = (str(t.device), st.data_ptr())
    if key in seen:
        return 0
    seen.add(key)
    return int(nbytes)


def _walk(obj: Any, seen: set[tuple[str, int]], visited: set[int], depth: int) -> int:
    if depth > _MAX_DEPTH or isinstance(obj, _ATOMS) or isinstance(obj, type):
        return 0
    if id(obj) in visited:
        return 0
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = flatten()  # wrapper subclass: its data lives in inner tensors
            return sum(_walk(getattr(obj, n), seen, visited, depth + 1) for n in names)
        return _tensor_bytes(obj, seen)
    if isinstance(obj, torch.nn.Module):
        return 0
    if isinstance(obj, dict):
        return sum(_walk(v, seen, visited, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_walk(v, seen, visited, depth + 1) for v in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_walk(getattr(obj, f.name), seen, visited, depth + 1) for f in dataclasses.fields(obj))
    total = 0
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict):
        total += sum(_walk(v, seen, visited, depth + 1) for v in d.values())
    slots = getattr(type(obj), "__slots__", ())
    for s in (slots,) if isinstance(slots, str) else slots:
        if s != "__dict__" and hasattr(obj, s):
            total += _walk(getattr(obj, s), seen, visited, depth + 1)
    return total


def held_bytes(*objs: Any, seen: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct storages reachable from ``objs`` (see the module docstring).

    ``seen`` (updated in place) holds the storages already counted by earlier calls.
    """
    seen = set() if seen is None else seen
    visited: set[int] = set()
    return sum(_walk(obj, seen, visited, 0) for obj in objs)


def logical_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the tensors' own elements (``numel * element_size``), i.e. the data in use,
    whatever storage they view (``None`` entries count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
