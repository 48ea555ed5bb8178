"""CompressionConfig: defaults, budgets and the errors a user sees for bad values."""

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infokv_vllm.config import (
    ADDITIONAL_CONFIG_KEY,
    DEFAULT_BUDGET_TOKENS,
    REQUEST_SETTINGS,
    CompressionConfig,
    CompressionConfigError,
    engine_setting_names,
    flag_name,
    misspelt_request_settings,
)
from infokv_vllm.scoring import policy_parameters


def test_absent_settings_mean_compression_off():
    assert not CompressionConfig.from_additional_config(None).enabled
    assert not CompressionConfig.from_additional_config({"other_plugin": 1}).enabled


def test_method_name_alone_is_accepted():
    config = CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: "snapkv"})
    assert config.method == "snapkv" and config.enabled


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "bogus"}, "--kv-compression: 'bogus' is not one of"),
        ({"method": "infokv", "budget": 20}, "must exceed sinks + window = 36"),
        ({"method": "infokv", "budget_ratio": 1.5}, "--kv-budget-ratio: 1.5 is outside (0, 1]"),
        ({"method": "infokv", "alpha": -0.1}, "--kv-alpha"),
        ({"method": "infokv", "redundancy": 1.5}, "--kv-redundancy: 1.5 is outside [0, 1]"),
        ({"method": "infokv", "entropy_top_k": 1}, "--kv-entropy-top-k"),
        ({"method": "infokv", "pooling_kernel": 4}, "odd"),
        ({"method": "infokv", "sinks": -1}, "--kv-sinks"),
        ({"method": "infokv", "decode_interval": 0}, "--kv-decode-interval"),
        ({"method": "infokv", "entropy_score": "max"}, "--kv-entropy-score"),
        ({"method": "infokv", "budgte": 128}, "unknown setting(s) ['budgte']"),
        ({"method": "infokv", "pool_target": 0}, "--kv-pool-target: 0.0 is outside (0, 1]"),
        ({"method": "infokv", "pool_target": 1.2}, "--kv-pool-target: 1.2 is outside (0, 1]"),
    ],
)
def test_invalid_settings_name_the_option(settings, message):
    with pytest.raises(CompressionConfigError) as error:
        CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: settings})
    assert message in str(error.value)


def test_non_dict_settings_are_rejected():
    with pytest.raises(CompressionConfigError, match="must be a dict"):
        CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: 128})


def test_budgets():
    assert CompressionConfig(method="infokv").budget_for(10_000, 100) == DEFAULT_BUDGET_TOKENS
    assert CompressionConfig(method="infokv", budget=128).budget_for(1000, 100) == 128
    # A request shorter than its budget keeps everything.
    assert CompressionConfig(method="infokv", budget=128).budget_for(100, 50) == 100
    assert CompressionConfig(method="infokv", budget_ratio=0.25).budget_for(1000, 100) == 250
    # A ratio never cuts into the sinks and window.
    assert CompressionConfig(method="infokv", budget_ratio=0.01).budget_for(1000, 100) == 37


def test_pool_wide_floors_are_the_budgets_given_or_what_compression_always_keeps():
    pool = CompressionConfig(method="infokv", pool_target=0.7)
    assert pool.pool_wide and pool.kv_bound is None  # the batch decides each request's KV
    assert pool.budget_for(1000, 100) == 37  # sinks 4 + window 32 + 1, not the default budget
    assert pool.budget_for(20, 20) == 20
    assert dataclasses.replace(pool, keep_prompt=True).budget_for(1000, 100) == 137
    assert pool.for_request({"kv_budget": 256}).budget_for(1000, 100) == 256
    assert pool.for_request({"kv_budget_ratio": 0.5}).budget_for(1000, 100) == 500
    assert not CompressionConfig(pool_target=0.7).pool_wide  # compression off


def test_a_budget_with_a_ratio_is_its_floor():
    config = CompressionConfig(method="infokv", budget_ratio=0.25, budget=128)
    assert config.budget_for(120, 120) == 120  # a short question is kept whole, not cut to 30 tokens
    assert config.budget_for(400, 120) == 128
    assert config.budget_for(1000, 120) == 250
    assert config.kv_bound is None  # the ratio still grows with the length


