"""Every change this plugin makes to vLLM's own objects, in one place.

vLLM offers no hook for these, so they are wrapped here. Each patch names the vLLM function it wraps and why;
`tests/test_vllm_patches.py` checks every target still exists with the shape we rely on, so an upgrade of vLLM
fails loudly instead of silently running without compression. The supported range is `plugin.SUPPORTED_VLLM`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Callable

from infokv_vllm import plugin

_PATCHED_MARK = "__infokv_patched__"


def _wrap(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable], kind: type | None = None) -> None:
    """Replace `owner.name` with `make_wrapper(original)` once; `kind` re-wraps static/class methods."""
    original_attr = owner.__dict__[name]
    original = original_attr.__func__ if kind is not None else original_attr
    if getattr(original, _PATCHED_MARK, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _PATCHED_MARK, True)
    setattr(owner, name, kind(wrapper) if kind is not None else wrapper)


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    # vllm.engine.arg_utils.EngineArgs.add_cli_args (staticmethod): the engine flags of `vllm serve`,
    # `vllm bench throughput` and friends are built here; our `--kv-*` group joins them. vLLM loads general
    # plugins before calling it (AsyncEngineArgs.add_cli_args), so the wrapper is in place in time.
    def add_cli_args(original: Callable) -> Callable:
        def wrapper(parser):
            parser = original(parser)
            plugin.add_cli_args(parser)
            return parser
        return wrapper

    _wrap(EngineArgs, "add_cli_args", add_cli_args, staticmethod)

    # vllm.engine.arg_utils.EngineArgs.from_cli_args (classmethod): copies only EngineArgs' own dataclass
    # fields from the namespace, so our flags would be dropped; fold them into `additional_config`.
    def from_cli_args(original: Callable) -> Callable:
        def wrapper(cls, args):
            engine_args = original(cls, args)
            engine_args.additional_config = plugin.fold_cli_args(args, engine_args.additional_config)
            return engine_args
        return wrapper

    _wrap(EngineArgs, "from_cli_args", from_cli_args, classmethod)

    # vllm.engine.arg_utils.EngineArgs.create_engine_config: the one place every entry point (CLI, LLM(...),
    # AsyncLLM, benchmarks) turns arguments into a VllmConfig, before any engine process starts. We adjust
    # defaults compression needs and refuse incompatible options here, so bad settings fail at start-up.
    def create_engine_config(original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            plugin.prepare_engine_args(self)
            vllm_config = original(self, *args, **kwargs)
            plugin.check_engine_config(vllm_config)
            return vllm_config
        return wrapper

    _wrap(EngineArgs, "create_engine_config", create_engine_config)

    # vllm.v1.engine.EngineCoreOutputs.scheduler_stats: the frontend's msgspec decoder builds the per-step
    # SchedulerStats from this annotation and drops every field it does not declare, so the compression counters
    # would never reach the stat loggers. Declaring our subclass (a superset) lets them through. Plugins are
    # registered before vLLM builds its decoders, and msgspec reads the annotation when a decoder is built.
    from vllm.v1.engine import EngineCoreOutputs

    from infokv_vllm.metrics import CompressionSchedulerStats

    EngineCoreOutputs.__annotations__["scheduler_stats"] = CompressionSchedulerStats | None


@contextlib.contextmanager
def cpu_model_runner_class(runner_cls: type) -> Iterator[None]:
    """While active, vLLM's CPU worker builds `runner_cls` as its model runner.

    vllm.v1.worker.cpu_worker.CPUWorker.init_device constructs the V1 runner through the module-global name
    `CPUModelRunner` (and sets up threads, memory and distributed state around it, which we must not copy), so
    the name is swapped for the duration of that call only.
    """
    from vllm.v1.worker import cpu_worker

    original = cpu_worker.CPUModelRunner
    cpu_worker.CPUModelRunner = runner_cls
    try:
        yield
    finally:
        cpu_worker.CPUModelRunner = original


@contextlib.contextmanager
def cpu_attention_backend(class_path: str) -> Iterator[None]:
    """While active, models built in this process use the attention backend at `class_path` on CPU.

    vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls always answers `CPU_ATTN`, whose class path vLLM's
    registry lets us override (`register_backend`); but vllm.v1.attention.selector._cached_get_attn_backend
    caches the resolved class per process, so the cache is cleared on entry and on exit. Other engines in the
    same process (tests, benchmarks) keep vLLM's own backend.
    """
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    member = AttentionBackendEnum.CPU_ATTN
    previous = member.get_path() if member.is_overridden() else None
    register_backend(member, class_path)
    selector._cached_get_attn_backend.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            member.clear_override()
        else:
            register_backend(member, previous)
        selector._cached_get_attn_backend.cache_clear()
