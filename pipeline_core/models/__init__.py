"""What a model is and how it gets into memory: families, loading, the single-file layout, the cache."""
