"""spectralcache.attention.triton."""
