"""Platform adapters: what compression needs that differs between vLLM platforms, and nothing else.

The compression core (`core/`) is the same on every platform and defines the interface an adapter implements
(`core.adapter.PlatformAdapter`): the worker class vLLM starts, which of vLLM's attention backends are wrapped to
record the attention signal (`infokv_vllm.recording_backends`), the layout of their KV pages, and the kernel family (torch
or Triton) the worker runs, chosen once from `--kv-kernels`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infokv_vllm.core.adapter import PlatformAdapter


def adapter_for_current_platform() -> PlatformAdapter | None:
    """The adapter of the platform vLLM runs on, or None where compression is not available."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from infokv_vllm.platforms.cpu import CPU_ADAPTER

        return CPU_ADAPTER
    if current_platform.is_cuda():
        from infokv_vllm.platforms.cuda import CUDA_ADAPTER

        return CUDA_ADAPTER
    return None
