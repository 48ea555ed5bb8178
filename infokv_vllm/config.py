"""The compression settings: one typed dataclass, owned here, read by every module above the policies.

`CompressionConfig` holds the engine-wide settings (method, budget, windows, schedule, pool, memory pressure)
and the chosen policy, a `scoring.ScoringPolicy` dataclass holding its own parameters. Users give both as one flat
set of settings (`--kv-*` flags, or keys of `additional_config`); `from_settings` sorts them. The settings travel
to the engine core and the workers inside vLLM's `additional_config` (a plain dict that vLLM pickles to every
process), under the key `ADDITIONAL_CONFIG_KEY`. The CLI flags in `plugin.py` and the docs' tables are generated
from the fields below and from the policy registry, so a new engine-wide knob is one field here, and a policy's
knob one field of its dataclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from infokv_vllm.scoring import POLICIES, ScoringPolicy, policies_with, policy_parameters
from infokv_vllm.setting_checks import SettingError, check_settings, finite

ADDITIONAL_CONFIG_KEY = "kv_compression"

Kernels = Literal["auto", "torch", "triton"]
KERNELS: tuple[str, ...] = get_args(Kernels)

# Used when compression is on and neither `budget` nor `budget_ratio` is given.
DEFAULT_BUDGET_TOKENS = 1024


def method_names() -> tuple[str, ...]:
    """The `--kv-compression` choices: `none`, then every registered policy."""
    return ("none", *POLICIES)


class CompressionConfigError(SettingError):
    """A compression setting is invalid, or conflicts with another vLLM option. `field` names the setting as the
    user gave it (a field, a policy parameter, or a request's key)."""


# Per-request settings: the keys a request may give in `SamplingParams.extra_args` (the OpenAI API's
# `vllm_xargs`), and the setting each one overrides for that request.
REQUEST_SETTINGS = {"kv_compression": "method", "kv_budget": "budget", "kv_budget_ratio": "budget_ratio",
                    "kv_keep_prompt": "keep_prompt"}


@dataclass(frozen=True)
class CompressionConfig:
    """How (and whether) each request's KV cache is compressed.

    Budgets count KV tokens kept per request, per layer and per KV head; sinks and the observation window
    are part of the budget. With `keep_prompt` the prompt is kept whole and the budget counts the generated
    tokens kept beside it.
    """

    method: str = field(
        default="none",
        metadata={"help": "Which tokens to evict: one of the policies below, or 'none', which leaves vLLM "
                          "unchanged."},
    )
    budget: int | None = field(
        default=None,
        metadata={"help": f"KV tokens kept per request (default {DEFAULT_BUDGET_TOKENS} when no ratio is set, none in "
                          "the pool-wide mode); with a ratio, or in the pool-wide mode, the least a request keeps."},
    )
    budget_ratio: float | None = field(
        default=None,
        metadata={"help": "Keep this fraction (0 < r <= 1) of each request's length so far instead of a fixed "
                          "budget. A ratio of a short prompt is tiny (25%% of a 120-token question is 30 tokens): "
                          "give --kv-budget too as a floor, or --kv-keep-prompt."},
    )
    keep_prompt: bool = field(
        default=False,
        metadata={"help": "Never evict prompt tokens: only generated tokens compete for the budget, which counts "
                          "the generated tokens kept beside the whole prompt (decode-time compression, as R-KV "
                          "evaluates it: the question survives however long the reasoning runs)."},
    )
    prefill_window: int = field(
        default=32,
        metadata={"help": "Observation window (last prompt tokens) whose attention scores the prompt; "
                          "always kept."},
    )
    decode_window: int = field(
        default=16,
        metadata={"help": "Observation window (most recent generated tokens) used when compressing during "
                          "decoding; always kept. 16 was chosen on GSM8K train (docs/results/gsm8k.md); R-KV "
                          "uses 8."},
    )
    sinks: int = field(default=4, metadata={"help": "First tokens that are never evicted (attention sinks)."})
    decode_interval: int = field(
        default=128,
        metadata={"help": "During decoding, compress back to the budget whenever the kept length reaches "
                          "budget + this many tokens (the R-KV schedule)."},
    )
    memory_pressure: bool = field(
        default=False,
        metadata={"help": "When the KV block pool cannot fit the next step, compress running requests "
                          "(lowest-value KV first) before preempting any."},
    )
    pool_target: float | None = field(
        default=None,
        metadata={"help": "Pool-wide mode (0 < share <= 1): keep the running requests' KV within this share of the "
                          "KV pool by evicting, across the whole batch, the pages whose loss of observed attention "
                          "is smallest. Budgets and ratios, the server's or a request's, become the least a "
                          "request keeps. Off by default: each request is compressed to its own budget."},
    )
    kernels: Kernels = field(
        default="auto",
        metadata={"help": "Scoring and compaction kernels: 'triton' (the GPU path; on CPU only under Triton's "
                          "interpreter, TRITON_INTERPRET=1, for testing), 'torch', or 'auto' (torch on CPU, Triton "
                          "on CUDA)."},
    )
    # The method's scoring policy with its parameters (None when compression is off); the registry's defaults
    # where the settings name none (`from_settings` builds it from flat settings).
    policy: ScoringPolicy | None = field(default=None, metadata={"policy": True})

    def __post_init__(self) -> None:
        self._validate()
        if not self.enabled:
            object.__setattr__(self, "policy", None)
        elif self.policy is None:
            object.__setattr__(self, "policy", POLICIES[self.method]())
        elif self.policy.name != self.method:
            raise CompressionConfigError(
                f"infokv-vllm: the policy given ({self.policy.name}) is not {flag_name('method')} {self.method}",
                "method", f"{self.policy.name} is not {self.method}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def reserved_tokens(self) -> int:
        """Tokens every compression keeps regardless of score: the sinks and the larger window."""
        return self.sinks + max(self.prefill_window, self.decode_window)

    @property
    def pool_wide(self) -> bool:
        return self.enabled and self.pool_target is not None

    @property
    def kv_bound(self) -> int | None:
        """The most KV tokens a request holds once its prompt is compressed (budget + decode interval; beside
        the whole prompt with `keep_prompt`), or None where compression does not bound it (off, a budget ratio,
        which grows with the length, or the pool-wide mode, where the batch decides)."""
        if not self.enabled or self.budget_ratio is not None or self.pool_target is not None:
            return None
        return (self.budget if self.budget is not None else DEFAULT_BUDGET_TOKENS) + self.decode_interval

    def protected_len(self, prompt_len: int) -> int:
        """Leading tokens a compaction never evicts: the sinks, or the whole prompt with `keep_prompt`."""
        return max(self.sinks, prompt_len) if self.keep_prompt else self.sinks

    def budget_for(self, logical_len: int, prompt_len: int) -> int:
        """The number of KV tokens a request of `logical_len` tokens, `prompt_len` of them its prompt, may keep.

        The budget governs the tokens after the protected prompt (all tokens without `keep_prompt`): a ratio is
        a share of them, an absolute budget their count, and both together mean the larger (the budget is the
        ratio's floor). In the pool-wide mode this is the least a request keeps, and with neither given it is no
        more than every compaction keeps (sinks, window and one token), not the default budget."""
        protected = prompt_len if self.keep_prompt else 0
        governed = max(logical_len - protected, 0)
        floor = self.budget if self.budget is not None else (
            DEFAULT_BUDGET_TOKENS if self.budget_ratio is None and self.pool_target is None else 0)
        wanted = max(floor, int(self.budget_ratio * governed) if self.budget_ratio is not None else 0)
        return min(logical_len, protected + max(wanted, self.reserved_tokens + 1))

    def _validate(self) -> None:
        def fail(option: str, why: str) -> None:
            raise CompressionConfigError(f"infokv-vllm: invalid {flag_name(option)}: {why}", option, why)

        check_settings(self, fail, only=engine_setting_names())
        if self.method not in method_names():
            fail("method", f"{self.method!r} is not one of {', '.join(method_names())}")
        if self.budget is not None and self.budget <= self.reserved_tokens:
            fail("budget", f"{self.budget} leaves no room to choose tokens: it must exceed sinks + window "
                           f"= {self.reserved_tokens}")
        if self.budget_ratio is not None and not 0.0 < self.budget_ratio <= 1.0:
            fail("budget_ratio", f"{self.budget_ratio} is outside (0, 1]")
        for name in ("prefill_window", "decode_window", "decode_interval"):
            if getattr(self, name) < 1:
                fail(name, f"{getattr(self, name)} must be at least 1")
        if self.sinks < 0:
            fail("sinks", f"{self.sinks} must not be negative")
        if self.pool_target is not None and not 0.0 < self.pool_target <= 1.0:
            fail("pool_target", f"{self.pool_target} is outside (0, 1]")
        if (self.enabled and self.budget is None and self.budget_ratio is None and self.pool_target is None
                and DEFAULT_BUDGET_TOKENS <= self.reserved_tokens):
            window = "prefill_window" if self.prefill_window >= self.decode_window else "decode_window"
            fail(window, f"{getattr(self, window)} leaves the default budget ({DEFAULT_BUDGET_TOKENS} tokens) no "
                         f"room to choose tokens beside sinks + window = {self.reserved_tokens}: give "
                         f"{flag_name('budget')} above {self.reserved_tokens}, or a smaller window")

    def for_request(self, extra_args: dict[str, Any] | None) -> CompressionConfig:
        """These (the server's) settings as one request overrides them through the `REQUEST_SETTINGS` keys of its
        `extra_args`; every other key belongs to vLLM or another extension and is left alone.

        A request may opt out (`kv_compression: none`), give its own `kv_budget` and/or `kv_budget_ratio`, which
        replace the server's budget and ratio together, or turn `kv_keep_prompt` on or off. It cannot switch to
        another scoring policy: the workers record only the signals the server's policy needs. Errors name the
        request field and its value.
        """
        given = {key: value for key, value in (extra_args or {}).items() if key in REQUEST_SETTINGS}
        if not given:
            return self

        def fail(key: str, why: str) -> None:
            raise CompressionConfigError(f"infokv-vllm: invalid vllm_xargs.{key}: {why}", key, why)

        if not self.enabled:
            fail(next(iter(given)), f"compression is off on this server ({flag_name('method')} none)")
        method = given.get("kv_compression", self.method)
        if type(method) is not str or method not in ("none", self.method):
            fail("kv_compression", f"{method!r}: a request may give 'none' (opt out) or this server's method "
                                   f"{self.method!r}")
        changes: dict[str, Any] = {"method": method}
        if "kv_budget" in given or "kv_budget_ratio" in given:
            changes.update(budget=None, budget_ratio=None)
        if "kv_budget" in given:
            changes["budget"] = _request_number(given["kv_budget"], int, lambda why: fail("kv_budget", why))
        if "kv_budget_ratio" in given:
            changes["budget_ratio"] = _request_number(given["kv_budget_ratio"], float,
                                                      lambda why: fail("kv_budget_ratio", why))
        if "kv_keep_prompt" in given:
            # vLLM's `vllm_xargs` schema has no booleans: JSON true arrives as 1.
            value = given["kv_keep_prompt"]
            switch = None
            if type(value) in (bool, int, str):
                switch = _REQUEST_SWITCHES.get(value.lower() if type(value) is str else value)
            if switch is None:
                fail("kv_keep_prompt", f"{value!r} is not true or false")
            changes["keep_prompt"] = switch
        try:
            return dataclasses.replace(self, **changes)
        except CompressionConfigError as error:
            fail(next((key for key, name in REQUEST_SETTINGS.items() if name == error.field and key in given),
                      next(iter(given))), error.why)

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> CompressionConfig:
        """Read the settings from vLLM's `additional_config`; absent means compression off."""
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if raw is None:
            return cls()
        if isinstance(raw, CompressionConfig):
            return raw
        if isinstance(raw, str):  # `additional_config={"kv_compression": "snapkv"}`
            raw = {"method": raw}
        if not isinstance(raw, dict):
            raise CompressionConfigError(
                f"infokv-vllm: additional_config[{ADDITIONAL_CONFIG_KEY!r}] must be a dict of settings or a "
                f"method name, not {type(raw).__name__}")
        return cls.from_settings(raw)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> CompressionConfig:
        """The settings as users give them, flat: engine-wide settings and the method's parameters side by side
        (`{"method": "infokv", "budget": 128, "alpha": 0.5}`). A parameter of another policy is refused by name;
        with compression off, parameters are checked and left unused."""
        engine = engine_setting_names()
        parameters = policy_parameters()
        unknown = sorted(map(str, set(settings) - set(engine) - set(parameters)))
        if unknown:
            raise CompressionConfigError(
                f"infokv-vllm: unknown setting(s) {unknown} in additional_config[{ADDITIONAL_CONFIG_KEY!r}]; "
                f"known: {sorted([*engine, *parameters])}")
        given = {name: value for name, value in settings.items() if name in parameters}
        method = settings.get("method", "none")
        chosen = POLICIES.get(method) if type(method) is str else None
        for name, value in given.items():
            owners = policies_with(name)
            if chosen is not None and method not in owners:
                why = f"a parameter of {', '.join(owners)}, not of {method}"
                raise CompressionConfigError(f"infokv-vllm: invalid {flag_name(name)}: {why}", name, why)
            if chosen is None:  # compression off (or a method refused below): checked, then unused
                _policy(POLICIES[owners[0]], {name: value})
        policy = _policy(chosen, given) if chosen is not None else None
        return cls(**{name: value for name, value in settings.items() if name in engine}, policy=policy)

    def to_settings(self) -> dict[str, Any]:
        """The flat settings `from_settings` reads back: the engine-wide ones and the policy's parameters."""
        settings = {name: getattr(self, name) for name in engine_setting_names()}
        return {**settings, **(dataclasses.asdict(self.policy) if self.policy is not None else {})}


def engine_setting_names() -> tuple[str, ...]:
    """The engine-wide settings: every field of `CompressionConfig` but the policy."""
    return tuple(f.name for f in dataclasses.fields(CompressionConfig) if not f.metadata.get("policy"))


def _policy(cls: type[ScoringPolicy], parameters: dict[str, Any]) -> ScoringPolicy:
    """The policy with these parameters; a bad one is refused by its flag."""
    try:
        return cls(**parameters)
    except SettingError as error:
        raise CompressionConfigError(f"infokv-vllm: invalid {flag_name(error.field)}: {error.why}", error.field,
                                     error.why) from None


def misspelt_request_settings(extra_args: dict[str, Any] | None) -> dict[str, str]:
    """Keys of a request's `extra_args` that are not ours but look like a misspelling of one (key -> ours). They
    stay vLLM's (another extension may own them); the frontend only warns."""
    import difflib

    return {key: close[0] for key in (extra_args or {}) if isinstance(key, str) and key not in REQUEST_SETTINGS
            and (close := difflib.get_close_matches(key, REQUEST_SETTINGS, n=1, cutoff=0.8))}


# What a request's `kv_keep_prompt` may be: JSON booleans, vLLM's 1 and 0 for them, or their names.
_REQUEST_SWITCHES = {True: True, False: False, "true": True, "false": False}


def _request_number(given: Any, kind: type[int] | type[float], fail: Callable[[str], None]) -> int | float:
    """A request's numeric setting as `kind`: numbers and numeric strings (vLLM's `vllm_xargs` carries both); an
    integer setting takes integral values only, and neither takes booleans, NaN or infinities."""
    refusal = f"{given!r} is not {'an integer' if kind is int else 'a finite number'}"
    value = given
    if type(given) is str:
        try:
            value = int(given) if kind is int and given.strip().lstrip("+-").isdigit() else float(given)
        except ValueError:
            fail(refusal)
    if type(value) not in (int, float) or not finite(value) or kind is int and value != int(value):
        fail(refusal)
    return kind(value)


_PARSED_ATTRIBUTE = "_infokv_compression"


def compression_of(vllm_config: Any) -> CompressionConfig:
    """The compression settings of a vLLM config (read from its `additional_config`), parsed once per config
    object: the scheduler, each worker, the frontend's admission of every request and the metrics all ask."""
    parsed = vllm_config.__dict__.get(_PARSED_ATTRIBUTE)
    if parsed is None:
        parsed = CompressionConfig.from_additional_config(vllm_config.additional_config)
        object.__setattr__(vllm_config, _PARSED_ATTRIBUTE, parsed)
    return parsed


def flag_name(field_name: str) -> str:
    """The CLI flag of a setting: `method` is `--kv-compression`, the others `--kv-<name>`."""
    if field_name == "method":
        return "--kv-compression"
    return "--kv-" + field_name.replace("_", "-")
