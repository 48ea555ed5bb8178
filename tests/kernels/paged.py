"""Random paged layouts for the kernel tests: ragged requests on shuffled blocks of one pool (the same helper the
start-up self-check uses)."""

from infokv_vllm.kernels.selfcheck import shuffled_block_table

__all__ = ["shuffled_block_table"]
