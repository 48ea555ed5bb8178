"""Throughput where KV memory is the bottleneck: vanilla vLLM, the ceiling, and each policy, side by side.

The workload is memory-bound: long greedy outputs (`ignore_eos`) after prompts of varied length, on a `small` KV
block pool that fits only a few uncompressed requests. A compressed request holds about a quarter of its full KV
(the kept length cycles between the budget and budget + interval), so more requests run at once.

Configurations, each on a fresh engine in this process, interleaved over rounds so that slow drifts of the
machine hit all of them alike:
- `small` pool: vanilla vLLM (`none`) and every policy;
- `ample` pool (room for every request it runs at once), with `max_num_seqs` capped at the concurrency
  compression reaches on the small pool (the peak measured in round one): `none` there is the **ceiling**, the
  best a compressor that cost nothing could do; each policy there shows what compression costs when memory is
  not short.

Reported per configuration: output tokens/s (median and min-max over rounds), ratios to vanilla on the small
pool and to the ceiling (medians of the per-round ratios, with their min-max), peak and mean running requests,
preemptions, compressions, TTFT and TPOT percentiles. A plot goes beside the JSON.

    .venv/bin/python benchmarks/throughput.py            # the full run (about 30 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/throughput.py --smoke    # seconds; what CI runs
    python benchmarks/throughput.py --gpu --model DIR --mode compiled --attention-backend FLASH_ATTN  # one GPU
    .venv/bin/python benchmarks/throughput.py --family gpt-oss --shapes '{"num_hidden_layers": 8}'  # a shape

`--family` writes a random-weight model of one of `infokv_testing.tiny_models`' families (gpt-oss: sliding-window
and full-attention layers in turn, with sinks), scaled by `--shapes`; in a model with sliding-window layers each
request holds pages in both KV cache groups, which the ample pool counts.

On a GPU (`--gpu`; `scripts/gpu_check.sh throughput` runs it on the random Llama-3.1-8B-shaped model) the
workload is sized for 80 GB; docs/platforms.md says which runs have completed on which card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Prompt token ids are drawn from here: ordinary tokens of SmolLM2's vocabulary (no special tokens), as vLLM's
# random dataset does.
PROMPT_TOKEN_RANGE = (1000, 40000)


# Workload defaults: CPU (SmolLM2, a pool of about 3 uncompressed requests), smoke (tiny), and GPU (an 8B model
# on one 80 GB GPU: a pool of 4,608 16-token blocks, about 32 uncompressed requests; output lengths that let
# vanilla, infokv and the ceiling run within one 10-minute call of the GPU machines this project borrows).
WORKLOADS = {
    "cpu": dict(requests=24, prompt_len="128,384", output_len=384, budget=128, interval=64, small_blocks=61),
    "smoke": dict(requests=4, prompt_len="40,80", output_len=96, budget=48, interval=32, small_blocks=8),
    "gpu": dict(requests=256, prompt_len="768,1280", output_len=1024, budget=512, interval=64, small_blocks=4608),
}


@dataclass(frozen=True)
class Workload:
    requests: int
    prompt_len: tuple[int, int]  # min, max (uniform)
    output_len: int
    budget: int
    interval: int
    memory_pressure: bool = False
    seed: int = 0

    def prompts(self) -> dict[str, dict]:
        rng = random.Random(self.seed)
        prompts = {}
        for index in range(self.requests):
            length = rng.randint(*self.prompt_len)
            prompts[f"r{index}"] = {"prompt_token_ids": [rng.randrange(*PROMPT_TOKEN_RANGE) for _ in range(length)]}
        return prompts

    def compression(self, method: str) -> dict | None:
        return None if method == "none" else {"method": method, "budget": self.budget,
                                              "decode_interval": self.interval,
                                              "memory_pressure": self.memory_pressure}

    @property
    def max_model_len(self) -> int:
        return self.prompt_len[1] + self.output_len


@dataclass
class RunResult:
    pool: str
    method: str
    mode: str
    round: int
    pool_blocks: int
    max_num_seqs: int
    output_tokens: int
    seconds: float
    output_tokens_per_s: float
    peak_running: int
    mean_running: float
    preemptions: int
    compression_events: int
    ttft_s: list[float] = field(repr=False)
    tpot_s: list[float] = field(repr=False)


def run(model: Path, workload: Workload, method: str, pool: str, pool_blocks: int, max_num_seqs: int, mode: str,
        round_index: int, engine: dict) -> RunResult:
    from vllm import SamplingParams

    from infokv_testing.local_engine import count_preemptions, in_process_llm, scheduler_of

    params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
    with in_process_llm(model, workload.compression(method), num_gpu_blocks_override=pool_blocks,
                        max_model_len=workload.max_model_len, max_num_seqs=max_num_seqs,
                        enforce_eager=mode == "eager", **engine) as llm:
        scheduler = scheduler_of(llm)
        preemptions = count_preemptions(llm)
        llm_engine = llm.llm_engine
        for request_id, prompt in workload.prompts().items():
            llm_engine.add_request(request_id, prompt, params)
        first_token, finished, produced = {}, {}, {}
        running_per_step = []
        start = time.perf_counter()
        while llm_engine.has_unfinished_requests():
            outputs = llm_engine.step()
            now = time.perf_counter() - start
            running_per_step.append(len(scheduler.running))
            for output in outputs:
                if output.outputs[0].token_ids:
                    first_token.setdefault(output.request_id, now)
                if output.finished:
                    finished[output.request_id] = now
                    produced[output.request_id] = len(output.outputs[0].token_ids)
        seconds = time.perf_counter() - start
        totals = getattr(scheduler, "totals", None)
    tokens = sum(produced.values())
    return RunResult(
        pool=pool, method=method, mode=mode, round=round_index, pool_blocks=pool_blocks, max_num_seqs=max_num_seqs,
        output_tokens=tokens, seconds=round(seconds, 2), output_tokens_per_s=round(tokens / seconds, 2),
        peak_running=max(running_per_step), mean_running=round(statistics.fmean(running_per_step), 2),
        preemptions=preemptions[0], compression_events=totals.events if totals else 0,
        ttft_s=[round(first_token[r], 3) for r in sorted(finished)],
        tpot_s=[round((finished[r] - first_token[r]) / max(1, produced[r] - 1), 4) for r in sorted(finished)])


def _run_in_child(connection, args: tuple) -> None:
    connection.send(run(*args))


def run_in_own_process(*args) -> RunResult:
    """`run` in a fresh process. On a GPU an engine shut down in-process keeps part of its memory (23 GiB after
    an 8B model on an H200), so the next engine would not start at the same memory share."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_run_in_child, args=(sender, args))
    child.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    child.join()
    if result is None:
        raise RuntimeError(f"the engine's process died (exit code {child.exitcode})")
    return result


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


