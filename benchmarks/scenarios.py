"""The paper's two scenarios on a capable model: accuracy per policy and KV budget, through `vllm serve`.

Suites (`benchmarks/suites.py`): `gsm8k` and `math500` (real problems with chain of thought: long decoding,
compressed many times), `retrieval` (RULER-style needles and variable tracking in a ~2k-token prompt: long
prefill, compressed once) and `reasoning` (a seeded chain of arithmetic steps).

One `vllm serve` per policy (a request cannot switch policy); every budget is a per-request setting
(`vllm_xargs`), so one server runs all of its cells at once and vLLM batches them. The full-cache cells run first,
on the first server, with `kv_compression: none`: a `30%full` budget is that share of the full-cache length of the
same sample (R-KV's ratio), a `+prompt` budget keeps the whole prompt beside it (`quality.Budget`). Before any
number, the model must pass a known-answer check with the full cache (`infokv_testing.models.sanity_check`).

Per cell: accuracy with a 95% Wilson interval, the trace length (mean, p90), the share of traces that hit
`max_tokens` (`loop_share`: a compressed model that lost its place tends to repeat itself until the limit), and the
peak KV slots each request held, measured by the scheduler (its finish log line), as a mean and as a share of the
same sample's full-cache length (`peak_kv_share`): the compression ratio actually reached, not the budget asked.
Results: `benchmarks/results/<name>.json` and a plot beside it (accuracy vs budget per policy, one panel per
suite), rewritten after every server, so a grid stopped part way keeps the policies it finished
(`finished_policies` in the JSON).

    .venv/bin/python benchmarks/scenarios.py --suites gsm8k --count 100 --budgets 96,128,192,256
    .venv/bin/python benchmarks/scenarios.py --model qwen2.5-1.5b --policies infokv,rkv,snapkv --budgets 30%full,50%full
    .venv/bin/python benchmarks/scenarios.py --smoke              # SmolLM2, tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
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
    p90_completion_tokens: float
    loop_share: float  # replies that stopped at max_tokens
    peak_kv_mean: float  # KV slots a request held at most (measured), mean over the samples
    peak_kv_share: float  # each sample's peak KV over its full-cache length (prompt + trace), mean
    by_task: dict[str, float]
    # The ends of the first few wrong replies (expected answer, reply tail): how a cell fails, e.g. a
    # variable-tracking reply that names only the first variable.
    wrong_examples: list[tuple[str, str]]


# The scheduler's debug line when a compressed request finishes (`core.scheduler`), and vLLM's internal request
# id: the API's id (`X-Request-Id`) plus a dash and a random suffix.
PEAK_LINE = re.compile(r"infokv: request (\S+?)-[0-9a-f]+ finished after .* peak (\d+) KV slots")


@dataclass
class Reply:
    """One answered request: what the API returned, and the peak KV the server measured for it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    hit_limit: bool
    peak_kv: int | None = None  # None for a full-cache request: it held prompt + completion

    @property
    def length(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def ask_all(client, model: str, jobs: list[tuple], concurrency: int, tag: str) -> list[Reply]:
    """jobs: (sample, xargs) -> the replies, in order; request ids are `<tag>-<index>` (for the peak KV)."""
    def ask(numbered):
        index, (sample, xargs) = numbered
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": sample.prompt}], max_tokens=sample.max_tokens,
            temperature=0, extra_body={"vllm_xargs": xargs}, extra_headers={"X-Request-Id": f"{tag}-{index}"})
        choice = reply.choices[0]
        return Reply(choice.message.content or "", reply.usage.prompt_tokens, reply.usage.completion_tokens,
                     choice.finish_reason == "length")

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(ask, enumerate(jobs)))


def read_peaks(log_path: Path, tag: str, replies: list[Reply]) -> None:
    """Fill each compressed reply's peak KV from the server log (every compressed request logs one line)."""
    peaks = {match.group(1): int(match.group(2))
             for match in map(PEAK_LINE.search, log_path.read_text().splitlines()) if match}
    for index, reply in enumerate(replies):
        request_id = f"chatcmpl-{tag}-{index}"
        if request_id not in peaks:
            raise RuntimeError(f"no peak KV logged for {request_id} in {log_path}: the server must log at DEBUG")
        reply.peak_kv = peaks[request_id]


