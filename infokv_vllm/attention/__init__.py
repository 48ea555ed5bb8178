"""Attention backends that extend vLLM's paged attention with the per-slot attention signal, per platform."""
