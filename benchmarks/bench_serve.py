"""The user's own tool: `vllm bench serve` against `vllm serve`, with and without compression, on a small KV pool.

For each method a `vllm serve` starts with the same small block pool (`--num-gpu-blocks-override`), vLLM's
default compilation, and the method's flags; `vllm bench serve` then sends every request of its random dataset at
once (fixed long outputs, `--ignore-eos`) and saves its result JSON. Servers start afresh in each round, methods
interleaved, so the ratios to `none` are taken round by round. The table reports vLLM's own numbers: output
tokens/s, request throughput, TTFT and TPOT percentiles; the raw `vllm bench serve` JSONs go under
`benchmarks/results/bench_serve/`.

    .venv/bin/python benchmarks/bench_serve.py            # the full run (about 15 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_serve.py --smoke

Each round runs, for a method, what a user would type:

    vllm serve MODEL --dtype float32 --kv-cache-memory-bytes 1G --block-size 32 --num-gpu-blocks-override 61 \\
        --max-model-len 768 --kv-compression infokv --kv-budget 128 --kv-decode-interval 64 --kv-memory-pressure
    vllm bench serve --backend openai --model MODEL --dataset-name random --random-input-len 256 \\
        --random-range-ratio '{"input": 0.5, "output": 0}' --random-output-len 384 --ignore-eos \\
        --num-prompts 24 --request-rate inf
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

METRICS = ("output_throughput", "request_throughput", "median_ttft_ms", "p90_ttft_ms", "median_tpot_ms",
           "p90_tpot_ms")


def server_flags(args, method: str) -> list[str]:
    flags = ["--dtype", "float32", "--kv-cache-memory-bytes", "1G", "--block-size", "32",
             "--num-gpu-blocks-override", str(args.blocks),
             "--max-model-len", str(int(args.input_len * (1 + args.range_ratio)) + args.output_len)]
    if method != "none":
        flags += ["--kv-compression", method, "--kv-budget", str(args.budget), "--kv-decode-interval",
                  str(args.interval), "--kv-memory-pressure"]
    return flags + (["--enforce-eager"] if args.eager else [])


def bench(args, model: Path, url: str, result_dir: Path, name: str) -> dict:
    from infokv_vllm.testing.local_server import vllm_cli

    command = [*vllm_cli(), "bench", "serve", "--backend", "openai", "--base-url", url, "--model", str(model),
               "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-range-ratio", json.dumps({"input": args.range_ratio, "output": 0.0}),
               "--random-output-len", str(args.output_len),
               "--ignore-eos", "--num-prompts", str(args.num_prompts), "--request-rate", "inf", "--seed", "0",
               "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles",
               "50,90,99", "--save-result", "--result-dir", str(result_dir), "--result-filename", name,
               "--disable-tqdm"]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    return json.loads((result_dir / name).read_text())


def main() -> None:
    from report import RESULTS, median_range, methods_of, ratio_text, write_report

    from infokv_vllm.config import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--methods", default="none,infokv", type=methods_of(METHODS))
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--range-ratio", type=float, default=0.5, help="prompt lengths uniform in len * (1 +- r)")
    parser.add_argument("--output-len", type=int, default=384)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=61, help="KV pool in 32-token blocks (about 3 requests)")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager servers (faster start-up)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:
        args.num_prompts, args.input_len, args.output_len, args.budget, args.interval = 3, 60, 64, 48, 32
        args.blocks, args.repeats, args.methods, args.eager = 8, 1, "none,infokv", True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from infokv_vllm.testing.local_server import vllm_server
    from infokv_vllm.testing.smollm2 import MODEL_NAME, ensure_model

    model = ensure_model()
    result_dir = RESULTS / ("bench_serve-smoke" if args.smoke else "bench_serve")
    result_dir.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    runs = []
    for round_index in range(args.repeats):
        for method in methods:
            with tempfile.TemporaryDirectory() as logs, \
                    vllm_server(model, server_flags(args, method), Path(logs) / "serve.log", base_flags=[]) as url:
                result = bench(args, model, url, result_dir, f"{method}-round{round_index}.json")
            runs.append({"method": method, "round": round_index, **{m: result[m] for m in METRICS},
                         "completed": result["completed"], "total_output_tokens": result["total_output_tokens"]})
            print(f"round {round_index} {method:9} {result['output_throughput']:8.2f} output tok/s", flush=True)
    summary = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, **{m: statistics.median(r[m] for r in mine) for m in METRICS},
               "output_throughput_range": (min(r["output_throughput"] for r in mine),
                                           max(r["output_throughput"] for r in mine))}
        ratios = [r["output_throughput"] / v["output_throughput"] for r in mine for v in runs
                  if v["method"] == "none" and v["round"] == r["round"]]
        row["vs_none"] = median_range(ratios)
        summary.append(row)
    print(f"{'method':10} {'output tok/s (min-max)':>24} {'vs none (min-max)':>22} {'req/s':>6} "
          f"{'TTFT p50/p90 ms':>18} {'TPOT p50/p90 ms':>17}")
    for row in summary:
        low, high = row["output_throughput_range"]
        print(f"{row['method']:10} {row['output_throughput']:>10.1f} ({low:.0f}-{high:.0f}){'':>5} "
              f"{ratio_text(row['vs_none']):>22} "
              f"{row['request_throughput']:>6.3f} {row['median_ttft_ms']:>8.0f}/{row['p90_ttft_ms']:<9.0f} "
              f"{row['median_tpot_ms']:>7.1f}/{row['p90_tpot_ms']:<9.1f}")
    write_report("bench_serve", args.smoke, model=MODEL_NAME,
                 settings={k: v for k, v in vars(args).items() if k != "smoke"}, summary=summary, runs=runs)


if __name__ == "__main__":
    main()
