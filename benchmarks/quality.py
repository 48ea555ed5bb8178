"""Answer quality per KV budget, measured the way a vLLM user would: against a real `vllm serve` through the
OpenAI completions API (as lm-eval's `local-completions` does), one server per (policy, budget).

Suites
- passkey: a five-digit pass key hidden at a random depth of a generated haystack; the score is the share of
  greedy answers that contain it. The haystack length is where SmolLM2-135M-Instruct with the full cache still
  retrieves reliably (about 540 tokens: 0.88 in calibration; ~1k tokens: 0.6, ~2k: 0.3), so a drop is the
  compression's doing. Compression happens once, after the prompt.
- fidelity: long greedy generations compared with the full-cache run of the same prompt: the share of the trace
  generated before the first token that differs, positionwise token agreement, and the mean KL(full || compressed)
  of the next-token distributions over the shared prefix (where both runs saw the same context). KL uses the
  top-20 logprobs the server returns: a token missing from the compressed run's top 20 is given that run's 20th
  logprob, so the KL is approximate. Compression happens after the prompt and on the R-KV decode schedule.

    .venv/bin/python benchmarks/quality.py            # the full grid (about 35 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/quality.py --smoke    # seconds-long check that the script runs
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
ESSAYS = ["Explain step by step how a refrigerator keeps food cold, and why it needs electricity.",
          "Tell the story of a young sailor who discovers an island that is not on any map.",
          "Describe the water cycle in detail, from the ocean to the clouds and back.",
          "Write a letter to a friend describing a visit to an old library full of strange books.",
          "Explain how a city decides where to build a new bridge, and who is involved.",
          "Describe a day in the life of a beekeeper in the mountains."]
TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Budget:
    """A budget as the user gives it: `128` KV tokens, `25%` of each request's length so far, or `30%full`: that
    share of the full-cache length (prompt + trace) of the same sample, the papers' ratio (R-KV), a per-request
    token budget known once the full cache has run (benchmarks only). A `+prompt` suffix keeps the whole prompt
    beside the budget (`kv_keep_prompt`); the peak KV each request held is measured, so cells with and without it
    compare at their real memory."""

    label: str
    setting: str  # the CompressionConfig field: "budget" or "budget_ratio"
    value: int | float
    of_full: bool = False
    keep_prompt: bool = False

    @classmethod
    def parse(cls, text: str) -> Budget:
        body, plus, suffix = text.partition("+")
        if plus and suffix != "prompt":
            raise ValueError(f"budget {text!r}: the only suffix is +prompt")
        keep_prompt = bool(plus)
        if body.endswith("%full"):
            return cls(text, "budget", float(body[:-5]) / 100, True, keep_prompt)
        if body.endswith("%"):
            return cls(text, "budget_ratio", float(body[:-1]) / 100, False, keep_prompt)
        return cls(text, "budget", int(body), False, keep_prompt)

    @property
    def flags(self) -> tuple[str, ...]:
        """The server's flags for this budget."""
        from infokv_vllm.config import flag_name

        if self.of_full:
            raise ValueError(f"budget {self.label} is a per-request budget (scenarios.py), not a server flag")
        flags = (flag_name(self.setting), str(self.value))
        return (*flags, flag_name("keep_prompt")) if self.keep_prompt else flags

    def request_settings(self, full_len: int | None = None) -> dict[str, int | float | bool]:
        """The per-request `vllm_xargs` for this budget; `full_len`: the sample's full-cache length (`%full`)."""
        from infokv_vllm.config import REQUEST_SETTINGS, CompressionConfig

        value = self.value
        if self.of_full:
            if full_len is None:
                raise ValueError(f"budget {self.label} needs the sample's full-cache length")
            value = max(round(self.value * full_len), CompressionConfig().reserved_tokens + 1)
        settings = {key: value for key, setting in REQUEST_SETTINGS.items() if setting == self.setting}
        return {**settings, "kv_keep_prompt": True} if self.keep_prompt else settings


