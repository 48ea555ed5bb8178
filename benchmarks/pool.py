"""One KV pool, a mixed batch: the pool-wide mode against one uniform per-request budget, through `vllm serve`.

Three classes of requests share each server, mixed in turn and kept `--concurrency` in flight:
- `retrieval`: RULER's needles in Paul Graham essays (`suites.ruler`, its two needle tasks), ~`--retrieval-tokens`
  tokens; the needle matters and the window's question attends it;
- `reasoning`: GSM8K test problems with chain of thought (`suites.gsm8k`);
- `chat`: a conversation of essay excerpts nobody asks about again, then a SQuAD paragraph and its question in the
  last turn (graded like RULER's QA: any reference answer, case-blind).

Configurations, on the same pool (`--num-gpu-blocks-override`): `vanilla` (no compression), `uniform` (infokv with
`--kv-budget B`: every request keeps B + interval at most) and `pool` (infokv with `--kv-pool-target T`: the
batch keeps T of the pool, pages taken where the least observed attention is lost). T defaults to uniform's total:
concurrency x (B + interval / 2) over the pool, so both keep about the same KV; the KV actually held is measured
(vLLM's `kv_cache_usage_perc`, sampled every half second) and reported beside the accuracies, as are output
tokens/s, running requests and preemptions. Configurations are interleaved per round; servers restart per run.
Each round draws its own samples (seed + round): greedy replies to the same prompts would repeat, so pooling
rounds of one draw would count each answer twice and narrow the intervals without new evidence.

    .venv/bin/python benchmarks/pool.py --per-class 10 --rounds 2     # Qwen2.5-Coder-0.5B
    .venv/bin/python benchmarks/pool.py --smoke                       # SmolLM2, tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLASSES = ("retrieval", "reasoning", "chat")
CONFIGS = ("vanilla", "uniform", "pool")
BLOCK_SIZE = 32
CHAT_TURNS = 3
CANNED_REPLIES = ("That is an interesting point of view.", "I see what the author means.",
                  "Thanks for sharing this passage.")


def chat_samples(count: int, seed: int, turn_tokens: int, count_tokens) -> list[dict]:
    """Conversations whose early turns (essay excerpts) the final question never needs."""
    from suites import _essay_excerpt

    from infokv_testing.datasets import DATASETS

    rng = random.Random(seed)
    essays = DATASETS["ruler-essays"].read_json()["text"]
    squad = [(paragraph["context"], qa) for article in DATASETS["ruler-squad"].read_json()["data"]
             for paragraph in article["paragraphs"] for qa in paragraph["qas"] if qa["answers"]]
    samples = []
    for index in range(count):
        messages = []
        for turn in range(CHAT_TURNS):
            excerpt = " ".join(_essay_excerpt(rng, essays, turn_tokens, count_tokens))
            messages += [{"role": "user", "content": f"What do you make of this passage?\n{excerpt}"},
                         {"role": "assistant", "content": CANNED_REPLIES[turn % len(CANNED_REPLIES)]}]
        context, qa = rng.choice(squad)
        messages.append({"role": "user", "content": f"{context}\n\nAnswer the question based on the paragraph "
                                                    f"above, in a few words.\nQuestion: {qa['question']}"})
        samples.append({"class": "chat", "id": f"chat-{index}", "messages": messages, "max_tokens": 32,
                        "answers": [answer["text"] for answer in qa["answers"]]})
    return samples


def workload(per_class: int, seed: int, retrieval_tokens: int, reasoning_max_tokens: int, tokenizer) -> list[dict]:
    """The three classes, interleaved (so every stretch of the run mixes them)."""
    from suites import gsm8k, ruler

    count_tokens = lambda text: len(tokenizer.encode(text))  # noqa: E731
    needles = [sample for sample in ruler(2 * per_class, seed, retrieval_tokens, count_tokens)
               if sample.task.startswith("niah")][:per_class]
    by_class = {
        "retrieval": [{"class": "retrieval", "id": s.id, "messages": [{"role": "user", "content": s.prompt}],
                       "max_tokens": s.max_tokens, "sample": s} for s in needles],
        "reasoning": [{"class": "reasoning", "id": s.id, "messages": [{"role": "user", "content": s.prompt}],
                       "max_tokens": min(s.max_tokens, reasoning_max_tokens), "sample": s}
                      for s in gsm8k(per_class, seed)],
        "chat": chat_samples(per_class, seed, retrieval_tokens // (2 * CHAT_TURNS), count_tokens),
    }
    return [by_class[name][index] for index in range(per_class) for name in CLASSES]


def correct(item: dict, reply: str) -> bool:
    from suites import score

    if item["class"] == "chat":
        return any(answer.lower() in reply.lower() for answer in item["answers"])
    return score(item["sample"], reply)


class MetricsSampler:
    """Samples vLLM's KV usage, running requests and preemptions from /metrics while the run goes."""

    def __init__(self, url: str, period_s: float = 0.5) -> None:
        self.url, self.period_s = url, period_s
        self.usage: list[float] = []
        self.running: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def read(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        return {sample.name: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name.startswith(("vllm:", "infokv:"))}

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            metrics = self.read()
            if metrics.get("vllm:num_requests_running", 0) > 0:
                self.usage.append(metrics.get("vllm:kv_cache_usage_perc", 0.0))
                self.running.append(metrics["vllm:num_requests_running"])

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_config(model: Path, config: str, flags: list[str], items: list[dict], concurrency: int) -> dict:
    from openai import OpenAI

    from infokv_testing.local_server import vllm_server

    with tempfile.TemporaryDirectory() as logs, vllm_server(model, flags, Path(logs) / "serve.log") as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=7200)

        def ask(item: dict):
            reply = client.chat.completions.create(model=str(model), messages=item["messages"],
                                                   max_tokens=item["max_tokens"], temperature=0)
            return reply.choices[0].message.content or "", reply.usage.completion_tokens

        sampler = MetricsSampler(url)
        started = time.perf_counter()
        with sampler, ThreadPoolExecutor(concurrency) as pool:
            replies = list(pool.map(ask, items))
        seconds = time.perf_counter() - started
        final = sampler.read()
    hits = {name: [correct(item, text) for item, (text, _) in zip(items, replies) if item["class"] == name]
            for name in CLASSES}
    return {"config": config, "seconds": seconds, "output_tokens": sum(tokens for _, tokens in replies),
            "output_tokens_per_s": sum(tokens for _, tokens in replies) / seconds,
            "kv_usage_mean": sum(sampler.usage) / max(len(sampler.usage), 1),
            "kv_usage_peak": max(sampler.usage, default=0.0),
            "running_mean": sum(sampler.running) / max(len(sampler.running), 1),
            "preemptions": final.get("vllm:num_preemptions_total", 0.0),
            "compression_events": final.get("infokv:compression_events_total", 0.0),
            "correct": {name: sum(h) for name, h in hits.items()},
            "samples": {name: len(h) for name, h in hits.items()}}