# The configurations every other is compared with, by the ratio's name: vanilla on the small pool, and the ceiling
REFERENCES = {"vs_vanilla": ("small", "none"), "vs_ceiling": ("ample", "none")}


def summarise(results: list[RunResult], configs: list[tuple[str, str]],
              references: dict[str, tuple[str, str]] = REFERENCES) -> list[dict]:
    """Per configuration (pool, method): tokens/s median and range over rounds; ratios to each of `references`,
    taken round by round (each round's engines ran back to back) and then summarised the same way."""
    from report import median_range  # beside this script (benchmarks run as files)

    by_round = {(r.pool, r.method, r.round): r.output_tokens_per_s for r in results}
    rows = []
    for pool, method in configs:
        runs = [r for r in results if (r.pool, r.method) == (pool, method)]
        speeds = [r.output_tokens_per_s for r in runs]
        ttft = [t for r in runs for t in r.ttft_s]
        tpot = [t for r in runs for t in r.tpot_s]
        row = {"pool": pool, "method": method, "label": _label(pool, method), "mode": runs[0].mode,
               "pool_blocks": runs[0].pool_blocks, "max_num_seqs": runs[0].max_num_seqs,
               "output_tokens_per_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
               "cv": statistics.pstdev(speeds) / statistics.fmean(speeds),
               "peak_running": max(r.peak_running for r in runs),
               "mean_running": round(statistics.fmean(r.mean_running for r in runs), 2),
               "preemptions": statistics.median(r.preemptions for r in runs),
               "compression_events": statistics.median(r.compression_events for r in runs),
               "ttft_p50_s": _percentile(ttft, 50), "ttft_p90_s": _percentile(ttft, 90),
               "tpot_p50_ms": 1000 * _percentile(tpot, 50), "tpot_p90_ms": 1000 * _percentile(tpot, 90)}
        for name, reference in references.items():
            ratios = [r.output_tokens_per_s / by_round[(*reference, r.round)] for r in runs
                      if (*reference, r.round) in by_round]
            row[name] = median_range(ratios)
        rows.append(row)
    return rows