def test_keep_prompt_protects_the_prompt_and_budgets_the_rest():
    config = CompressionConfig(method="infokv", budget=64, keep_prompt=True)
    assert config.budget_for(120, 120) == 120  # never compressed after the prompt
    assert config.budget_for(300, 120) == 120 + 64
    assert config.protected_len(120) == 120
    assert CompressionConfig(method="infokv", budget=64).protected_len(120) == 4  # the sinks
    ratio = CompressionConfig(method="infokv", budget_ratio=0.5, keep_prompt=True)
    assert ratio.budget_for(1120, 120) == 120 + 500  # a share of the generated tokens
    assert config.kv_bound == 64 + 128  # beside the prompt, which admission adds


@pytest.mark.parametrize(("extra_args", "expected"), [
    ({"kv_keep_prompt": True}, {"keep_prompt": True, "budget": 256}),
    ({"kv_budget": 64, "kv_budget_ratio": 0.5}, {"budget": 64, "budget_ratio": 0.5}),
    ({"kv_budget_ratio": 0.5}, {"budget": None, "budget_ratio": 0.5}),
])
def test_per_request_budget_settings(extra_args, expected):
    settings = CompressionConfig(method="infokv", budget=256).for_request(extra_args)
    assert {name: getattr(settings, name) for name in expected} == expected


@pytest.mark.parametrize(("value", "expected"), [(True, True), (1, True), ("false", False), (0, False)])
def test_per_request_keep_prompt_takes_what_vllm_xargs_carries(value, expected):
    # vLLM's vllm_xargs schema has no booleans: JSON true arrives as 1.
    assert CompressionConfig(method="infokv").for_request({"kv_keep_prompt": value}).keep_prompt is expected


@pytest.mark.parametrize("value", ["yes", 2, 1.0])
def test_per_request_keep_prompt_must_be_a_boolean(value):
    with pytest.raises(CompressionConfigError, match=f"kv_keep_prompt: {value!r} is not true or false"):
        CompressionConfig(method="infokv").for_request({"kv_keep_prompt": value})


# --- one typed validation path: hostile values never escape as raw Python errors -------------------------------

HOSTILE_VALUES = [float("nan"), float("inf"), -float("inf"), 10**400, -(10**400), 1e300, -0.0, 0, -1, 1, 2.5, True,
                  False, None, "", "128", "false", "none", [1], [], {"a": 1}, {}]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)
SETTINGS = [*engine_setting_names(), *policy_parameters()]


def accepted_or_named(build, field_name: str, shown_as: str) -> CompressionConfig | None:
    """Build the settings; an error must be ours, naming the field as the user gave it."""
    try:
        return build()
    except CompressionConfigError as error:
        assert error.field == field_name and shown_as in str(error), str(error)
        return None


# The settings whose default (None) does not show their type.
OPTIONAL_TYPES = {"budget": int, "budget_ratio": float, "pool_target": float}


def assert_well_typed(config: CompressionConfig) -> None:
    settings = [(config, setting) for setting in dataclasses.fields(config) if setting.name != "policy"]
    if config.policy is not None:
        settings += [(config.policy, setting) for setting in dataclasses.fields(config.policy)]
    for owner, setting in settings:
        value = getattr(owner, setting.name)
        if value is None:
            assert setting.name in OPTIONAL_TYPES
            continue
        declared = OPTIONAL_TYPES.get(setting.name, type(setting.default))
        assert type(value) is declared, (setting.name, value)
        assert declared is not float or math.isfinite(value), (setting.name, value)


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=repr)
def test_server_settings_take_declared_types_only(name, value):
    settings = {"method": "infokv", name: value}
    config = accepted_or_named(lambda: CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: settings}),
                               name, flag_name(name))
    if config is not None:
        assert_well_typed(config)
        assert config.enabled or name == "method"


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(SETTINGS), value=JSON_VALUES)
def test_any_json_value_for_a_server_setting_is_accepted_or_refused_by_name(name, value):
    settings_given = {"method": "infokv", name: value}
    config = accepted_or_named(
        lambda: CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: settings_given}), name,
        flag_name(name))
    if config is not None:
        assert_well_typed(config)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(REQUEST_SETTINGS)), value=JSON_VALUES)
