"""spectralcache.integrations: switching transformers models to spectral attention
(``integrations.transformers.enable`` / ``disable``)."""