def _label(pool: str, method: str) -> str:
    return "ceiling" if (pool, method) == ("ample", "none") else f"{method} ({pool})"


def plot(rows: list[dict], path: Path, title: str) -> None:
    from report import figure_with_axes, save_figure

    figure, (axis,) = figure_with_axes(1, (8, 4))
    labels = [row["label"] for row in rows]
    medians = [row["output_tokens_per_s"] for row in rows]
    errors = [[m - row["min"] for m, row in zip(medians, rows)], [row["max"] - m for m, row in zip(medians, rows)]]
    colours = ["tab:gray" if row["method"] == "none" else "tab:blue" if row["pool"] == "small" else "tab:orange"
               for row in rows]
    axis.bar(labels, medians, yerr=errors, color=colours, capsize=3)
    axis.set_ylabel("output tokens/s (median, min-max)")
    axis.set_title(title, fontsize=9)
    axis.tick_params(axis="x", rotation=30, labelsize=8)
    save_figure(figure, path)


def main() -> None:
    from report import methods_of, ratio_text, write_report  # beside this script (benchmarks run as files)

    from infokv_vllm.config import method_names  # the plugin's registry of --kv-compression methods

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--methods", default="none,streaming,snapkv,rkv,entropy,infokv", type=methods_of(method_names()),
                        help="on the small pool")
    parser.add_argument("--ample-methods", default="none,streaming,infokv", type=methods_of(method_names()),
                        help="on the ample pool capped at the compressed concurrency ('none' is the ceiling)")
    # The workload's defaults depend on --gpu and --smoke (WORKLOADS); a value given here wins over both.
    parser.add_argument("--requests", type=int)
    parser.add_argument("--prompt-len", help="min,max prompt tokens (uniform)")
    parser.add_argument("--output-len", type=int)
    parser.add_argument("--budget", type=int)
    parser.add_argument("--interval", type=int)
    parser.add_argument("--small-blocks", type=int,
                        help="the small pool in blocks (CPU: 61 blocks of 32 tokens, about 3 uncompressed requests)")
    parser.add_argument("--memory-pressure", action="store_true",
                        help="policies compress running requests before vLLM would preempt one (--kv-memory-pressure)")
    parser.add_argument("--mode", default="eager", choices=("eager", "compiled"),
                        help="eager (enforce_eager) or compiled (vLLM's default; compiled at engine start, which "
                             "the timing excludes)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all configurations (interleaved)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model directory (default: SmolLM2-135M, the CPU test model); on a GPU, e.g. the "
                             "random Llama-3.1-8B-shaped model of `infokv_testing.random_models`")
    parser.add_argument("--family", default=None,
                        help="write a random-weight model of this family of infokv_testing.tiny_models (e.g. gpt-oss) "
                             "and run it, instead of --model")
    parser.add_argument("--shapes", type=json.loads, default={},
                        help="JSON config fields that scale --family's model (layers, hidden size, window)")
    parser.add_argument("--gpu", action="store_true",
                        help="a memory-bound workload sized for one 80 GB GPU and an 8B model: 256 requests, "
                             "768-1280-token prompts, 1,024 output tokens, budget 512, a pool of 4,608 16-token "
                             "blocks (about 32 uncompressed requests); bfloat16; each engine in its own process")
    parser.add_argument("--attention-backend", default=None, help="vLLM's attention backend (GPU: FLASH_ATTN, "
                                                                   "TRITON_ATTN)")
    parser.add_argument("--name", default="throughput", help="the results' file name")
    parser.add_argument("--engine-per-process", action=argparse.BooleanOptionalAction, default=None,
                        help="each configuration's engine in a fresh process (default: on with --gpu, where an "
                             "engine shut down in-process keeps part of its GPU memory)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.methods, args.ample_methods = 1, "none,infokv", "none"
    defaults = WORKLOADS["smoke" if args.smoke else "gpu" if args.gpu else "cpu"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from infokv_testing.local_engine import BLOCK_SIZE
    from infokv_testing.smollm2 import MODEL_NAME, ensure_model

    model = args.model or ensure_model()
    model_name = MODEL_NAME if args.model is None else args.model.name
    if args.family:
        from infokv_testing.models import cache_dir
        from infokv_testing.tiny_models import write_tiny_model

        shapes = json.dumps(args.shapes, sort_keys=True)
        model_name = f"random {args.family} {shapes}"
        model = cache_dir() / "random" / f"{args.family}-{hashlib.sha256(shapes.encode()).hexdigest()[:12]}"
        if not (model / "config.json").exists():
            write_tiny_model(args.family, ensure_model(), model, **args.shapes)
    # The CPU defaults of `in_process_llm` (float32, a fixed KV size, 32-token blocks) become a GPU's.
    engine = dict(dtype="bfloat16", block_size=16, kv_cache_memory_bytes=None,
                  gpu_memory_utilization=0.9) if args.gpu else {}
    if args.attention_backend:
        engine["attention_backend"] = args.attention_backend
    block_size = engine.get("block_size", BLOCK_SIZE)
    low, high = map(int, args.prompt_len.split(","))
    workload = Workload(args.requests, (low, high), args.output_len, args.budget, args.interval,
                        args.memory_pressure)
    # Every KV cache group of the model holds a request's tokens (a sliding-window group fewer): the ample pool
    # counts each group in full.
    layer_kinds = set(json.loads((Path(model) / "config.json").read_text()).get("layer_types") or ["full_attention"])
    blocks_per_request = -(-workload.max_model_len // block_size) * len(layer_kinds)
    small = [("small", method) for method in args.methods.split(",")]
    # Compressed configurations first: their peak concurrency in round one caps the ample pool.
    small.sort(key=lambda config: config[1] == "none")
    ample = [("ample", method) for method in args.ample_methods.split(",")]
    results: list[RunResult] = []
    ceiling_seqs = args.requests
    per_process = args.gpu if args.engine_per_process is None else args.engine_per_process
    runner = run_in_own_process if per_process else run

    def save(complete: bool) -> tuple[Path, list[dict]]:
        done = [config for config in small + ample if any((r.pool, r.method) == config for r in results)]
        summary = summarise(results, done)
        path = write_report(args.name, args.smoke, complete=complete, model=model_name,
                            dtype=engine.get("dtype", "float32"), block_size=block_size,
                            attention_backend=args.attention_backend, mode=args.mode, workload=asdict(workload),
                            small_blocks=args.small_blocks, ample_blocks=ample_blocks,
                            ceiling_max_num_seqs=ceiling_seqs, repeats=args.repeats, summary=summary,
                            runs=[asdict(r) for r in results])
        return path, summary

    for round_index in range(args.repeats):
        for pool, method in small + ample:
            if (round_index, pool) == (0, "ample"):
                compressed = [r.peak_running for r in results if r.pool == "small" and r.method != "none"]
                ceiling_seqs = max(compressed, default=args.requests)
            # The ample pool holds every request it lets run at once, uncompressed.
            ample_blocks = ceiling_seqs * blocks_per_request + 1
            blocks, seqs = (args.small_blocks, args.requests) if pool == "small" else (ample_blocks, ceiling_seqs)
            result = runner(model, workload, method, pool, blocks, seqs, args.mode, round_index, engine)
            print(f"round {round_index} {pool:5} {method:9} {result.output_tokens_per_s:8.2f} tok/s "
                  f"peak {result.peak_running} mean {result.mean_running}", flush=True)
            results.append(result)
            # After every run, so that a run cut short (a GPU machine's 10-minute call) leaves what it measured.
            save(complete=False)
    path, summary = save(complete=True)
    print(f"{'configuration':18} {'blocks':>6} {'seqs':>4} {'tok/s (min-max)':>20} {'vs vanilla':>20} "
          f"{'vs ceiling':>20} {'peak':>4} {'mean':>5} {'preempt':>7} {'events':>6} {'TTFT p50/p90 s':>15} "
          f"{'TPOT p50/p90 ms':>16}")
    for row in summary:
        speed = f"{row['output_tokens_per_s']:.1f} ({row['min']:.0f}-{row['max']:.0f})"
        print(f"{row['label']:18} {row['pool_blocks']:>6} {row['max_num_seqs']:>4} {speed:>20} "
              f"{ratio_text(row['vs_vanilla']):>20} {ratio_text(row['vs_ceiling']):>20} {row['peak_running']:>4} "
              f"{row['mean_running']:>5} {row['preemptions']:>7} {row['compression_events']:>6} "
              f"{row['ttft_p50_s']:>7.1f}/{row['ttft_p90_s']:<7.1f} "
              f"{row['tpot_p50_ms']:>7.1f}/{row['tpot_p90_ms']:<8.1f}")
    plot(summary, path.with_suffix(".png"),
         f"{model_name}, {args.mode}, {args.requests} requests x {args.output_len} output tokens, "
         f"budget {args.budget} + {args.interval}; small pool {args.small_blocks} blocks")


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
