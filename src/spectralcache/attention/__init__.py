"""spectralcache.attention."""
