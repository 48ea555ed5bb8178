"""The compression settings: one typed dataclass, owned here, read by every other module.

The settings travel to the engine core and the workers inside vLLM's `additional_config` (a plain dict that
vLLM pickles to every process), under the key `ADDITIONAL_CONFIG_KEY`. The CLI flags in `plugin.py` are
generated from the fields below, so a new knob is one field here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ADDITIONAL_CONFIG_KEY = "kv_compression"

# The names are declared here, at the bottom of the package, and the registries that implement them are keyed by
# them (`scoring.POLICIES`, `scoring.infokv.FUSION_RULES`; a test checks they match), so that settings need
# nothing above them.
CompressionMethod = Literal["none", "infokv", "snapkv", "streaming", "random", "entropy", "rkv"]
EntropyScore = Literal["product", "sum", "entropy_only"]
Fusion = Literal["sum", "rank", "split"]
Kernels = Literal["auto", "torch", "triton"]

# The `--kv-compression` choices: `none`, then every scoring policy.
METHODS: tuple[str, ...] = get_args(CompressionMethod)
FUSIONS: tuple[str, ...] = get_args(Fusion)
ENTROPY_SCORES: tuple[str, ...] = get_args(EntropyScore)
KERNELS: tuple[str, ...] = get_args(Kernels)

# Used when compression is on and neither `budget` nor `budget_ratio` is given.
DEFAULT_BUDGET_TOKENS = 1024
# Token counts above this exceed any context vLLM serves (and the int32 positions and slots the kernels use).
MAX_TOKENS = 2**31 - 1
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


class CompressionConfigError(ValueError):
    """A compression setting is invalid, or conflicts with another vLLM option. `field` names the setting."""

    def __init__(self, message: str, field: str | None = None, why: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.why = why


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

    method: CompressionMethod = field(
        default="none",
        metadata={"help": "Which tokens to evict: 'infokv' fuses attention with entropy; 'snapkv' uses "
                          "attention only, 'rkv' attention with key redundancy (R-KV), 'entropy' entropy only, "
                          "'streaming' keeps sinks + most recent, 'random' is a control. 'none' leaves vLLM "
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
    alpha: float = field(
        default=0.3,
        metadata={"help": "InfoKV: the entropy signal's share of the fused score (sum, rank) or of the budget "
                          "(split); 1 - alpha goes to attention."},
    )
    fusion: Fusion = field(
        default="rank",
        metadata={"help": "InfoKV fusion rule: 'sum' (1-alpha)*A/sum(A) + alpha*E/sum(E); 'rank' the same on each "
                          "signal's quantile; 'split' a share alpha of the budget reserved for entropy's top "
                          "tokens, the rest by attention."},
    )
    redundancy: float = field(
        default=0.3,
        metadata={"help": "InfoKV: weight of R-KV's key redundancy, subtracted from the fused score as a quantile "
                          "among the candidates when compressing during decoding (0 = off): of tokens the trace "
                          "restates, the older copies go first. 0.3 was chosen on GSM8K train."},
    )
    value_norm: float = field(
        default=0.3,
        metadata={"help": "InfoKV: weight of each token's value-vector norm, added to the fused score as a quantile "
                          "among the candidates when compressing during decoding (0 = off). VaSE (arXiv "
                          "2606.03928): evicting tokens with large values sends reasoning models into loops. 0.3 was "
                          "chosen on GSM8K train (loops 5-6%% -> 1-2%%, +2-3 points; docs/results/gsm8k.md)."},
    )
    entropy_top_k: int = field(
        default=10,
        metadata={"help": "Token entropy is computed over the k most probable tokens, normalised by log k."},
    )
    entropy_score: EntropyScore = field(
        default="product",
        metadata={"help": "How token entropy H and representation evolution R form the entropy signal: "
                          "'product' H*R, 'sum' H+R, 'entropy_only' H."},
    )
    pooling_kernel: int = field(
        default=7,
        metadata={"help": "Attention scores are max-pooled along the sequence with this (odd) kernel size."},
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
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' policy."})
    kernels: Kernels = field(
        default="auto",
        metadata={"help": "Scoring and compaction kernels: 'triton' (the GPU path; on CPU only under Triton's "
                          "interpreter, TRITON_INTERPRET=1, for testing), 'torch', or 'auto' (torch on CPU, Triton "
                          "on CUDA)."},
    )

    def __post_init__(self) -> None:
        self._validate()

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

        for name, normalised in _checked_types(self, fail).items():
            object.__setattr__(self, name, normalised)
        for name, choices in (("method", METHODS), ("kernels", KERNELS), ("fusion", FUSIONS),
                              ("entropy_score", ENTROPY_SCORES)):
            if getattr(self, name) not in choices:
                fail(name, f"{getattr(self, name)!r} is not one of {', '.join(choices)}")
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if int in kinds and name != "seed" and value is not None and value > MAX_TOKENS:
                fail(name, f"{value} exceeds {MAX_TOKENS}, more tokens than any context holds")
        if not 0 <= self.seed <= MAX_SEED:
            fail("seed", f"{self.seed} is outside [0, {MAX_SEED}]")
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
        for name in ("alpha", "redundancy", "value_norm"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, f"{getattr(self, name)} is outside [0, 1]")
        if self.entropy_top_k < 2:
            fail("entropy_top_k", f"{self.entropy_top_k} must be at least 2 (entropy over one token is 0)")
        if self.pooling_kernel < 1 or self.pooling_kernel % 2 == 0:
            fail("pooling_kernel", f"{self.pooling_kernel} must be an odd number >= 1")
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(raw) - known))
        if unknown:
            raise CompressionConfigError(
                f"infokv-vllm: unknown setting(s) {unknown} in additional_config[{ADDITIONAL_CONFIG_KEY!r}]; "
                f"known: {sorted(known)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    if type(value) not in (int, float) or not _finite(value) or kind is int and value != int(value):
        fail(refusal)
    return kind(value)


def _types_of(hint: Any) -> frozenset[type]:
    """The types a declared setting admits: `int | None` -> {int, NoneType}, a Literal of names -> {str}."""
    if typing.get_origin(hint) is Literal:
        return frozenset(type(choice) for choice in get_args(hint))
    return frozenset(get_args(hint) or (hint,))


_FIELD_TYPES = {name: _types_of(hint) for name, hint in typing.get_type_hints(CompressionConfig).items()}


def _checked_types(config: CompressionConfig, fail: Callable[[str, str], None]) -> dict[str, Any]:
    """Check every setting against its declared type, exactly: a bool is not an int, an int not a bool, a float
    is finite, a choice is a string. Settings from `additional_config` arrive as parsed JSON or Python values,
    unchecked by argparse. Returns the integers given for float settings, as floats."""
    normalised = {}
    for setting in dataclasses.fields(config):
        value, kinds = getattr(config, setting.name), _FIELD_TYPES[setting.name]
        if value is None and type(None) in kinds:
            continue
        if bool in kinds:
            if type(value) is not bool:
                fail(setting.name, f"{value!r} is not true or false")
        elif int in kinds:
            if type(value) is not int:
                fail(setting.name, f"{value!r} is not an integer")
        elif float in kinds:
            if type(value) not in (int, float) or not _finite(value):
                fail(setting.name, f"{value!r} is not a finite number")
            normalised[setting.name] = float(value)
        elif type(value) is not str:
            fail(setting.name, f"{value!r} is not a string")
    return normalised


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float (10**400)
        return False


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
