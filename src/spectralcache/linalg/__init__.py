"""spectralcache.linalg."""
