"""spectralcache.eval."""
