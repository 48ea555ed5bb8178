"""Guards for every vLLM internal we rely on and every patch into vLLM: if vLLM moves or changes one of these,
fail here, loudly (no engine is started)."""

from __future__ import annotations

import inspect
import pkgutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from infokv_vllm import engine_config, plugin
from infokv_vllm.vllm_internals import manifest, patches, vllm_version_supported
from infokv_vllm.config import CompressionConfigError


def test_entry_points_are_discoverable():
    found = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert found.get("infokv") == "infokv_vllm.plugin:register"
    from vllm.plugins import STAT_LOGGER_PLUGINS_GROUP

    # No stat-logger plugin: vLLM would load it for every engine and collect stats under --disable-log-stats; our
    # metrics join an engine's loggers where compression is on (patches.stat_loggers, AsyncLLM.__init__).
    assert not [ep for ep in entry_points(group=STAT_LOGGER_PLUGINS_GROUP) if ep.value.startswith("infokv_vllm")]


def test_installed_vllm_is_supported():
    import vllm

    assert vllm_version_supported(vllm.__version__), vllm.__version__


@pytest.mark.parametrize("internal", manifest.VLLM_INTERNALS, ids=lambda internal: internal.target)
def test_vllm_internal_we_rely_on_still_has_our_shape(internal):
    target = manifest.resolve(internal.target)
    if internal.params is not None:
        function = target.__func__ if isinstance(target, (staticmethod, classmethod)) else target
        names = list(inspect.signature(function).parameters)
        assert names[: len(internal.params)] == list(internal.params), (internal.target, names)
    for snippet in internal.source_has:
        assert snippet in inspect.getsource(target), (internal.target, snippet)
    if internal.fields:
        declared = getattr(target, "_fields", None) or getattr(target, "__annotations__", {})
        if hasattr(target, "__dataclass_fields__"):
            declared = target.__dataclass_fields__
        missing = [name for name in internal.fields if name not in declared]
        assert not missing, (internal.target, missing)


def test_every_vllm_override_of_ours_is_listed():
    """Each method our vLLM subclasses override is in the list, so a renamed vLLM method cannot silently leave
    our override uncalled."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.utils import AttentionGroup

    from infokv_vllm.core.block_manager import CompactingAttentionManager, CompressedAttentionSpec
    from infokv_vllm.core.kept_lengths import KeptLengthsAttentionGroup
    from infokv_vllm.core.runner import CompressingRunnerMixin
    from infokv_vllm.core.scheduler import CompressingScheduler
    from infokv_vllm.core.worker import CompressingWorkerMixin
    from infokv_vllm.platforms.cpu_ray import CPURayExecutor, CPURayWorkerProc

    listed = {internal.target for internal in manifest.VLLM_INTERNALS}
    for ours, theirs in ((CompressingRunnerMixin, GPUModelRunner), (CompressingScheduler, Scheduler),
                         (CompactingAttentionManager, FullAttentionManager),
                         (CompressedAttentionSpec, FullAttentionSpec), (CPURayExecutor, RayExecutorV2),
                         (CPURayWorkerProc, RayWorkerProc), (CompressingWorkerMixin, CPUWorker),
                         (CompressingWorkerMixin, Worker), (KeptLengthsAttentionGroup, AttentionGroup)):
        for name, value in vars(ours).items():
            if callable(value) and hasattr(theirs, name) and not name.startswith("__"):
                assert f"{theirs.__module__}.{theirs.__qualname__}.{name}" in listed, (ours.__name__, name)


def test_patch_targets_have_the_shape_we_wrap():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    raw = EngineArgs.__dict__
    assert isinstance(raw["add_cli_args"], staticmethod)
    assert isinstance(raw["from_cli_args"], classmethod)
    assert list(inspect.signature(raw["add_cli_args"].__func__).parameters) == ["parser"]
    assert list(inspect.signature(raw["from_cli_args"].__func__).parameters) == ["cls", "args"]
    assert "create_engine_config" in raw
    # Our wrappers on EngineArgs reach the async variant only if it does not override them.
    assert "from_cli_args" not in AsyncEngineArgs.__dict__
    assert "create_engine_config" not in AsyncEngineArgs.__dict__
    # vLLM loads general plugins before building the engine flags, so the CLI wrapper is in place in time.
    assert "load_general_plugins()" in inspect.getsource(AsyncEngineArgs.add_cli_args)


@pytest.mark.usefixtures("vllm_plugins_loaded")
def test_registration_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    before = EngineArgs.create_engine_config
    plugin._registered = False  # as in a fresh process that already imported the patched class
    plugin.register()
    assert EngineArgs.create_engine_config is before


def wrapped_functions() -> dict[str, object]:
    """The listed vLLM functions a patch has wrapped, by dotted path."""
    found = {}
    for internal in manifest.VLLM_INTERNALS:
        target = manifest.resolve(internal.target)
        function = target.__func__ if isinstance(target, (staticmethod, classmethod)) else target
        if patches.is_patched(function):
            found[internal.target] = function
    return found


@pytest.mark.usefixtures("vllm_plugins_loaded")
def test_registration_applies_every_patch_once_to_what_the_list_says_it_wraps():
    modules = sorted(module.name for module in pkgutil.iter_modules(patches.__path__))
    assert sorted(patch.__name__.rpartition(".")[2] for patch in plugin.PATCHES) == modules
    wrapped = wrapped_functions()
    assert set(wrapped) == {internal.target for internal in manifest.VLLM_INTERNALS
                            if internal.why.startswith("wrapped:")}
    plugin._registered = False  # as in a fresh process that already imported the patched classes
    plugin.register()
    for patch in plugin.PATCHES:
        patch.apply()
    assert wrapped_functions() == wrapped


@pytest.fixture
def unsupported_vllm(monkeypatch):
    """vLLM reports a version outside the supported range, in a process whose plugin has not registered yet."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(EngineArgs, "create_engine_config", EngineArgs.create_engine_config)
    return EngineArgs


