"""fp8 KV and compression together, at the same KV pool bytes: does fp8's byte saving multiply compression's?

The workload is `throughput.py`'s, memory-bound (long greedy outputs after prompts of varied length, on a pool that
fits only a few uncompressed requests). Every configuration gets the same pool **bytes**: an fp8 pool (one byte per
element) has `element size of --dtype` times the blocks of an unquantised one. Configurations, each on a fresh
engine in this process, interleaved over rounds:
- `vanilla`: no compression, the model's dtype in the cache;
- `fp8`: no compression, `--kv-cache-dtype fp8`;
- `infokv`: compression (budget + interval), the model's dtype in the cache;
- `fp8+infokv`: both;
- `ceiling`: no compression, the model's dtype, on a pool with room for every request it lets run at once, capped
  at the peak concurrency `fp8+infokv` reached in round one (the best a compressor that cost nothing could do).

Reported per configuration: pool blocks and bytes, KV bytes per token, pool bytes per running request (pool bytes
over mean running requests: what a request costs where the pool binds), output tokens/s (median and min-max over
rounds), ratios to vanilla and to the ceiling (medians of per-round ratios, min-max), peak and mean running
requests, preemptions, compressions. The running-request ratio of `fp8+infokv` to `infokv` is printed last.
Answer quality with fp8 and compression together is GSM8K's job (`scenarios.py --kv-cache-dtype fp8`).

    .venv/bin/python benchmarks/fp8.py             # the full run (about 20 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/fp8.py --smoke     # tiny sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path

# label -> (method, fp8 cache)
CONFIGS = {"vanilla": ("none", False), "fp8": ("none", True), "infokv": ("infokv", False),
           "fp8+infokv": ("infokv", True), "ceiling": ("none", False)}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
WORKLOADS = {
    "cpu": dict(requests=32, prompt_len=(128, 384), output_len=256, budget=128, interval=64, small_blocks=61),
    "smoke": dict(requests=4, prompt_len=(40, 80), output_len=64, budget=48, interval=32, small_blocks=8),
}


def kv_bytes_per_token(model: Path, element_bytes: int) -> int:
    """Keys and values of every layer for one token."""
    config = json.loads((model / "config.json").read_text())
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return 2 * config["num_hidden_layers"] * kv_heads * head_size * element_bytes


def main() -> None:
    from report import figure_with_axes, ratio_text, save_figure, write_report
    from throughput import Workload, run, summarise

    from infokv_testing.local_engine import BLOCK_SIZE
    from infokv_testing.smollm2 import MODEL_NAME, ensure_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(ELEMENT_BYTES),
                        help="the model's dtype, and the unquantised cache's (bfloat16: fp8 halves the bytes, as on "
                             "a GPU)")
    parser.add_argument("--kv-cache-dtype", default="fp8", help="the quantised cache (fp8, fp8_e4m3, fp8_e5m2)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all configurations (interleaved)")
    parser.add_argument("--name", default="fp8", help="the results' file name")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = WORKLOADS["smoke" if args.smoke else "cpu"]
    small_blocks = sizes.pop("small_blocks")
    workload = Workload(**sizes)
    model = ensure_model()
    element_bytes = ELEMENT_BYTES[args.dtype]
    token_bytes = {False: kv_bytes_per_token(model, element_bytes), True: kv_bytes_per_token(model, 1)}
    pool_bytes = small_blocks * BLOCK_SIZE * token_bytes[False]
    blocks_per_request = -(-workload.max_model_len // BLOCK_SIZE)
    ceiling_seqs = workload.requests
    results = []

    def blocks_of(label: str) -> int:
        if label == "ceiling":
            return ceiling_seqs * blocks_per_request + 1
        return pool_bytes // (BLOCK_SIZE * token_bytes[CONFIGS[label][1]])

    def summary() -> list[dict]:
        configs = [(label, method) for label, (method, _) in CONFIGS.items()
                   if any(r.pool == label for r in results)]
        rows = summarise(results, configs, {"vs_vanilla": ("vanilla", "none"), "vs_ceiling": ("ceiling", "none")})
        for row in rows:
            fp8 = CONFIGS[row["pool"]][1]
            mean_running = statistics.fmean(r.mean_running for r in results if r.pool == row["pool"])
            row.update(label=row["pool"], kv_cache_dtype=args.kv_cache_dtype if fp8 else "auto",
                       pool_bytes=row["pool_blocks"] * BLOCK_SIZE * token_bytes[fp8],
                       kv_bytes_per_token=token_bytes[fp8])
            row["pool_bytes_per_running_request"] = round(row["pool_bytes"] / mean_running)
        return rows

    def save(complete: bool) -> tuple[Path, list[dict]]:
        rows = summary()
        path = write_report(args.name, args.smoke, complete=complete, model=MODEL_NAME, dtype=args.dtype,
                            kv_cache_dtype=args.kv_cache_dtype, block_size=BLOCK_SIZE, workload=asdict(workload),
                            same_pool_bytes=pool_bytes, ceiling_max_num_seqs=ceiling_seqs, repeats=args.repeats,
                            summary=rows, runs=[asdict(r) for r in results])
        return path, rows

    engine_of = {False: dict(dtype=args.dtype), True: dict(dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)}
    for round_index in range(args.repeats):
        for label, (method, fp8) in CONFIGS.items():
            if (round_index, label) == (0, "ceiling"):
                ceiling_seqs = next(r.peak_running for r in results if r.pool == "fp8+infokv")
            seqs = ceiling_seqs if label == "ceiling" else workload.requests
            result = run(model, workload, method, label, blocks_of(label), seqs, "eager", round_index,
                         engine_of[fp8])
            print(f"round {round_index} {label:10} {result.output_tokens_per_s:8.2f} tok/s "
                  f"peak {result.peak_running} mean {result.mean_running}", flush=True)
            results.append(result)
            save(complete=False)
    path, rows = save(complete=True)
    print(f"{'configuration':12} {'blocks':>6} {'B/token':>7} {'B/request':>10} {'tok/s (min-max)':>18} "
          f"{'vs vanilla':>18} {'vs ceiling':>18} {'peak':>4} {'mean':>5} {'preempt':>7} {'events':>6}")
    for row in rows:
        speed = f"{row['output_tokens_per_s']:.1f} ({row['min']:.0f}-{row['max']:.0f})"
        print(f"{row['label']:12} {row['pool_blocks']:>6} {row['kv_bytes_per_token']:>7} "
              f"{row['pool_bytes_per_running_request']:>10} {speed:>18} {ratio_text(row['vs_vanilla']):>18} "
              f"{ratio_text(row['vs_ceiling']):>18} {row['peak_running']:>4} {row['mean_running']:>5} "
              f"{row['preemptions']:>7} {row['compression_events']:>6}")
    by_label = {row["label"]: row for row in rows}
    print(f"fp8+infokv / infokv running requests: peak "
          f"{by_label['fp8+infokv']['peak_running'] / by_label['infokv']['peak_running']:.2f}x, mean "
          f"{by_label['fp8+infokv']['mean_running'] / by_label['infokv']['mean_running']:.2f}x")
    figure, (speed_axis, running_axis) = figure_with_axes(2, (12, 4))
    labels = [row["label"] for row in rows]
    medians = [row["output_tokens_per_s"] for row in rows]
    speed_axis.bar(labels, medians, yerr=[[m - row["min"] for m, row in zip(medians, rows)],
                                          [row["max"] - m for m, row in zip(medians, rows)]], capsize=3)
    speed_axis.set_ylabel("output tokens/s (median, min-max)")
    running_axis.bar(labels, [row["mean_running"] for row in rows])
    running_axis.set_ylabel("mean running requests")
    for axis in (speed_axis, running_axis):
        axis.tick_params(axis="x", rotation=30, labelsize=8)
    figure.suptitle(f"{MODEL_NAME} {args.dtype}, same pool bytes ({pool_bytes / 2**20:.0f} MiB), "
                    f"budget {workload.budget} + {workload.interval}", fontsize=9)
    save_figure(figure, path.with_suffix(".png"))


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
