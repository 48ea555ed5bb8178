"""Repeated prefixes through `vllm serve`: vLLM's prefix caching with and without compression (issue 23).

A shared block (a long system prompt or few-shot examples) followed by varied short questions, answered at length:
what chat and agent traffic looks like. `vllm bench serve`'s `prefix_repetition` dataset sends it at a fixed
request rate (requests arrive while earlier ones decode, as in serving). Three servers, interleaved round by
round, each started afresh:

- `vanilla`: vLLM's defaults (prefix caching on), no compression;
- `infokv`: compression, prefix caching on (vLLM's default, kept);
- `infokv-no-cache`: compression with `--no-enable-prefix-caching` (what the plugin forced before).

The table gives vLLM's own TTFT p50/p90 and output tokens/s, the TTFT of the requests after each round's first
(the ones a cache can serve), and the prefix-cache hit rate from the server's `/metrics`
(`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`). JSON and a plot go under `benchmarks/results/`.
`--warmups 1` sends the dataset's first request once before the measured ones (`vllm bench serve
--num-warmups`), so every measured request finds the prefix cached: a server that has seen its system prompt.

    .venv/bin/python benchmarks/prefix_cache.py            # cold start, 3 configs (Qwen2.5-Coder-0.5B, ~50 minutes)
    .venv/bin/python benchmarks/prefix_cache.py --warmups 1 --configs vanilla,infokv --name prefix_cache-hot
    .venv/bin/python benchmarks/prefix_cache.py --smoke    # SmolLM2, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import urllib.request
from pathlib import Path

CONFIGS = {
    "vanilla": [],
    "infokv": ["--kv-compression", "infokv"],
    "infokv-no-cache": ["--kv-compression", "infokv", "--no-enable-prefix-caching"],
}


def server_flags(args, config: str, dtype: str) -> list[str]:
    flags = ["--dtype", dtype, "--kv-cache-memory-bytes", "2G", "--block-size", "32", "--enforce-eager",
             "--max-model-len", str(args.prefix_len + args.suffix_len + args.output_len + 64)]
    if config != "vanilla":
        flags += [*CONFIGS[config], "--kv-budget", str(args.budget), "--kv-decode-interval", str(args.interval)]
    return flags


def prefix_cache_counters(url: str) -> dict[str, float]:
    """vLLM's prefix-cache counters from the server's Prometheus endpoint."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counters = {}
    for name in ("hits", "queries"):
        found = re.findall(rf"^vllm:prefix_cache_{name}_total{{[^}}]*}} ([0-9.e+]+)$", text, re.MULTILINE)
        counters[name] = sum(map(float, found))
    return counters


def bench(args, model: Path, url: str, result_dir: Path, name: str) -> dict:
    from infokv_testing.local_server import vllm_cli

    command = [*vllm_cli(), "bench", "serve", "--backend", "openai", "--base-url", url, "--model", str(model),
               "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(args.prefix_len),
               "--prefix-repetition-suffix-len", str(args.suffix_len), "--prefix-repetition-num-prefixes", "1",
               "--prefix-repetition-output-len", str(args.output_len), "--ignore-eos",
               "--num-prompts", str(args.num_prompts), "--num-warmups", str(args.warmups),
               "--request-rate", str(args.request_rate), "--seed", "0",
               "--temperature", "0", "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,90",
               "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", name,
               "--disable-tqdm"]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    return json.loads((result_dir / name).read_text())


def later_ttfts_ms(result: dict) -> list[float]:
    """TTFTs of the requests after the first to arrive (vLLM's detailed result lists them in arrival order)."""
    return [ttft * 1000 for ttft in result["ttfts"][1:]]


def plot(summary: list[dict], path: Path) -> None:
    from report import figure_with_axes, save_figure

    figure, (ttft_axis, throughput_axis) = figure_with_axes(2, (9, 3.5))
    names = [row["config"] for row in summary]
    for axis, key, label in ((ttft_axis, "later_ttft_p50_ms", "TTFT after the first request, p50 (ms)"),
                             (throughput_axis, "output_throughput", "output tokens/s")):
        values = [row[key] for row in summary]
        spans = [row[key + "_range"] for row in summary]
        axis.bar(names, values, yerr=[[v - low for v, (low, _) in zip(values, spans)],
                                      [high - v for v, (_, high) in zip(values, spans)]], capsize=4)
        axis.set_ylabel(label)
    save_figure(figure, path)