@pytest.mark.parametrize("argv", [
    ["vllm", "serve", "model", "--kv-compression", "infokv"],
    ["vllm", "serve", "model", "--kv-budget=128"],
    ["vllm", "serve", "model", "--additional-config", '{"kv_compression": {"method": "snapkv"}}'],
    ["vllm", "serve", "model", '--additional-config={"kv_compression": "infokv"}'],
])
def test_unsupported_vllm_stops_a_command_line_that_asks_for_compression(unsupported_vllm, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"supports vLLM >=0.32,<0.33, but vLLM 0.40.1 is installed"):
        plugin.register()


def test_unsupported_vllm_stops_an_engine_that_asks_for_compression(unsupported_vllm, monkeypatch, smollm2_dir):
    monkeypatch.setattr(sys, "argv", ["python", "script.py"])
    plugin.register()
    engine_args = unsupported_vllm(model=str(smollm2_dir), additional_config={"kv_compression": {"method": "infokv"}})
    with pytest.raises(CompressionConfigError, match=r"supports vLLM >=0.32,<0.33, but vLLM 0.40.1"):
        engine_args.create_engine_config()


@pytest.mark.parametrize("argv", [
    ["vllm", "serve", "model"],
    ["vllm", "serve", "model", "--additional-config", '{"kv_compression": "none", "other": 1}'],
])
def test_unsupported_vllm_leaves_engines_without_compression_to_vllm(unsupported_vllm, monkeypatch, argv,
                                                                     smollm2_dir):
    monkeypatch.setattr(sys, "argv", argv)
    plugin.register()
    engine_args = unsupported_vllm(model=str(smollm2_dir), dtype="float32", additional_config={"other": 1})
    vllm_config = engine_args.create_engine_config()
    assert vllm_config.scheduler_config.scheduler_cls != engine_config.SCHEDULER_CLS
    assert vllm_config.additional_config == {"other": 1}


def test_cpu_worker_builds_its_runner_through_the_module_name_we_swap():
    from vllm.v1.worker import cpu_worker

    from infokv_vllm.vllm_internals.swaps import cpu_model_runner_class

    assert "CPUModelRunner(self.vllm_config" in inspect.getsource(cpu_worker.CPUWorker.init_device)
    original = cpu_worker.CPUModelRunner
    with cpu_model_runner_class(int):
        assert cpu_worker.CPUModelRunner is int
    assert cpu_worker.CPUModelRunner is original


def test_ray_on_cpu_swaps_the_device_key_and_actor_class_for_its_scope_only():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_executor_v2

    from infokv_vllm.vllm_internals.swaps import ray_on_cpu

    device_key, worker_proc = CpuPlatform.ray_device_key, ray_executor_v2.RayWorkerProc
    assert "ray.remote(RayWorkerProc)" in inspect.getsource(ray_executor_v2.RayExecutorV2._init_executor)
    with ray_on_cpu(int, "CPU"):
        assert (CpuPlatform.ray_device_key, ray_executor_v2.RayWorkerProc) == ("CPU", int)
    assert (CpuPlatform.ray_device_key, ray_executor_v2.RayWorkerProc) == (device_key, worker_proc)


def test_cpu_attention_backend_override_is_scoped():
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from infokv_vllm.vllm_internals.swaps import attention_backends
    from infokv_vllm.platforms.cpu import RECORDING_BACKENDS

    scoring = RECORDING_BACKENDS.backends["CPU_ATTN"]
    assert hasattr(selector._cached_get_attn_backend, "cache_clear")
    default = AttentionBackendEnum.CPU_ATTN.get_path()
    path = f"{scoring.__module__}.{scoring.__qualname__}"
    with attention_backends({"CPU_ATTN": path}):
        assert AttentionBackendEnum.CPU_ATTN.get_class() is scoring
    assert AttentionBackendEnum.CPU_ATTN.get_path() == default


DECODED_STATS = """
import sys
from vllm.plugins import load_general_plugins
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder
from infokv_vllm.metrics import CompressionSchedulerStats, CompressionStats
from infokv_vllm.vllm_internals.patches.stats_decoding import decode_compression_stats

load_general_plugins()
if sys.argv[1] == "on":
    decode_compression_stats()
sent = CompressionSchedulerStats.extend(SchedulerStats(num_running_reqs=3), CompressionStats(events=2))
received = MsgpackDecoder(EngineCoreOutputs).decode(
    MsgpackEncoder().encode(EngineCoreOutputs(outputs=[], scheduler_stats=sent))).scheduler_stats
print(type(received).__name__, received.num_running_reqs, getattr(received, "compression", None))
"""


@pytest.mark.parametrize(("compression", "decoded"), [
    ("on", "CompressionSchedulerStats 3 CompressionStats(events=2,"),
    ("off", "SchedulerStats 3 None"),
])
def test_compression_stats_survive_the_engine_to_frontend_trip_only_where_compression_is_on(compression, decoded):
    """vLLM's own encoder and decoder for engine-core outputs, as the engine core and the frontend use them, in a
    fresh process (msgspec reads the annotations once per process)."""
    printed = subprocess.run([sys.executable, "-c", DECODED_STATS, compression], capture_output=True, text=True,
                             check=True, timeout=300).stdout
    assert printed.startswith(decoded), printed