def plot(summary: dict, configs: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(configs)
    for offset, config in enumerate(configs):
        cells = [summary[config]["accuracy"][name] for name in CLASSES]
        values = [cell["accuracy"] for cell in cells]
        errors = [[v - cell["interval"][0] for v, cell in zip(values, cells)],
                  [cell["interval"][1] - v for v, cell in zip(values, cells)]]
        label = f"{config} (KV {summary[config]['kv_usage_mean']:.0%} of pool)"
        axis.bar([i + offset * width for i in range(len(CLASSES))], values, width, yerr=errors, capsize=3,
                 label=label)
    axis.set_xticks([i + width * (len(configs) - 1) / 2 for i in range(len(CLASSES))], CLASSES)
    axis.set_ylabel("accuracy (95% Wilson)")
    axis.set_ylim(0, 1.05)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    from quality import wilson_interval  # beside this script (benchmarks run as files)
    from report import median_range, write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="SmolLM2, tiny: checks the script runs")
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a name in infokv_testing.models.MODELS")
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=12, help="requests in flight")
    parser.add_argument("--retrieval-tokens", type=int, default=2000)
    parser.add_argument("--reasoning-max-tokens", type=int, default=384)
    parser.add_argument("--budget", type=int, default=256, help="the uniform configuration's --kv-budget")
    parser.add_argument("--decode-interval", type=int, default=64)
    parser.add_argument("--pool-blocks", type=int, default=640, help="KV pool of every configuration, in blocks "
                                                                      f"of {BLOCK_SIZE} tokens")
    parser.add_argument("--configs", default="vanilla,uniform,pool", help=f"a subset of {','.join(CONFIGS)}")
    parser.add_argument("--pool-target", type=float, default=None,
                        help="the pool configuration's --kv-pool-target (default: uniform's total KV)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="round r draws with seed + r (tune on another seed)")
    parser.add_argument("--name", default="pool", help="results/<name>.json and .png")
    args = parser.parse_args()
    configs = args.configs.split(",")
    if unknown := set(configs) - set(CONFIGS):
        parser.error(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.smoke:
        args.model, args.per_class, args.concurrency, args.retrieval_tokens = "smollm2", 2, 6, 400
        args.reasoning_max_tokens, args.budget, args.decode_interval, args.pool_blocks = 48, 96, 32, 96
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from infokv_testing.local_server import EAGER
    from infokv_testing.models import MODELS, serving_dtype

    model = MODELS[args.model].ensure()
    dtype = serving_dtype(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    pool_tokens = (args.pool_blocks - 1) * BLOCK_SIZE
    target = args.pool_target or min(1.0, args.concurrency * (args.budget + args.decode_interval / 2) / pool_tokens)
    base = ["--dtype", dtype, "--num-gpu-blocks-override", str(args.pool_blocks), "--block-size", str(BLOCK_SIZE),
            "--max-model-len", str(pool_tokens), "--max-num-seqs", str(args.concurrency), *EAGER]
    infokv = ["--kv-compression", "infokv", "--kv-decode-interval", str(args.decode_interval)]
    flags = {"vanilla": base, "uniform": [*base, *infokv, "--kv-budget", str(args.budget)],
             "pool": [*base, *infokv, "--kv-pool-target", f"{target:.4f}"]}
    runs = []
    for round_index in range(args.rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]
        items = workload(args.per_class, args.seed + round_index, args.retrieval_tokens, args.reasoning_max_tokens,
                         tokenizer)
        for config in order:
            run = run_config(model, config, flags[config], items, args.concurrency)
            run["round"] = round_index
            runs.append(run)
            print(f"round {round_index} {config}: {run['correct']} of {run['samples']}, "
                  f"{run['output_tokens_per_s']:.1f} tok/s, KV {run['kv_usage_mean']:.0%} mean / "
                  f"{run['kv_usage_peak']:.0%} peak, {run['running_mean']:.1f} running, "
                  f"{run['preemptions']:.0f} preemptions, {run['seconds']:.0f} s", flush=True)
    summary = {}
    for config in configs:
        mine = [run for run in runs if run["config"] == config]
        accuracy = {}
        for name in CLASSES:
            hits, total = sum(r["correct"][name] for r in mine), sum(r["samples"][name] for r in mine)
            accuracy[name] = {"correct": hits, "samples": total, "accuracy": hits / total,
                              "interval": wilson_interval(hits, total)}
        summary[config] = {"accuracy": accuracy,
                           "kv_usage_mean": sum(r["kv_usage_mean"] for r in mine) / len(mine),
                           "output_tokens_per_s": median_range([r["output_tokens_per_s"] for r in mine])}
    by_round = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["config"]] = run["output_tokens_per_s"]
    # The pool-wide configuration's output tokens/s over uniform's, round by round (when both ran).
    vs_uniform = {config: median_range([r[config] / r["uniform"] for r in by_round.values()])
                  for config in configs if config == "pool" and "uniform" in configs}
    print(f"\n{args.model}, {args.per_class} per class x {args.rounds} rounds (a draw each), pool target {target:.3f}")
    print("config     | " + " | ".join(f"{name:>18}" for name in CLASSES) + " | KV mean | tok/s")
    for config in configs:
        cells = summary[config]["accuracy"]
        print(f"{config:10} | " + " | ".join(
            f"{cells[n]['accuracy']:.2f} ({cells[n]['interval'][0]:.2f}-{cells[n]['interval'][1]:.2f})"
            for n in CLASSES) + f" | {summary[config]['kv_usage_mean']:6.0%} | "
            f"{summary[config]['output_tokens_per_s'][0]:.1f}")
    for config, ratio in vs_uniform.items():
        print(f"{config} / uniform output tokens/s: {ratio[0]:.2f}x ({ratio[1]:.2f}-{ratio[2]:.2f})")
    path = write_report(args.name, args.smoke, model=args.model, settings=vars(args), pool_target=target, runs=runs,
                        summary=summary, vs_uniform_tokens_per_s=vs_uniform)
    plot(summary, configs, path.with_suffix(".png"), f"{args.model}: {args.per_class} per class x {args.rounds} "
         f"rounds, pool {args.pool_blocks} blocks, uniform budget {args.budget}, pool target {target:.2f}")


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