def main() -> None:
    from report import RESULTS, median_range, ratio_text, write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a name in infokv_testing.models.MODELS")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--request-rate", type=float, default=0.1, help="requests per second (Poisson)")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmups", type=int, default=0, help="requests sent before the measured ones")
    parser.add_argument("--name", default="prefix_cache", help="the results' file name")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.num_prompts, args.prefix_len, args.suffix_len, args.output_len = "smollm2", 3, 256, 16, 48
        args.budget, args.interval, args.request_rate, args.repeats = 64, 16, 1.0, 1
    configs = args.configs.split(",")
    unknown = [config for config in configs if config not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from infokv_testing.local_server import vllm_server
    from infokv_testing.models import MODELS, serving_dtype

    model = MODELS[args.model].ensure()
    dtype = serving_dtype(model)
    name = "prefix_cache-smoke" if args.smoke else args.name
    result_dir = RESULTS / name
    result_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for round_index in range(args.repeats):
        for config in configs:
            with tempfile.TemporaryDirectory() as logs, \
                    vllm_server(model, server_flags(args, config, dtype), Path(logs) / "serve.log", base_flags=[]) as url:
                result = bench(args, model, url, result_dir, f"{config}-round{round_index}.json")
                counters = prefix_cache_counters(url)
            later = later_ttfts_ms(result)
            runs.append({"config": config, "round": round_index, "completed": result["completed"],
                         "output_throughput": result["output_throughput"],
                         "median_ttft_ms": result["median_ttft_ms"], "p90_ttft_ms": result["p90_ttft_ms"],
                         "median_tpot_ms": result["median_tpot_ms"],
                         "later_ttft_p50_ms": statistics.median(later), "first_ttft_ms": result["ttfts"][0] * 1000,
                         "hit_rate": counters["hits"] / counters["queries"] if counters["queries"] else 0.0})
            print(f"round {round_index} {config:16} {result['output_throughput']:7.2f} output tok/s, later TTFT "
                  f"p50 {runs[-1]['later_ttft_p50_ms']:.0f} ms, hit rate {runs[-1]['hit_rate']:.2f}", flush=True)
    summary = []
    for config in configs:
        mine = [run for run in runs if run["config"] == config]
        row = {"config": config}
        for key in ("output_throughput", "median_ttft_ms", "p90_ttft_ms", "later_ttft_p50_ms", "first_ttft_ms",
                    "median_tpot_ms", "hit_rate"):
            row[key] = statistics.median(run[key] for run in mine)
            row[key + "_range"] = (min(run[key] for run in mine), max(run[key] for run in mine))
        for key in ("later_ttft_p50_ms", "output_throughput"):
            if "vanilla" in configs:
                row[f"{key}_vs_vanilla"] = median_range(
                    [run[key] / other[key] for run in mine for other in runs
                     if other["config"] == "vanilla" and other["round"] == run["round"]])
        summary.append(row)
    print(f"{'config':16} {'output tok/s':>12} {'vs vanilla':>18} {'TTFT p50/p90 ms':>16} "
          f"{'later TTFT p50':>15} {'vs vanilla':>18} {'hit rate':>8}")
    for row in summary:
        print(f"{row['config']:16} {row['output_throughput']:>12.1f} "
              f"{ratio_text(row.get('output_throughput_vs_vanilla')):>18} "
              f"{row['median_ttft_ms']:>7.0f}/{row['p90_ttft_ms']:<8.0f} {row['later_ttft_p50_ms']:>15.0f} "
              f"{ratio_text(row.get('later_ttft_p50_ms_vs_vanilla')):>18} {row['hit_rate']:>8.2f}")
    write_report("prefix_cache" if args.smoke else args.name, args.smoke, model=args.model,
                 settings={k: v for k, v in vars(args).items() if k != "smoke"}, summary=summary, runs=runs)
    plot(summary, RESULTS / f"{name}.png")


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
