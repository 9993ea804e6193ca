"""Stage 1, images: references, OCI documents, the registry client, sources, the cache, layers."""
