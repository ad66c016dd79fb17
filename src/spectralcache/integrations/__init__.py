"""spectralcache.integrations: making models attend through a SpectralCache.

* ``transformers``: ``enable`` / ``disable`` switch a transformers model to spectral attention.
* ``guard``: installed by ``enable``; a forward given a SpectralCache that its attention did not
  update and read raises ``SpectralCacheBypassedError``.
* ``unsloth``: ``patch_unsloth_attention`` / ``unpatch_unsloth_attention`` for models loaded
  with Unsloth (whose inference path would otherwise drop the cache).
* ``compat``: the cache keyword the installed transformers takes (``cache`` since 5.24,
  ``past_key_values`` before).
"""
