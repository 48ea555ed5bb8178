"""Throughput of vanilla vLLM and of the plugin, side by side in one run, on long-output workloads.

Two pool sizes: `bound` (the KV block pool is too small for the batch, so vanilla vLLM must queue or preempt)
and `unbound` (the pool fits everything: what compression costs when it cannot help). Every configuration runs
the same requests (greedy, fixed output length) in a fresh engine in this process; the table reports output
tokens/s and its ratio to vanilla on the same pool and mode, peak running requests, preemptions and pages freed.
Modes: `eager` (`enforce_eager`) and `compiled` (vLLM's default compilation; on CPU Dynamo + inductor, compiled
once at engine start, which the timing excludes).

    .venv/bin/python benchmarks/throughput.py            # the full run (minutes on 2 CPU cores)
    .venv/bin/python benchmarks/throughput.py --smoke    # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TOPICS = ["the history of tea", "how bridges are built", "the life of honeybees", "a journey to Mars",
          "the rules of chess", "why the sky is blue", "the invention of paper", "a storm at sea"]


@dataclass
class RunResult:
    pool: str
    mode: str
    method: str
    pool_blocks: int
    output_tokens: int
    seconds: float
    output_tokens_per_s: float
    peak_running: int
    preemptions: int
    compression_events: int
    blocks_freed: int


def run(model: Path, method: str, pool: str, pool_blocks: int, mode: str, num_requests: int, output_len: int,
        budget: int, interval: int) -> RunResult:
    from vllm import SamplingParams

    from infokv_vllm.testing.local_engine import BLOCK_SIZE, count_preemptions, in_process_llm, scheduler_of

    compression = None if method == "none" else {"method": method, "budget": budget, "decode_interval": interval}
    prompts = {f"r{i}": f"Write a long essay about {TOPICS[i % len(TOPICS)]}." for i in range(num_requests)}
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    # vLLM refuses a pool smaller than one max-length request (block 0 is reserved), so the pool caps the context.
    max_model_len = min(1024, (pool_blocks - 1) * BLOCK_SIZE)
    with in_process_llm(model, compression, num_gpu_blocks_override=pool_blocks, max_model_len=max_model_len,
                        max_num_seqs=num_requests, enforce_eager=mode == "eager") as llm:
        scheduler = scheduler_of(llm)
        preemptions = count_preemptions(llm)
        engine = llm.llm_engine
        for request_id, prompt in prompts.items():
            engine.add_request(request_id, prompt, params)
        peak_running, produced = 0, 0
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    produced += len(output.outputs[0].token_ids)
            peak_running = max(peak_running, len(scheduler.running))
        seconds = time.perf_counter() - start
        totals = getattr(scheduler, "totals", None)
        return RunResult(pool, mode, method, pool_blocks, produced, round(seconds, 2), round(produced / seconds, 2),
                         peak_running, preemptions[0], totals.events if totals else 0,
                         totals.blocks_freed if totals else 0)


def summarise(results: list[RunResult], configs: list[tuple[str, int, str, str]]) -> list[dict]:
    """Per configuration: median tokens/s with its coefficient of variation across repeats, the ratio of the
    medians to vanilla on the same pool and mode, and the counters of the first repeat (they do not vary)."""
    rows = []
    for pool, _, mode, method in configs:
        runs = [r for r in results if (r.pool, r.mode, r.method) == (pool, mode, method)]
        speeds = [r.output_tokens_per_s for r in runs]
        mean = statistics.fmean(speeds)
        rows.append({**asdict(runs[0]), "output_tokens_per_s": statistics.median(speeds),
                     "cv": statistics.pstdev(speeds) / mean if mean else 0.0})
    vanilla = {(row["pool"], row["mode"]): row["output_tokens_per_s"] for row in rows if row["method"] == "none"}
    eager = {(row["pool"], row["method"]): row["output_tokens_per_s"] for row in rows if row["mode"] == "eager"}
    for row in rows:
        same_pool = (row["pool"], row["mode"])
        row["vs_none"] = row["output_tokens_per_s"] / vanilla[same_pool] if same_pool in vanilla else None
        same_method = (row["pool"], row["method"])
        row["vs_eager"] = row["output_tokens_per_s"] / eager[same_method] if same_method in eager else None
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main() -> None:
    from report import methods_of, write_report  # beside this script (benchmarks run as files)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    from infokv_vllm.config import METHODS  # the plugin's registry of --kv-compression methods

    parser.add_argument("--methods", default="none,streaming,infokv", type=methods_of(METHODS))
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--output-len", type=int, default=192)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--interval", type=int, default=32)
    parser.add_argument("--bound-blocks", type=int, default=32, help="pool size (32-token blocks) of 'bound'")
    parser.add_argument("--unbound-blocks", type=int, default=256)
    parser.add_argument("--pools", default="bound,unbound")
    parser.add_argument("--modes", default="eager,compiled", help="eager (enforce_eager) and/or compiled")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all configurations (interleaved)")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.output_len, args.bound_blocks, args.unbound_blocks, args.repeats = 2, 112, 8, 32, 1
        args.modes = "eager"  # compiling takes a minute per engine on 2 cores
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from infokv_vllm.testing.smollm2 import MODEL_NAME, ensure_model

    model = ensure_model()
    pool_blocks = {"bound": args.bound_blocks, "unbound": args.unbound_blocks}
    configs = [(pool, pool_blocks[pool], mode, method) for pool in args.pools.split(",")
               for mode in args.modes.split(",") for method in args.methods.split(",")]
    # Rounds over every configuration, so slow drifts of the machine hit all of them alike.
    results = [run(model, method, pool, blocks, mode, args.requests, args.output_len, args.budget, args.interval)
               for _ in range(args.repeats) for pool, blocks, mode, method in configs]
    summary = summarise(results, configs)
    print(f"{'pool':8} {'mode':9} {'method':10} {'blocks':>6} {'tok/s':>8} {'cv':>6} {'vs none':>8} "
          f"{'vs eager':>8} {'peak run':>8} {'preempt':>8} {'events':>7} {'freed':>6}")
    for row in summary:
        print(f"{row['pool']:8} {row['mode']:9} {row['method']:10} {row['pool_blocks']:>6} "
              f"{row['output_tokens_per_s']:>8.2f} {row['cv']:>6.1%} {_ratio(row['vs_none']):>8} "
              f"{_ratio(row['vs_eager']):>8} {row['peak_running']:>8} {row['preemptions']:>8} "
              f"{row['compression_events']:>7} {row['blocks_freed']:>6}")
    write_report("throughput", args.smoke, model=MODEL_NAME, dtype="float32", block_size=32,
                 workload={"requests": args.requests, "output_len": args.output_len, "budget": args.budget,
                           "decode_interval": args.interval},
                 repeats=args.repeats, summary=summary, runs=[asdict(r) for r in results])


if __name__ == "__main__":
    main()