def policy_flags(spec: str) -> list[str]:
    """A policy as `name[:setting=value...]` (e.g. `infokv:fusion=split:alpha=0.5`) -> its `vllm serve` flags."""
    from infokv_vllm.config import flag_name

    name, *settings = spec.split(":")
    flags = [flag_name("method"), name]
    for setting in settings:
        key, value = setting.split("=")
        flags += [flag_name(key), value]
    return flags


def wilson_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    share = hits / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    spread = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - spread), min(1.0, centre + spread)


@dataclass
class PasskeyResult:
    policy: str
    budget: str
    accuracy: float
    interval: tuple[float, float]  # 95% Wilson
    prompt_tokens: float  # mean


@dataclass
class FidelityResult:
    policy: str
    budget: str
    prefix_match: float  # share of the trace generated before the first differing token (mean over prompts)
    token_agreement: float  # positionwise
    mean_kl: float  # over shared prefixes, nats
    generated_tokens: int


def passkey_prompts(count: int, filler_repeats: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        key = str(rng.randint(10000, 99999))
        before = int(filler_repeats * rng.random())
        prompts.append((
            "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
            f"memorize it.\n\n{FILLER * before}The pass key is {key}. Remember it. {key} is the pass key. "
            f"{FILLER * (filler_repeats - before)}\n\nWhat is the pass key? The pass key is", key))
    return prompts


def run_passkey(client, model: str, prompts: list[tuple[str, str]]) -> tuple[int, float]:
    def ask(prompt: str):
        return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)

    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(ask, [prompt for prompt, _ in prompts]))
    hits = [key in reply.choices[0].text for reply, (_, key) in zip(replies, prompts)]
    return sum(hits), sum(r.usage.prompt_tokens for r in replies) / len(replies)


def run_traces(client, model: str, prompts: list[str], new_tokens: int) -> list[list[tuple[str, dict]]]:
    """Per prompt, the greedy trace as (token, {candidate: logprob}) pairs."""
    def generate(prompt: str):
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                          logprobs=TOP_LOGPROBS, extra_body={"ignore_eos": True})
        logprobs = reply.choices[0].logprobs
        return list(zip(logprobs.tokens, logprobs.top_logprobs))

    if not prompts:
        return []
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(generate, prompts))


def kl_top(full: dict[str, float], compressed: dict[str, float]) -> float:
    floor = min(compressed.values())
    return sum(math.exp(lp) * (lp - compressed.get(token, floor)) for token, lp in full.items())


def compare_traces(reference: list[list[tuple[str, dict]]], traces: list[list[tuple[str, dict]]]
                   ) -> tuple[float, float, float]:
    if not reference:
        return float("nan"), float("nan"), float("nan")
    prefix, agreement, kls = [], [], []
    for ref, run in zip(reference, traces):
        same = [a[0] == b[0] for a, b in zip(ref, run)]
        shared = same.index(False) if False in same else len(same)
        prefix.append(shared / len(ref))
        agreement.append(sum(same) / len(ref))
        # The position where the tokens first differ still had the same context in both runs.
        kls += [kl_top(ref[i][1], run[i][1]) for i in range(min(shared + 1, len(ref)))]
    return sum(prefix) / len(prefix), sum(agreement) / len(agreement), sum(kls) / len(kls)


def essay_prompts(tokenizer, count: int) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": ESSAYS[i % len(ESSAYS)]}],
                                          tokenize=False, add_generation_prompt=True) for i in range(count)]


