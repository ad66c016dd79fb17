"""spectralcache.attention.triton: fused Triton kernels over the compressed cache state.

``decode_attention(query, state, attention_mask=None, scaling=None, softcap=None)`` is the
fused decode attention (see ``decode.py``; kernels in ``decode_splits.py`` and
``combine_splits.py``). Importing this package needs Triton; callers that must work without it
import it lazily (``spectralcache.attention.interface.attend``).
"""

from spectralcache.attention.triton.decode import MAX_ROWS, decode_attention, interpreter_enabled

__all__ = ["MAX_ROWS", "decode_attention", "interpreter_enabled"]
