"""Models: GGUF conversion, the model registry and cache, loading."""