def main() -> None:
    from report import policy_specs_of, write_report  # beside this script (benchmarks run as files)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    from infokv_vllm.scoring import POLICIES  # the plugin's registry: every --kv-compression method but none

    parser.add_argument("--policies", default=",".join(POLICIES), type=policy_specs_of(POLICIES),
                        help="comma-separated; each `name` or `name:setting=value:...` (e.g. infokv:fusion=split), "
                             "settings as the --kv-* flags")
    parser.add_argument("--budgets", default="10%,25%,50%,64,128,256",
                        help="ratios of each request's length (with %%) or absolute KV tokens")
    parser.add_argument("--passkey-prompts", type=int, default=12)
    parser.add_argument("--filler-repeats", type=int, default=20, help="haystack size (~22 tokens each)")
    parser.add_argument("--traces", type=int, default=4)
    parser.add_argument("--trace-tokens", type=int, default=384)
    parser.add_argument("--decode-interval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="quality", help="results/<name>.json")
    args = parser.parse_args()
    if args.smoke:
        args.policies, args.budgets, args.passkey_prompts, args.traces, args.trace_tokens = "infokv", "50%", 2, 1, 16
        args.filler_repeats = 4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from openai import OpenAI
    from transformers import AutoTokenizer

    from infokv_testing.local_server import EAGER, vllm_server
    from infokv_testing.smollm2 import MODEL_NAME, ensure_model

    model = ensure_model()
    passkeys = passkey_prompts(args.passkey_prompts, args.filler_repeats, args.seed)
    essays = essay_prompts(AutoTokenizer.from_pretrained(model), args.traces)
    configs = [("none", None)] + [(policy, Budget.parse(budget)) for policy in args.policies.split(",")
                                  for budget in args.budgets.split(",")]
    passkey_results, fidelity_results, reference = [], [], None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        for policy, budget in configs:
            # Eager: one server per cell, and compiled engines keep the same tokens (tests/test_compiled_e2e.py).
            flags = ["--max-num-seqs", str(max(len(passkeys), len(essays))), *EAGER]
            if budget is not None:
                flags += [*policy_flags(policy), *budget.flags, "--kv-decode-interval", str(args.decode_interval)]
            label = budget.label if budget else "full"
            with vllm_server(model, flags, Path(logs) / f"{policy}-{label}.log") as url:
                client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=1800)
                hits, prompt_tokens = run_passkey(client, str(model), passkeys)
                traces = run_traces(client, str(model), essays, args.trace_tokens)
            reference = reference or traces
            accuracy = hits / len(passkeys)
            passkey_results.append(PasskeyResult(policy, label, accuracy, wilson_interval(hits, len(passkeys)),
                                                 prompt_tokens))
            fidelity_results.append(FidelityResult(policy, label, *compare_traces(reference, traces),
                                                   args.trace_tokens))
            print(f"[{time.perf_counter() - started:6.0f}s] {policy:28} {label:>5}: passkey {accuracy:.2f}, "
                  f"prefix match {fidelity_results[-1].prefix_match:.2f}, KL {fidelity_results[-1].mean_kl:.4f}",
                  flush=True)

    print(f"\npasskey retrieval (~{passkey_results[0].prompt_tokens:.0f} prompt tokens, "
          f"{args.passkey_prompts} prompts)")
    print(f"{'policy':28} {'budget':>6} {'accuracy':>9} {'95% interval':>14}")
    for row in passkey_results:
        print(f"{row.policy:28} {row.budget:>6} {row.accuracy:>9.2f} {row.interval[0]:>7.2f}-{row.interval[1]:.2f}")
    print(f"\ndecode fidelity vs full cache ({args.traces} prompts x {args.trace_tokens} greedy tokens)")
    print(f"{'policy':28} {'budget':>6} {'prefix':>7} {'agree':>7} {'mean KL':>9}")
    for row in fidelity_results:
        print(f"{row.policy:28} {row.budget:>6} {row.prefix_match:>7.2f} {row.token_agreement:>7.2f} "
              f"{row.mean_kl:>9.4f}")
    write_report(args.name, args.smoke, model=MODEL_NAME, dtype="float32",
                 settings={k: v for k, v in vars(args).items() if k != "smoke"},
                 passkey=[asdict(r) for r in passkey_results], fidelity=[asdict(r) for r in fidelity_results])


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