def test_any_json_value_for_a_request_setting_is_accepted_or_refused_by_name(key, value):
    server = CompressionConfig(method="infokv", budget=256)
    config = accepted_or_named(lambda: server.for_request({key: value}), key, f"vllm_xargs.{key}")
    if config is not None:
        assert_well_typed(config)


@pytest.mark.parametrize(("settings", "message"), [
    ({"budget": 1e3}, "--kv-budget: 1000.0 is not an integer"),
    ({"budget": "128"}, "--kv-budget: '128' is not an integer"),
    ({"budget": True}, "--kv-budget: True is not an integer"),
    ({"keep_prompt": "false"}, "--kv-keep-prompt: 'false' is not true or false"),
    ({"memory_pressure": "no"}, "--kv-memory-pressure: 'no' is not true or false"),
    ({"memory_pressure": 1}, "--kv-memory-pressure: 1 is not true or false"),
    ({"alpha": float("nan")}, "--kv-alpha: nan is not a finite number"),
    ({"budget_ratio": 10**400}, "--kv-budget-ratio: 1000"),
    ({"sinks": 10**400}, "--kv-sinks: 1000"),
    ({"method": ["infokv"]}, "--kv-compression: ['infokv'] is not a string"),
    ({"prefill_window": 2048}, "--kv-prefill-window: 2048 leaves the default budget (1024 tokens) no room"),
])
def test_mistyped_server_settings_are_refused_by_name(settings, message):
    with pytest.raises(CompressionConfigError) as error:
        CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: {"method": "infokv", **settings}})
    assert message in str(error.value)


def test_a_window_beyond_the_default_budget_is_fine_with_a_budget_of_its_own():
    config = CompressionConfig(method="infokv", prefill_window=2048, budget=4096)
    assert config.budget_for(10_000, 100) == 4096


@pytest.mark.parametrize(("extra_args", "message"), [
    ({"kv_budget": float("inf")}, "vllm_xargs.kv_budget: inf is not an integer"),
    ({"kv_budget": 10**400}, "vllm_xargs.kv_budget: 1000"),
    ({"kv_budget": "1.5"}, "vllm_xargs.kv_budget: '1.5' is not an integer"),
    ({"kv_budget": [128]}, "vllm_xargs.kv_budget: [128] is not an integer"),
    ({"kv_budget_ratio": "nan"}, "vllm_xargs.kv_budget_ratio: 'nan'"),
    ({"kv_keep_prompt": [1]}, "vllm_xargs.kv_keep_prompt: [1] is not true or false"),
    ({"kv_compression": {"x": 1}}, "vllm_xargs.kv_compression: {'x': 1}: a request may give 'none'"),
])
def test_hostile_request_settings_are_refused_by_name(extra_args, message):
    with pytest.raises(CompressionConfigError) as error:
        CompressionConfig(method="infokv").for_request(extra_args)
    assert message in str(error.value)


@pytest.mark.parametrize("server", [CompressionConfig(), CompressionConfig(method="infokv", budget=128)])
def test_extra_arguments_that_are_not_ours_pass_untouched(server):
    """vLLM's `kv_transfer_params` (KV connectors) and other extensions' keys are not compression settings."""
    extra_args = {"kv_transfer_params": {"do_remote_prefill": True}, "kv_other": "x", "budget": 1}
    assert server.for_request(extra_args) is server


def test_misspelt_request_settings_are_named_with_the_setting_they_resemble():
    extra_args = {"kv_budgte": 64, "kv_keep_promt": True, "kv_transfer_params": {}, "kv_budget": 64, 3: "x"}
    assert misspelt_request_settings(extra_args) == {"kv_budgte": "kv_budget", "kv_keep_promt": "kv_keep_prompt"}
