"""spectralcache.bench."""
