"""The paper's two scenarios on a capable model: accuracy per policy and KV budget, through `vllm serve`.

Suites (`benchmarks/suites.py`, seeded, no downloads): `retrieval` (RULER-style needles and variable tracking in a
~2k-token prompt: long prefill, compressed once) and `reasoning` (a chain of arithmetic steps worked through with
chain of thought, each line needing its step from the prompt: long decoding, compressed many times).

One `vllm serve` per policy (a request cannot switch policy); every budget is a per-request setting
(`vllm_xargs`), so one server runs all of its cells at once and vLLM batches them. The full-cache cells run on the
first server with `kv_compression: none`. Before any number, the model must pass a known-answer check with the
full cache (`infokv_vllm.testing.models.sanity_check`). Accuracy is exact-answer, with 95% Wilson intervals; the
reasoning rows also give the generated trace length, which must be at least 3x the budget for the cell to test
long decoding. Results: `benchmarks/results/<name>.json` and a plot beside it (accuracy vs budget per policy,
one panel per suite), rewritten after every server, so a grid stopped part way keeps the policies it finished
(`finished_policies` in the JSON).

    .venv/bin/python benchmarks/scenarios.py                      # the 0.5B grid (see the README for its cost)
    .venv/bin/python benchmarks/scenarios.py --model qwen2.5-1.5b --policies infokv,entropy,snapkv --budgets 25%
    .venv/bin/python benchmarks/scenarios.py --smoke              # SmolLM2, tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

NONE = "none"
WRONG_EXAMPLES, WRONG_EXAMPLE_CHARS = 3, 400


@dataclass
class Cell:
    model: str
    suite: str
    policy: str
    budget: str  # "full" for the full cache
    correct: int
    samples: int
    accuracy: float
    interval: tuple[float, float]  # 95% Wilson
    mean_completion_tokens: float
    by_task: dict[str, float]
    # The ends of the first few wrong replies (expected answer, reply tail): how a cell fails, e.g. a
    # variable-tracking reply that names only the first variable.
    wrong_examples: list[tuple[str, str]]


def request_settings(policy: str, budget) -> dict:
    """The per-request `vllm_xargs` of a cell: the full cache, or the budget."""
    return {"kv_compression": NONE} if policy == NONE else budget.request_settings


def ask_all(client, model: str, jobs: list[tuple], concurrency: int) -> list:
    """jobs: (sample, xargs) -> the chat replies, in order."""
    def ask(job):
        sample, xargs = job
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": sample.prompt}], max_tokens=sample.max_tokens,
            temperature=0, extra_body={"vllm_xargs": xargs})

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(ask, jobs))


def cells_of(model_name: str, policy: str, budget_label: str, jobs: list[tuple], replies: list) -> list[Cell]:
    from quality import wilson_interval  # beside this script
    from suites import score

    cells = []
    for suite in dict.fromkeys(sample.suite for sample, _ in jobs):
        mine = [(sample, reply) for (sample, _), reply in zip(jobs, replies) if sample.suite == suite]
        hits = [score(sample, reply.choices[0].message.content or "") for sample, reply in mine]
        tasks = dict.fromkeys(sample.task for sample, _ in mine)
        by_task = {task: sum(h for (s, _), h in zip(mine, hits) if s.task == task)
                   / sum(s.task == task for s, _ in mine) for task in tasks}
        wrong = [(sample.answer, (reply.choices[0].message.content or "")[-WRONG_EXAMPLE_CHARS:])
                 for (sample, reply), hit in zip(mine, hits) if not hit][:WRONG_EXAMPLES]
        cells.append(Cell(model_name, suite, policy, budget_label, sum(hits), len(hits), sum(hits) / len(hits),
                          wilson_interval(sum(hits), len(hits)),
                          sum(reply.usage.completion_tokens for _, reply in mine) / len(mine), by_task, wrong))
    return cells


def plot(cells: list[Cell], budgets: list[str], path: Path, title: str) -> None:
    from report import figure_with_axes, save_figure

    suites = list(dict.fromkeys(cell.suite for cell in cells))
    figure, axes = figure_with_axes(len(suites), (6 * len(suites), 4.2))
    for axis, suite in zip(axes, suites):
        mine = [cell for cell in cells if cell.suite == suite]
        full = next((cell for cell in mine if cell.policy == NONE), None)
        if full:
            axis.axhline(full.accuracy, color="black", linestyle="--", label=f"full cache ({full.accuracy:.2f})")
        for policy in dict.fromkeys(cell.policy for cell in mine if cell.policy != NONE):
            points = [(budgets.index(cell.budget), cell) for cell in mine if cell.policy == policy]
            xs = [x for x, _ in points]
            axis.errorbar(xs, [c.accuracy for _, c in points], marker="o", capsize=3, label=policy,
                          yerr=[[c.accuracy - c.interval[0] for _, c in points],
                                [c.interval[1] - c.accuracy for _, c in points]])
        axis.set_xticks(range(len(budgets)), budgets)
        axis.set_xlabel("KV budget (tokens, or share of each request)")
        axis.set_ylabel("exact-answer accuracy")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(f"{suite} ({mine[0].samples} samples per point, 95% Wilson)")
        axis.legend(fontsize=8)
    figure.suptitle(title)
    save_figure(figure, path)


def main() -> None:
    from quality import Budget, policy_flags  # beside this script (benchmarks run as files)
    from report import policy_specs_of, write_report
    from suites import SUITES, make_samples

    from infokv_vllm.scoring import POLICIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="SmolLM2, tiny suites: checks the script runs")
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a name in infokv_vllm.testing.models.MODELS")
    parser.add_argument("--policies", default=",".join(POLICIES), type=policy_specs_of(POLICIES),
                        help="comma-separated, each `name` or `name:setting=value:...` as in quality.py")
    parser.add_argument("--budgets", default="128,256,25%",
                        help="comma-separated KV tokens or shares (25%%); at ~2,100 tokens 512 is about 25%%")
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--count", type=int, default=50, help="samples per suite (each cell runs all of them)")
    parser.add_argument("--retrieval-tokens", type=int, default=2000)
    parser.add_argument("--reasoning-steps", type=int, default=20)
    parser.add_argument("--decode-interval", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight per server")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results/<name>.json (default: scenarios-<model>)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.policies, args.budgets, args.count = "smollm2", "infokv", "64,50%", 2
        args.retrieval_tokens, args.reasoning_steps, args.kv_cache_gib = 200, 3, 1.0
    name = args.name or ("scenarios" if args.smoke else f"scenarios-{args.model}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from openai import OpenAI
    from transformers import AutoTokenizer

    from infokv_vllm.testing.local_server import EAGER, vllm_server
    from infokv_vllm.testing.models import MODELS, sanity_check

    model = MODELS[args.model].ensure()
    dtype = json.loads((model / "config.json").read_text()).get("dtype", "float32")
    print(sanity_check(model), flush=True)  # the full cache must answer known questions before any number counts
    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = [sample for suite in args.suites.split(",")
               for sample in make_samples(suite, args.count, args.seed, tokenizer, args.retrieval_tokens,
                                          args.reasoning_steps)]
    budgets = [Budget.parse(text) for text in args.budgets.split(",")]
    policies = args.policies.split(",")
    base_flags = ["--dtype", dtype, "--kv-cache-memory-bytes", f"{int(args.kv_cache_gib * 2**30)}",
                  "--max-model-len", "4096", "--max-num-seqs", str(args.concurrency), *EAGER]
    labels = [budget.label for budget in budgets]
    cells: list[Cell] = []
    started = time.perf_counter()

    def save(finished: list[str]) -> None:
        path = write_report(name, args.smoke, model=args.model, dtype=dtype,
                            minutes=(time.perf_counter() - started) / 60, finished_policies=finished,
                            settings={k: v for k, v in vars(args).items() if k != "smoke"},
                            cells=[asdict(cell) for cell in cells])
        plot(cells, labels, path.with_suffix(".png"), f"{args.model}: accuracy per KV budget")

    with tempfile.TemporaryDirectory() as logs:
        for index, policy in enumerate(policies):
            # Budgets and the full cache are per request; the server's own budget is only the default.
            flags = [*policy_flags(policy), *budgets[0].flags, "--kv-decode-interval", str(args.decode_interval)]
            cell_keys = ([(NONE, None)] if index == 0 else []) + [(policy, budget) for budget in budgets]
            jobs = [(sample, request_settings(cell_policy, budget))
                    for cell_policy, budget in cell_keys for sample in samples]
            with vllm_server(model, flags, Path(logs) / f"{index}.log", base_flags=base_flags) as url:
                client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=7200)
                replies = ask_all(client, str(model), jobs, args.concurrency)
            for position, (cell_policy, budget) in enumerate(cell_keys):
                chunk = slice(position * len(samples), (position + 1) * len(samples))
                new = cells_of(args.model, cell_policy, budget.label if budget else "full", jobs[chunk],
                               replies[chunk])
                cells += new
                for cell in new:
                    print(f"[{time.perf_counter() - started:6.0f}s] {cell.suite:9} {cell.policy:24} "
                          f"{cell.budget:>5}: {cell.accuracy:.2f} ({cell.interval[0]:.2f}-{cell.interval[1]:.2f}) "
                          f"{cell.mean_completion_tokens:.0f} completion tokens", flush=True)
            save(policies[:index + 1])

    print(f"\n{args.model}, {args.count} samples per suite and cell, exact-answer accuracy (95% Wilson)")
    for suite in dict.fromkeys(cell.suite for cell in cells):
        full = next(cell for cell in cells if cell.suite == suite and cell.policy == NONE)
        print(f"\n{suite}: full cache {full.accuracy:.2f} ({full.interval[0]:.2f}-{full.interval[1]:.2f}), "
              f"{full.mean_completion_tokens:.0f} completion tokens")
        print(f"{'policy':24} " + " ".join(f"{label:>17}" for label in labels))
        for policy in policies:
            row = {cell.budget: cell for cell in cells if cell.suite == suite and cell.policy == policy}
            print(f"{policy:24} " + " ".join(
                f"{row[label].accuracy:>5.2f} ({row[label].interval[0]:.2f}-{row[label].interval[1]:.2f})"
                for label in labels))


if __name__ == "__main__":
    main()
