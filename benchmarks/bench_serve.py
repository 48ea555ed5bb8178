"""The user's own tools: `vllm bench serve` against `vllm serve`, or `vllm bench throughput` offline, with and
without compression, on a small KV pool.

For each configuration vLLM runs with the same small block pool (`--num-gpu-blocks-override`), vLLM's default
compilation (or `--eager`), and the method's flags. `--client serve` (the default) starts a `vllm serve` and lets
`vllm bench serve` send every request of its random dataset at once; `--client throughput` runs `vllm bench
throughput` on the same dataset in one process, vLLM's offline view. Outputs are fixed and long (`--ignore-eos`).
`ceiling` is vanilla vLLM on an ample pool with `--max-num-seqs` capped at the concurrency compression reaches on
the small pool (`--ceiling-seqs`, from `benchmarks/throughput.py`): what a compressor that cost nothing could do.
Configurations start afresh in each round, interleaved, so the ratios to `none` and to `ceiling` are taken round
by round. The table reports vLLM's own numbers (`--client serve`: output tokens/s, request throughput, TTFT and
TPOT percentiles; `--client throughput`: output tokens/s and requests/s); vLLM's raw result JSONs go under
`benchmarks/results/<name>/`.

    .venv/bin/python benchmarks/bench_serve.py            # the server view (about 25 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_serve.py --client throughput --eager --repeats 2   # offline (about 25)
    .venv/bin/python benchmarks/bench_serve.py --smoke    # and --client throughput --smoke: what CI runs

Each round runs, for a method, what a user would type:

    vllm serve MODEL --dtype float32 --kv-cache-memory-bytes 1G --block-size 32 --num-gpu-blocks-override 61 \\
        --max-model-len 768 --kv-compression infokv --kv-budget 128 --kv-decode-interval 64 --kv-memory-pressure
    vllm bench serve --backend openai --model MODEL --dataset-name random --random-input-len 256 \\
        --random-range-ratio '{"input": 0.5, "output": 0}' --random-output-len 384 --ignore-eos \\
        --num-prompts 24 --request-rate inf

or, offline, `vllm bench throughput --model MODEL` with the dataset flags and the engine flags of both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

METRICS = {"serve": ("output_throughput", "request_throughput", "median_ttft_ms", "p90_ttft_ms", "median_tpot_ms",
                     "p90_tpot_ms"),
           "throughput": ("output_throughput", "request_throughput")}
CEILING = "ceiling"
BLOCK_SIZE = 32


def max_model_len(args) -> int:
    return int(args.input_len * (1 + args.range_ratio)) + args.output_len


def engine_flags(args, config: str) -> list[str]:
    """vLLM's engine flags for a configuration: a method on the small pool, or the ceiling."""
    blocks, seqs = args.blocks, args.num_prompts
    if config == CEILING:  # room for every request it lets run at once, uncompressed
        seqs = args.ceiling_seqs
        blocks = seqs * -(-max_model_len(args) // BLOCK_SIZE) + 1
    flags = ["--dtype", "float32", "--kv-cache-memory-bytes", "1G", "--block-size", str(BLOCK_SIZE),
             "--num-gpu-blocks-override", str(blocks), "--max-num-seqs", str(seqs),
             "--max-model-len", str(max_model_len(args))]
    if config not in ("none", CEILING):
        flags += ["--kv-compression", config, "--kv-budget", str(args.budget), "--kv-decode-interval",
                  str(args.interval), "--kv-memory-pressure"]
    return flags + (["--enforce-eager"] if args.eager else [])


def dataset_flags(args, model: Path) -> list[str]:
    return ["--model", str(model), "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-range-ratio", json.dumps({"input": args.range_ratio, "output": 0.0}),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts), "--seed", "0"]


def run_vllm(command: list[str]) -> None:
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)


