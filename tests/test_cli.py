"""The `--kv-*` flags inside vLLM's real argument parsers and engine-config creation (no engine started)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from infokv_vllm.config import ADDITIONAL_CONFIG_KEY, CompressionConfig, CompressionConfigError

pytestmark = pytest.mark.usefixtures("vllm_plugins_loaded")


def serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.fixture
def engine_args_from(smollm2_dir):
    """Parse serve flags for the test model, as `vllm serve` does."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    def parse(flags: list[str]):
        return AsyncEngineArgs.from_cli_args(serve_parser().parse_args(["--model", str(smollm2_dir), *flags]))

    return parse


def test_flags_fold_into_additional_config(engine_args_from):
    args = engine_args_from(["--kv-compression", "infokv", "--kv-budget", "128",
                             "--kv-alpha", "0.5", "--kv-memory-pressure"])
    assert args.additional_config[ADDITIONAL_CONFIG_KEY] == {
        "method": "infokv", "budget": 128, "alpha": 0.5, "memory_pressure": True}
    config = CompressionConfig.from_additional_config(args.additional_config)
    assert config.budget == 128 and config.decode_interval == 128


def test_flags_override_additional_config_json_and_keep_the_rest(engine_args_from):
    settings = {ADDITIONAL_CONFIG_KEY: {"method": "snapkv", "sinks": 8}, "someone_else": 1}
    args = engine_args_from(["--additional-config", json.dumps(settings),
                             "--kv-compression", "streaming"])
    assert args.additional_config == {ADDITIONAL_CONFIG_KEY: {"method": "streaming", "sinks": 8},
                                      "someone_else": 1}


def test_no_flags_leave_additional_config_untouched(engine_args_from):
    assert ADDITIONAL_CONFIG_KEY not in engine_args_from([]).additional_config


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_parser().parse_args(["--model", "m", "--kv-compression", "bogus"])
    assert exit_info.value.code != 0
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_flags_have_their_own_help_group():
    groups = {group.title: group for group in serve_parser()._action_groups}
    flags = {flag for action in groups["InfoKV"]._group_actions for flag in action.option_strings}
    assert {"--kv-compression", "--kv-budget", "--kv-budget-ratio", "--kv-prefill-window",
            "--kv-decode-window", "--kv-sinks", "--kv-alpha", "--kv-entropy-top-k",
            "--kv-decode-interval", "--kv-memory-pressure"} <= flags


def test_bench_throughput_parser_has_the_flags():
    from vllm.benchmarks.throughput import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    assert parser.parse_args(["--kv-compression", "snapkv"]).kv_compression_method == "snapkv"


# --- engine config: what start-up accepts and refuses ---------------------------------------------------

def engine_config(smollm2_dir, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    kwargs = dict(model=str(smollm2_dir), dtype="float32", max_model_len=2048)
    kwargs.update(overrides)
    return EngineArgs(**kwargs).create_engine_config()


def test_compression_keeps_prefix_caching_and_selects_the_v1_runner(smollm2_dir, monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plain = engine_config(smollm2_dir)
    settings = {"method": "streaming", "budget": 128}
    config = engine_config(smollm2_dir, additional_config={ADDITIONAL_CONFIG_KEY: settings})
    assert config.cache_config.enable_prefix_caching == plain.cache_config.enable_prefix_caching is True
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    asked = engine_config(smollm2_dir, enable_prefix_caching=True, additional_config={ADDITIONAL_CONFIG_KEY: settings})
    assert asked.cache_config.enable_prefix_caching is True


def test_async_scheduling_is_left_to_vllm(smollm2_dir):
    """Compression no longer refuses --async-scheduling: vLLM decides, and its CPU platform schedules
    synchronously whatever is asked; our scheduler class is named either way."""
    from infokv_vllm.engine_config import SCHEDULER_CLS

    settings = {ADDITIONAL_CONFIG_KEY: {"method": "infokv", "budget": 128}}
    for asked in (True, None):
        config = engine_config(smollm2_dir, async_scheduling=asked, additional_config=settings)
        assert config.scheduler_config.async_scheduling is False
        assert config.scheduler_config.scheduler_cls == SCHEDULER_CLS


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_scheduler_class_follows_the_resolved_async_setting(asynchronous):
    """vLLM resolves async_scheduling after the plugin names its scheduler and instantiates the named class as
    is: CompressingScheduler becomes the AsyncScheduler variant where the engine schedules asynchronously."""
    from types import SimpleNamespace

    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from infokv_vllm.core.scheduler import CompressingAsyncScheduler, CompressingScheduler

    config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=asynchronous))
    scheduler = CompressingScheduler.__new__(CompressingScheduler, vllm_config=config)
    assert type(scheduler) is (CompressingAsyncScheduler if asynchronous else CompressingScheduler)
    assert isinstance(scheduler, AsyncScheduler) is asynchronous
    # Our overrides come before vLLM's in either class (they call vLLM's through super()).
    mro = CompressingAsyncScheduler.__mro__
    assert mro.index(CompressingScheduler) < mro.index(AsyncScheduler) < mro.index(Scheduler)


