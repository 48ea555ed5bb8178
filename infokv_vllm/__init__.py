"""InfoKV: entropy-aware KV-cache compression for vLLM's paged attention."""

import logging

__version__ = "0.1.0"

# A child of vLLM's `vllm` logger, which is the only one vLLM configures: our records go where vLLM's go, at its
# level (VLLM_LOGGING_LEVEL), in every process, also before the plugin is registered there (the API server
# prepares the engine arguments, and logs the CUDA graph downgrade, before it loads plugins).
logger = logging.getLogger("vllm.infokv")