def cells_of(model_name: str, policy: str, budget_label: str, jobs: list[tuple], replies: list[Reply],
             full_lengths: dict[str, int]) -> list[Cell]:
    from quality import wilson_interval  # beside this script
    from suites import score

    cells = []
    for suite in dict.fromkeys(sample.suite for sample, _ in jobs):
        mine = [(sample, reply) for (sample, _), reply in zip(jobs, replies) if sample.suite == suite]
        hits = [score(sample, reply.text) for sample, reply in mine]
        tasks = dict.fromkeys(sample.task for sample, _ in mine)
        by_task = {task: sum(h for (s, _), h in zip(mine, hits) if s.task == task)
                   / sum(s.task == task for s, _ in mine) for task in tasks}
        wrong = [(sample.answer, reply.text[-WRONG_EXAMPLE_CHARS:])
                 for (sample, reply), hit in zip(mine, hits) if not hit][:WRONG_EXAMPLES]
        traces = sorted(reply.completion_tokens for _, reply in mine)
        # KV exists for every token but the last sampled one.
        peaks = [reply.length - 1 if reply.peak_kv is None else reply.peak_kv for _, reply in mine]
        cells.append(Cell(
            model_name, suite, policy, budget_label, sum(hits), len(hits), sum(hits) / len(hits),
            wilson_interval(sum(hits), len(hits)), sum(traces) / len(traces),
            traces[min(len(traces) - 1, math.ceil(0.9 * len(traces)) - 1)],
            sum(reply.hit_limit for _, reply in mine) / len(mine), sum(peaks) / len(peaks),
            sum(peak / (full_lengths[sample.id] - 1) for (sample, _), peak in zip(mine, peaks)) / len(mine),
            by_task, wrong))
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
            points = sorted(((budgets.index(cell.budget), cell) for cell in mine if cell.policy == policy),
                            key=lambda point: point[0])
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
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a name in infokv_testing.models.MODELS")
    parser.add_argument("--policies", default=",".join(POLICIES), type=policy_specs_of(POLICIES),
                        help="comma-separated, each `name` or `name:setting=value:...` as in quality.py")
    parser.add_argument("--budgets", default="128,256,25%",
                        help="comma-separated: KV tokens (128), shares of the length so far (25%%), shares of the "
                             "sample's full-cache length (30%%full); +prompt keeps the prompt beside the budget")
    parser.add_argument("--suites", default="gsm8k,retrieval", help=f"comma-separated, of {', '.join(SUITES)}")
    parser.add_argument("--count", type=int, default=50, help="samples per suite (each cell runs all of them)")
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="GSM8K split: tune on train, report on test")
    parser.add_argument("--math-levels", default="1,2,3", help="MATH-500 difficulty levels")
    parser.add_argument("--retrieval-tokens", type=int, default=2000)
    parser.add_argument("--reasoning-steps", type=int, default=20)
    parser.add_argument("--decode-interval", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight per server")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extend", default=None, metavar="NAME",
                        help="add these policies to results/NAME.json (same samples): its cells, full-cache lengths "
                             "and finished policies are kept, the full cache is not run again")
    parser.add_argument("--name", default=None, help="results/<name>.json (default: scenarios-<model>)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="serving dtype (default: the --extend file's, else the model's own where this CPU "
                             "multiplies it natively, else float32)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="vLLM's --kv-cache-dtype for every server "
                                                                      "(e.g. fp8: one byte per KV element)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.policies, args.budgets, args.count = "smollm2", "infokv", "64,50%,60%full+prompt", 2
        args.suites, args.retrieval_tokens, args.kv_cache_gib = "retrieval,gsm8k", 200, 1.0
    name = args.name or ("scenarios" if args.smoke else f"scenarios-{args.model}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from openai import OpenAI
    from transformers import AutoTokenizer

    from infokv_testing.local_server import EAGER, vllm_server
    from infokv_testing.models import MODELS, sanity_check, serving_dtype

    model = MODELS[args.model].ensure()
    earlier = json.loads((Path(__file__).parent / "results" / f"{args.extend}.json").read_text()) if args.extend else {}
    if args.dtype and earlier and args.dtype != earlier["dtype"]:
        # Greedy traces differ between dtypes: cells of one file compare policies on one model.
        parser.error(f"--extend {args.extend} ran in {earlier['dtype']}, not --dtype {args.dtype}")
    if earlier and args.kv_cache_dtype != earlier.get("kv_cache_dtype", "auto"):
        parser.error(f"--extend {args.extend} ran with --kv-cache-dtype {earlier.get('kv_cache_dtype', 'auto')}")
    dtype = args.dtype or earlier.get("dtype") or serving_dtype(model)
    print(sanity_check(model, dtype=dtype), flush=True)  # the full cache must answer known questions first
    tokenizer = AutoTokenizer.from_pretrained(model)
    levels = tuple(int(level) for level in args.math_levels.split(","))
    samples = [sample for suite in args.suites.split(",")
               for sample in make_samples(suite, args.count, args.seed, tokenizer, args.retrieval_tokens,
                                          args.reasoning_steps, args.split, levels)]
    if args.smoke:  # short traces: the smoke checks the plumbing, not the answers
        samples = [dataclasses.replace(sample, max_tokens=min(sample.max_tokens, 48)) for sample in samples]
    budgets = [Budget.parse(text) for text in args.budgets.split(",")]
    policies = args.policies.split(",")
    max_model_len = max(4096, args.retrieval_tokens + 1024)  # a haystack, its question and instructions, the reply
    base_flags = ["--dtype", dtype, "--kv-cache-memory-bytes", f"{int(args.kv_cache_gib * 2**30)}",
                  "--kv-cache-dtype", args.kv_cache_dtype, "--max-model-len", str(max_model_len),
                  "--max-num-seqs", str(args.concurrency), *EAGER]
    labels = [budget.label for budget in budgets]
    cells: list[Cell] = []
    full_lengths: dict[str, int] = {}  # sample id -> prompt + trace tokens with the full cache
    finished_before, minutes_before, runs = [], 0.0, []
    if args.extend:
        name = args.name or args.extend
        full_lengths = earlier["full_lengths"]
        missing = [sample.id for sample in samples if sample.id not in full_lengths]
        if missing or len(samples) != len(full_lengths):
            parser.error(f"--extend {args.extend}: it ran other samples (e.g. none of {missing[:3]})")
        cells = [Cell(**{**cell, "interval": tuple(cell["interval"])}) for cell in earlier["cells"]]
        labels = list(dict.fromkeys([cell.budget for cell in cells if cell.policy != NONE] + labels))
        # token budgets in size order, so an extension's 96 or 256 lands beside the earlier 128 and 192; the
        # others (ratios) after them, in their order (a stable sort)
        labels.sort(key=lambda label: (0, int(label)) if label.isdigit() else (1, 0))
        finished_before, minutes_before = earlier["finished_policies"], earlier["minutes"]
        runs = earlier.get("runs", [earlier["settings"]])
    started = time.perf_counter()

    def save(finished: list[str]) -> None:
        path = write_report(name, args.smoke, model=args.model, dtype=dtype, kv_cache_dtype=args.kv_cache_dtype,
                            minutes=minutes_before + (time.perf_counter() - started) / 60,
                            finished_policies=finished_before + finished,
                            settings={k: v for k, v in vars(args).items() if k != "smoke"},
                            runs=[*runs, {k: v for k, v in vars(args).items() if k != "smoke"} | {"dtype": dtype}],
                            cells=[asdict(cell) for cell in cells], full_lengths=full_lengths)
        plot(cells, labels, path.with_suffix(".png"), f"{args.model}: accuracy per KV budget")

    def run(client, log_path: Path, cell_keys: list[tuple], tag: str) -> None:
        jobs = [(sample, {"kv_compression": NONE} if budget is None
                 else budget.request_settings(full_lengths.get(sample.id)))
                for _, budget in cell_keys for sample in samples]
        replies = ask_all(client, str(model), jobs, args.concurrency, tag)
        if cell_keys[0][1] is None:
            full_lengths.update((sample.id, reply.length) for sample, reply in zip(samples, replies))
        else:
            read_peaks(log_path, tag, replies)
        for position, (cell_policy, budget) in enumerate(cell_keys):
            chunk = slice(position * len(samples), (position + 1) * len(samples))
            new = cells_of(args.model, cell_policy, budget.label if budget else "full", jobs[chunk],
                           replies[chunk], full_lengths)
            cells.extend(new)
            for cell in new:
                print(f"[{time.perf_counter() - started:6.0f}s] {cell.suite:9} {cell.policy:24} "
                      f"{cell.budget:>14}: {cell.accuracy:.2f} ({cell.interval[0]:.2f}-{cell.interval[1]:.2f}) "
                      f"trace {cell.mean_completion_tokens:.0f} (p90 {cell.p90_completion_tokens:.0f}), "
                      f"loops {cell.loop_share:.2f}, peak KV {cell.peak_kv_mean:.0f} "
                      f"({cell.peak_kv_share:.0%} of full)", flush=True)

    with tempfile.TemporaryDirectory() as logs:
        for index, policy in enumerate(policies):
            # Budgets and the full cache are per request (the server's budget is never used); DEBUG logging
            # carries the scheduler's per-request peak KV line.
            # A policy spec's own settings (e.g. `infokv:decode_interval=32`) come last, so they win.
            flags = ["--kv-decode-interval", str(args.decode_interval), *policy_flags(policy)]
            log_path = Path(logs) / f"{index}.log"
            with vllm_server(model, flags, log_path, base_flags=base_flags,
                             env={"VLLM_LOGGING_LEVEL": "DEBUG"}) as url:
                client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=7200)
                if not full_lengths:  # first, so that `%full` budgets know each sample's full-cache length
                    run(client, log_path, [(NONE, None)], "full")
                run(client, log_path, [(policy, budget) for budget in budgets], f"p{index}")
            save(policies[:index + 1])

    print(f"\n{args.model}, {args.count} samples per suite and cell, accuracy (95% Wilson)")
    for suite in dict.fromkeys(cell.suite for cell in cells):
        full = next(cell for cell in cells if cell.suite == suite and cell.policy == NONE)
        print(f"\n{suite}: full cache {full.accuracy:.2f} ({full.interval[0]:.2f}-{full.interval[1]:.2f}), "
              f"trace {full.mean_completion_tokens:.0f} tokens, loops {full.loop_share:.2f}")
        print(f"{'policy':24} " + " ".join(f"{label:>24}" for label in labels))
        for policy in dict.fromkeys(cell.policy for cell in cells if cell.policy != NONE):
            row = {cell.budget: cell for cell in cells if cell.suite == suite and cell.policy == policy}
            print(f"{policy:24} " + " ".join(
                f"{row[label].accuracy:>5.2f} ({row[label].interval[0]:.2f}-{row[label].interval[1]:.2f}) "
                f"kv {row[label].peak_kv_share:>4.0%}" if label in row else f"{'-':>24}" for label in labels))


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
