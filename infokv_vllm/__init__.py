"""InfoKV: entropy-aware KV-cache compression for vLLM's paged attention."""

__version__ = "0.1.0"
