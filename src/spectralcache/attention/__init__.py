"""spectralcache.attention: attention computed directly on the compressed cache state.

``reference`` holds the torch implementation (and the dense references tests compare it
to); ``interface`` registers it with transformers as the ``"spectral"`` attention.
"""

from spectralcache.attention.reference import dense_reference, spectral_attention

__all__ = ["dense_reference", "spectral_attention"]
