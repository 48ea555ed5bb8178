"""Test support, not used by the plugin at run time: the SmolLM2 model fixture, a real vLLM engine in this
process, a real `vllm serve` on loopback, and eviction in a transformers cache to compare against. The tests and
the benchmarks share them."""