def bench_serve(args, model: Path, config: str, result_dir: Path, name: str) -> dict:
    """One `vllm serve` for the configuration, and `vllm bench serve` against it; vLLM's result JSON."""
    from infokv_testing.local_server import vllm_cli, vllm_server

    with tempfile.TemporaryDirectory() as logs, \
            vllm_server(model, engine_flags(args, config), Path(logs) / "serve.log", base_flags=[]) as url:
        run_vllm([*vllm_cli(), "bench", "serve", "--backend", "openai", "--base-url", url, *dataset_flags(args, model),
                  "--ignore-eos", "--request-rate", "inf", "--temperature", "0",
                  "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                  "--save-result", "--result-dir", str(result_dir), "--result-filename", name, "--disable-tqdm"])
    return json.loads((result_dir / name).read_text())


def bench_throughput(args, model: Path, config: str, result_dir: Path, name: str) -> dict:
    """`vllm bench throughput` for the configuration, its JSON completed with the output side: every request
    produces exactly `output_len` tokens (vLLM's throughput client ignores EOS)."""
    from infokv_testing.local_server import vllm_cli

    path = result_dir / name
    run_vllm([*vllm_cli(), "bench", "throughput", *dataset_flags(args, model), *engine_flags(args, config),
              "--output-json", str(path)])
    result = json.loads(path.read_text())
    output_tokens = result["num_requests"] * args.output_len
    return {**result, "completed": result["num_requests"], "total_output_tokens": output_tokens,
            "output_throughput": output_tokens / result["elapsed_time"],
            "request_throughput": result["requests_per_second"]}


def configs_of(text: str) -> str:
    """An argparse type: the plugin's methods and `ceiling`."""
    from report import methods_of

    from infokv_vllm.config import method_names

    return methods_of((*method_names(), CEILING))(text)


def main() -> None:
    from report import RESULTS, median_range, ratio_text, write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--client", choices=("serve", "throughput"), default="serve",
                        help="`vllm bench serve` against `vllm serve`, or `vllm bench throughput` offline")
    parser.add_argument("--methods", default=None, type=configs_of,
                        help="comma-separated methods and `ceiling` (default: none,infokv for serve; "
                             "none,streaming,infokv,ceiling for throughput)")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--range-ratio", type=float, default=0.5, help="prompt lengths uniform in len * (1 +- r)")
    parser.add_argument("--output-len", type=int, default=384)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=61, help="KV pool in 32-token blocks (about 3 requests)")
    parser.add_argument("--ceiling-seqs", type=int, default=11,
                        help="the ceiling's --max-num-seqs: the peak concurrency compression reached on the small "
                             "pool in benchmarks/throughput.py")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (faster start-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=None, help="results/<name>.json (default: bench_<client>)")
    args = parser.parse_args()
    args.methods = args.methods or ("none,infokv" if args.client == "serve" else "none,streaming,infokv,ceiling")
    if args.smoke:
        args.num_prompts, args.input_len, args.output_len, args.budget, args.interval = 3, 60, 64, 48, 32
        args.blocks, args.ceiling_seqs, args.repeats, args.eager = 8, 3, 1, True
        args.methods = "none,infokv" if args.client == "serve" else "none,infokv,ceiling"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from infokv_testing.smollm2 import MODEL_NAME, ensure_model

    model = ensure_model()
    name = args.name or f"bench_{args.client}"
    result_dir = RESULTS / (f"{name}-smoke" if args.smoke else name)  # vLLM's raw JSONs, beside write_report's
    result_dir.mkdir(parents=True, exist_ok=True)
    bench = bench_serve if args.client == "serve" else bench_throughput
    metrics = METRICS[args.client]
    configs = args.methods.split(",")
    runs = []
    for round_index in range(args.repeats):
        for config in configs:
            result = bench(args, model, config, result_dir, f"{config}-round{round_index}.json")
            runs.append({"method": config, "round": round_index, **{m: result[m] for m in metrics},
                         "completed": result["completed"], "total_output_tokens": result["total_output_tokens"]})
            print(f"round {round_index} {config:9} {result['output_throughput']:8.2f} output tok/s", flush=True)
    summary = []
    for config in configs:
        mine = [r for r in runs if r["method"] == config]
        row = {"method": config, **{m: statistics.median(r[m] for r in mine) for m in metrics},
               "output_throughput_range": (min(r["output_throughput"] for r in mine),
                                           max(r["output_throughput"] for r in mine))}
        for key, reference in (("vs_none", "none"), ("vs_ceiling", CEILING)):
            row[key] = median_range([r["output_throughput"] / v["output_throughput"] for r in mine for v in runs
                                     if v["method"] == reference and v["round"] == r["round"]])
        summary.append(row)
    print(f"{'method':10} {'output tok/s (min-max)':>24} {'vs none (min-max)':>22} {'vs ceiling (min-max)':>22} "
          f"{'req/s':>6}" + (f" {'TTFT p50/p90 ms':>18} {'TPOT p50/p90 ms':>17}" if args.client == "serve" else ""))
    for row in summary:
        low, high = row["output_throughput_range"]
        line = (f"{row['method']:10} {row['output_throughput']:>10.1f} ({low:.0f}-{high:.0f}){'':>5} "
                f"{ratio_text(row['vs_none']):>22} {ratio_text(row['vs_ceiling']):>22} "
                f"{row['request_throughput']:>6.3f}")
        if args.client == "serve":
            line += (f" {row['median_ttft_ms']:>8.0f}/{row['p90_ttft_ms']:<9.0f} "
                     f"{row['median_tpot_ms']:>7.1f}/{row['p90_tpot_ms']:<9.1f}")
        print(line)
    write_report(name, args.smoke, model=MODEL_NAME, dtype="float32",
                 settings={k: v for k, v in vars(args).items() if k != "smoke"}, summary=summary, runs=runs)


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