def test_method_none_changes_nothing(smollm2_dir, monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plain = engine_config(smollm2_dir)
    off = engine_config(smollm2_dir, additional_config={ADDITIONAL_CONFIG_KEY: {"method": "none"}})
    assert off.cache_config.enable_prefix_caching == plain.cache_config.enable_prefix_caching
    assert off.scheduler_config.scheduler_cls == plain.scheduler_config.scheduler_cls
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
        ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}}, "KV connectors"),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                 "prompt_lookup_max": 2}}, "speculative decoding"),
        ({"scheduler_cls": "my.Scheduler"}, "--scheduler-cls my.Scheduler cannot be combined"),
        ({"worker_cls": "my.Worker"}, "--worker-cls my.Worker cannot be combined"),
        ({"kv_cache_dtype": "fp8_per_token_head"}, "--kv-cache-dtype fp8_per_token_head is not supported with "
         "--kv-compression streaming: vLLM keeps a scale per token and KV head in a cache beside the pages"),
        ({"kv_cache_dtype": "int8_per_token_head"}, "--kv-cache-dtype int8_per_token_head is not supported"),
        ({"kv_cache_dtype": "nvfp4"}, "--kv-cache-dtype nvfp4 is not supported with --kv-compression streaming: "
         "compression reads keys and values element by element, and this format packs them"),
    ],
)
def test_incompatible_vllm_options_fail_at_start_up(smollm2_dir, overrides, message):
    settings = {ADDITIONAL_CONFIG_KEY: {"method": "streaming", "budget": 128}}
    with pytest.raises(Exception) as error:
        engine_config(smollm2_dir, additional_config=settings, **overrides)
    assert message in str(error.value), str(error.value)


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_per_tensor_fp8_caches_compress(smollm2_dir, cache_dtype):
    config = engine_config(smollm2_dir, kv_cache_dtype=cache_dtype,
                           additional_config={ADDITIONAL_CONFIG_KEY: {"method": "streaming", "budget": 128}})
    assert config.cache_config.cache_dtype == cache_dtype


def test_budget_not_below_context_length_fails(smollm2_dir):
    with pytest.raises(CompressionConfigError, match=r"--kv-budget: 4096 is not smaller than the context length"):
        engine_config(smollm2_dir, additional_config={ADDITIONAL_CONFIG_KEY: {"method": "streaming",
                                                                              "budget": 4096}})



def test_pool_wide_mode_needs_a_policy_that_records_attention(smollm2_dir):
    settings = {ADDITIONAL_CONFIG_KEY: {"method": "streaming", "pool_target": 0.5}}
    with pytest.raises(CompressionConfigError, match=r"--kv-pool-target is not supported with --kv-compression "
                                                     r"streaming .*use one of infokv, snapkv, rkv"):
        engine_config(smollm2_dir, additional_config=settings)
    engine_config(smollm2_dir, additional_config={ADDITIONAL_CONFIG_KEY: {"method": "snapkv", "pool_target": 0.5}})


@pytest.mark.parametrize("method", ["infokv", "entropy", "snapkv", "streaming"])
def test_no_policy_forces_eager_mode(smollm2_dir, method):
    """Every signal survives compilation, so vLLM's default compilation stays on."""
    from vllm.config import CompilationMode

    config = engine_config(smollm2_dir, additional_config={ADDITIONAL_CONFIG_KEY: {"method": method}})
    assert config.model_config.enforce_eager is False
    assert config.compilation_config.mode != CompilationMode.NONE


def test_triton_kernels_on_cpu_need_the_interpreter(smollm2_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(CompressionConfigError, match="--kv-kernels triton on CPU is not supported"):
        engine_config(smollm2_dir, additional_config={ADDITIONAL_CONFIG_KEY: {"method": "snapkv",
                                                                              "kernels": "triton"}})


def test_models_windowed_in_every_layer_are_refused_with_the_reason(tiny_mixtral_dir, tmp_path):
    """A Mixtral whose every layer attends within a window: vLLM already frees the pages that leave the window, and
    no layer keeps a KV that grows with the context."""
    windowed = tmp_path / "mixtral-sliding-window"
    shutil.copytree(tiny_mixtral_dir, windowed)
    config = json.loads((windowed / "config.json").read_text())
    (windowed / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    settings = {ADDITIONAL_CONFIG_KEY: {"method": "streaming", "budget": 128}}
    with pytest.raises(CompressionConfigError, match="models whose every layer has sliding-window attention is not "
                                                     "supported with --kv-compression streaming: vLLM already drops"):
        engine_config(windowed, additional_config=settings)
    assert engine_config(windowed).model_config.get_sliding_window() == 64  # without compression vLLM serves it


def test_models_with_sliding_window_layers_need_the_hybrid_kv_cache_manager(tiny_gemma3_dir):
    """Gemma 3's sliding-window layers beside full-attention ones: compressed with vLLM's hybrid KV cache manager
    (their own KV cache groups), refused with the reason without it."""
    settings = {ADDITIONAL_CONFIG_KEY: {"method": "streaming", "budget": 128}}
    compressing = engine_config(tiny_gemma3_dir, additional_config=settings)
    assert not compressing.scheduler_config.disable_hybrid_kv_cache_manager
    with pytest.raises(CompressionConfigError, match="--disable-hybrid-kv-cache-manager for models with "
                                                     "sliding-window or linear-attention layers is not supported"):
        engine_config(tiny_gemma3_dir, additional_config=settings, disable_hybrid_kv_cache_manager=True)
    assert engine_config(tiny_gemma3_dir, disable_hybrid_kv_cache_manager=True)  # vLLM serves it without compression
