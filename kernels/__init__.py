"""Triton kernels of infokv-vllm (imported as `infokv_vllm.kernels`).

Each kernel has a PyTorch reference beside its test; every test runs on CPU under `TRITON_INTERPRET=1`.
"""
