"""spectralcache.cache."""
