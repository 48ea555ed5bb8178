"""Paged KV eviction: the block manager and scheduler extensions, and the compaction the workers apply."""
