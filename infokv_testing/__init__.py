"""Test and benchmark support, outside the installed package (pyproject's package discovery takes only
infokv_vllm): the offline models and benchmark data, a real vLLM engine in this process, a real `vllm serve` on
loopback, and eviction in a transformers cache to compare against.

It is imported from the checkout, never installed: the tests run from the checkout's root, the benchmarks put the
root on sys.path (benchmarks/checkout_root.py), and its commands run from the root
(`python -m infokv_testing.smollm2` prepares the test model and prints its directory)."""
