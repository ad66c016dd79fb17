"""Which implementation reads a compressed layer: the fused Triton kernel or the torch reference.

``attend(query, state, attention_mask, scaling, softcap, backend)`` is what the ``"spectral"``
attention function calls. ``backend`` comes from ``SpectralConfig.attention_backend``; the
environment variable ``SPECTRALCACHE_ATTENTION_BACKEND`` (same values), when set, overrides it:

* ``"auto"`` (default): the kernel when the query is on CUDA, Triton imports, and the call is a
  decode (``groups * q_len <= MAX_ROWS`` query rows per KV head); the torch reference otherwise
  (CPU, prefill, Triton missing, or a state the kernel refuses — warned once per reason);
* ``"triton"``: the kernel for every call it handles (decode and short speculative queries);
  raises when it cannot run at all (Triton missing, or CPU tensors without ``TRITON_INTERPRET=1``).
  A prefill (more query rows than ``MAX_ROWS``) still takes the torch reference: the kernel is
  a decode kernel;
* ``"torch"``: always the torch reference (``spectral_attention``).

This module imports neither Triton nor the kernels until they are needed.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from spectralcache.attention.reference import spectral_attention
from spectralcache.cache.state import SpectralLayerState
from spectralcache.config import ATTENTION_BACKENDS

__all__ = ["ATTENTION_BACKENDS", "BACKEND_ENV", "MAX_ROWS", "attend", "resolve_backend", "triton_available"]

BACKEND_ENV = "SPECTRALCACHE_ATTENTION_BACKEND"
# Query rows of one KV head the kernel handles in one program: groups * q_len (its tile is padded
# to >= 16). Defined here, where choosing a backend needs no Triton import; decode.py reads it.
MAX_ROWS = 64


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports (the kernels can be built)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str | None = "auto") -> str:
    """The backend in force: ``$SPECTRALCACHE_ATTENTION_BACKEND`` if set, else ``backend``."""
    env = os.environ.get(BACKEND_ENV, "").strip()
    chosen = env or (backend or "auto")
    if chosen not in ATTENTION_BACKENDS:
        source = f"${BACKEND_ENV}" if env else "attention_backend"
        raise ValueError(f"{source} must be one of {ATTENTION_BACKENDS}, got {chosen!r}")
    return chosen


def _is_decode(query: torch.Tensor, state: SpectralLayerState) -> bool:
    shape = query.shape
    n_kv = state.hot_keys.shape[1]
    if len(shape) != 4 or n_kv == 0 or shape[1] % n_kv:
        return False  # let the reference raise its clear error
    return (shape[1] // n_kv) * shape[2] <= MAX_ROWS


def attend(
    query: torch.Tensor,
    state: SpectralLayerState,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Attention of ``query`` [B, Hq, q, D] over a compressed layer -> [B, Hq, q, D] (see module doc)."""
    chosen = resolve_backend(backend)
    if chosen == "triton":
        if not triton_available():
            raise RuntimeError(
                f"attention backend 'triton' was requested (config or ${BACKEND_ENV}) but Triton "
                "does not import; install it (pip install triton) or use 'auto' / 'torch'"
            )
        if _is_decode(query, state):
            from spectralcache.attention.triton.decode import decode_attention

            return decode_attention(query, state, attention_mask, scaling, softcap)
    elif chosen == "auto" and query.is_cuda and _is_decode(query, state) and triton_available():
        from spectralcache.attention.triton.decode import decode_attention

        try:
            return decode_attention(query, state, attention_mask, scaling, softcap)
        except (ValueError, TypeError) as exc:
            # a state the kernel refuses (e.g. pre-RoPE blocks without inv_freq): the reference reads
            # it, or raises its own clear error for a truly bad input
            _warn_once(
                f"spectral attention: Triton kernel refused this call ({exc}); using the torch reference"
            )
    return spectral_attention(query, state, attention_mask, scaling=scaling, softcap=softcap)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
