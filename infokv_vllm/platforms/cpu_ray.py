"""vLLM's Ray executor on the CPU platform, for `--distributed-executor-backend ray` with compression on CPU.

vLLM 0.32 refuses Ray on CPU at any size: `CpuPlatform.ray_device_key` is empty, so `initialize_ray_cluster`
raises "current platform cpu does not support ray". Its V2 Ray executor (`RayExecutorV2`, the default) also
assumes an accelerator in three more places. This module subclasses the executor and its worker actor and
changes only those, so the plugin selects it (instead of "ray") when compression runs on CPU:

- placement-group bundles of one Ray `CPU` each: `ray_device_key` is "CPU" while the executor starts;
- actors ask for no extra resources (their bundle holds the CPU, and Ray refuses "CPU" inside `resources`);
- an actor's device ids are its rank (Ray lists no accelerator ids for CPUs);
- each actor runs pinned to its cores of `VLLM_CPU_OMP_THREADS_BIND` (e.g. "0|1": one core per rank) with as
  many OpenMP threads, what vLLM's multiprocessing executor arranges for its worker processes.

Scheduler outputs and worker outputs travel over vLLM's own message queues, pickled, as with multiprocessing, so
compression's plan and report ride along unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

from infokv_vllm.vllm_internals.swaps import ray_on_cpu


RAY_CPU_RESOURCE = "CPU"


def cores_per_rank(world_size: int) -> list[set[int]] | None:
    """The cores of each rank from VLLM_CPU_OMP_THREADS_BIND ("0|1", "0-3|4-7", "0,2|1,3"), or None when it does
    not list one set per rank (unset or "auto": no pinning)."""
    mask = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    parts = mask.split("|")
    if mask in ("auto", "all", "nobind") or len(parts) != world_size:
        return None
    ranks = []
    for part in parts:
        cores: set[int] = set()
        for piece in part.split(","):
            first, _, last = piece.partition("-")
            cores.update(range(int(first), int(last or first) + 1))
        ranks.append(cores)
    return ranks


class CPURayWorkerProc(RayWorkerProc):
    """vLLM's Ray worker actor, on a CPU."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), [self._init_kwargs["rank"]]

    def initialize_worker(self, local_rank: int, env_vars: dict[str, str], distributed_init_method: str,
                          driver_env_vars: dict[str, str] | None = None,
                          assigned_physical_gpu_ids: list[int] | None = None) -> None:
        ranks = cores_per_rank(self._parallel_config.world_size)
        if ranks is not None:
            os.sched_setaffinity(0, ranks[self._init_kwargs["rank"]])
        super().initialize_worker(local_rank, env_vars, distributed_init_method, driver_env_vars, None)


class CPURayExecutor(RayExecutorV2):
    """vLLM's V2 Ray executor, on the CPU platform."""

    @staticmethod
    def _get_actor_resource_kwargs() -> dict[str, Any]:
        return {"num_gpus": 0}

    def _build_runtime_env(self) -> dict:
        runtime_env = super()._build_runtime_env()
        ranks = cores_per_rank(self.parallel_config.world_size)
        threads = len(ranks[0]) if ranks else max(1, (os.cpu_count() or 1) // self.parallel_config.world_size)
        # OpenMP reads its thread count when the actor process starts, before any code of ours runs in it.
        runtime_env.setdefault("env_vars", {}).setdefault("OMP_NUM_THREADS", str(threads))
        return runtime_env

    def _init_executor(self) -> None:
        # vLLM creates a placement group unless one was given, and never removes it: a second engine in the same
        # Ray cluster (tests, notebooks) would wait forever for the CPUs the first one's group still holds.
        self._own_placement_group = self.parallel_config.placement_group is None
        with ray_on_cpu(CPURayWorkerProc, RAY_CPU_RESOURCE):
            super()._init_executor()

    def shutdown(self) -> None:
        super().shutdown()
        group = self.parallel_config.placement_group
        if getattr(self, "_own_placement_group", False) and group is not None:
            ray.util.remove_placement_group(group)
            self.parallel_config.placement_group = None
