"""vLLM's module globals that the plugin swaps for the duration of one call.

vLLM builds some of its objects through a module-global name (the CPU worker's model runner, the Ray executor's
worker actor) or resolves them through a per-process registry (attention backends), with no hook to pass our
class. Each context manager here points that name at ours while the call runs and restores vLLM's on exit, so
other engines in the process keep vLLM's own. Each name is listed in `manifest.VLLM_INTERNALS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def cpu_model_runner_class(runner_cls: type) -> Iterator[None]:
    """While active, vLLM's CPU worker builds `runner_cls` as its model runner.

    `CPUWorker.init_device` constructs the V1 runner through the module-global name `CPUModelRunner` (and sets up
    threads, memory and distributed state around it, which we must not copy), so the name is swapped for the
    duration of that call only.
    """
    from vllm.v1.worker import cpu_worker

    original = cpu_worker.CPUModelRunner
    cpu_worker.CPUModelRunner = runner_cls
    try:
        yield
    finally:
        cpu_worker.CPUModelRunner = original


@contextlib.contextmanager
def attention_backends(class_paths: dict[str, str]) -> Iterator[None]:
    """While active, models built in this process use, for each named `AttentionBackendEnum` member, the backend
    class at its path instead (e.g. {"CPU_ATTN": "...RecordingCPUAttentionBackend"}).

    vLLM's platforms resolve a backend through its enum member, whose class path the registry lets us override
    (`register_backend`); but `selector._cached_get_attn_backend` caches the resolved class per process, so the
    cache is cleared on entry and on exit. Other engines in the same process (tests, benchmarks) keep vLLM's own
    backends.
    """
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    previous = {}
    for name, class_path in class_paths.items():
        member = AttentionBackendEnum[name]
        previous[member] = member.get_path() if member.is_overridden() else None
        register_backend(member, class_path)
    selector._cached_get_attn_backend.cache_clear()
    try:
        yield
    finally:
        for member, path in previous.items():
            if path is None:
                member.clear_override()
            else:
                register_backend(member, path)
        selector._cached_get_attn_backend.cache_clear()


@contextlib.contextmanager
def ray_on_cpu(worker_proc_cls: type, device_key: str) -> Iterator[None]:
    """While active (vLLM's V2 Ray executor starting on the CPU platform): the CPU platform names `device_key`
    (Ray's CPU resource) as its Ray device, and the executor builds its worker actors from `worker_proc_cls`.

    vLLM 0.32's CPU platform has an empty `ray_device_key`, so `initialize_ray_cluster` refuses Ray on CPU, and
    `RayExecutorV2._init_executor` creates its actors through the module-global name `RayWorkerProc`; both are
    swapped for the duration of that call only.
    """
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_executor_v2

    device_key_before, worker_proc_before = CpuPlatform.ray_device_key, ray_executor_v2.RayWorkerProc
    CpuPlatform.ray_device_key = device_key
    ray_executor_v2.RayWorkerProc = worker_proc_cls
    try:
        yield
    finally:
        CpuPlatform.ray_device_key, ray_executor_v2.RayWorkerProc = device_key_before, worker_proc_before
