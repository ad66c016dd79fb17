"""spectralcache.integrations."""
