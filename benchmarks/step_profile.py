"""Where a compressing engine's time goes, per engine step: timers around the plugin's parts of the step.

Each method runs the throughput benchmark's workload on an ample pool (so every method runs the same batch and the
difference to `none` is the plugin's own cost), in a fresh in-process engine. Wall-clock timers wrap the
plugin's functions (torch on CPU is synchronous, so wall time is compute time); timers nest, and the table
indents each part under the one that contains it. Timers add a few microseconds per call; the per-layer ones
are called layers x steps times, so `none` runs with the same wrappers installed where they exist.

    .venv/bin/python benchmarks/step_profile.py                 # eager and compiled, about 8 minutes
    .venv/bin/python benchmarks/step_profile.py --small-pool --methods entropy,infokv --modes eager
    .venv/bin/python benchmarks/step_profile.py --smoke

`--hot-prefix` profiles what a request that finds its prompt's prefix cached waits for before its first token (the
prefix-cache benchmark's TTFT): one request computes a shared prefix (and is compressed), then each measured
request (the prefix plus a few new tokens) runs alone; only the steps up to its first token are timed.

    .venv/bin/python benchmarks/step_profile.py --hot-prefix --model qwen2.5-0.5b --methods none,infokv
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import time

import torch

# (owner module, attribute path, label, parent label): the timed parts, outermost first.
TIMED = [
    ("vllm.v1.engine.core", "EngineCore.step", "engine step", None),
    ("infokv_vllm.core.scheduler", "CompressingScheduler.schedule", "schedule + compaction decisions",
     "engine step"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "vLLM schedule", "schedule + compaction decisions"),
    ("infokv_vllm.core.runner", "CompressingRunnerMixin.execute_model", "worker: compactions + execute",
     "engine step"),
    ("infokv_vllm.signals.attention", "AttentionRecorder._add_deferred_mass", "deferred window mass",
     "worker: compactions + execute"),
    ("infokv_vllm.core.runner", "CompressingRunnerMixin._compact", "compaction (score + move)",
     "worker: compactions + execute"),
    ("infokv_vllm.core.runner", "CompressingRunnerMixin._score", "score", "compaction (score + move)"),
    ("infokv_vllm.core.paged_compactor", "PagedKVCompactor.read", "read keys / values", "score"),
    ("infokv_vllm.scoring.infokv", "InfoKVPolicy.scores", "InfoKV policy", "score"),
    # infokv's own name for R-KV's function (rkv's policy calls it through its module)
    ("infokv_vllm.scoring.infokv", "request_redundancy", "key redundancy", "InfoKV policy"),
    ("infokv_vllm.core.paged_compactor", "PagedKVCompactor.compact", "move KV pages", "compaction (score + move)"),
    ("infokv_vllm.signals.storage", "SlotSignals.compact", "move signal planes", "compaction (score + move)"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", "vLLM execute_model",
     "worker: compactions + execute"),
    ("infokv_vllm.core.runner", "CompressingRunnerMixin._prepare_inputs", "prepare inputs + length shift",
     "vLLM execute_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs", "vLLM prepare inputs",
     "prepare inputs + length shift"),
    ("infokv_vllm.signals.attention", "AttentionRecorder.before_forward", "observation window set-up",
     "prepare inputs + length shift"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward", "model forward", "vLLM execute_model"),
    # In the step (Triton) this is the mass; deferred (torch) it stores the queries, and the mass has its own timer.
    ("infokv_vllm.recording_backends", "record_window_queries", "window attention (all layers)",
     "model forward"),
    # Compiled, the evolution is fused into the graph and has no timer of its own.
    ("infokv_vllm.signals.representation", "representation_evolution", "representation evolution (all layers)",
     "model forward"),
    ("infokv_vllm.signals.entropy", "EntropyRecorder.after_forward", "entropy (last + prompt logits)",
     "worker: compactions + execute"),
    ("infokv_vllm.signals.representation", "RepresentationRecorder.after_forward", "representation store",
     "worker: compactions + execute"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens", "sample", "engine step"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", "update from output", "engine step"),
]


def install_timers() -> tuple[dict, dict]:
    """Wrap every TIMED function in place (before the engine is built); returns (seconds, calls) by label."""
    import importlib

    seconds: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for module_name, path, label, _ in TIMED:
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = getattr(owner, name)

        def timed(*args, __original=original, __label=label, **kwargs):
            if torch.compiler.is_compiling():  # traced into a compiled graph: its time is the graph's
                return __original(*args, **kwargs)
            started = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                seconds[__label] += time.perf_counter() - started
                calls[__label] += 1

        setattr(owner, name, functools.wraps(original)(timed))
    return seconds, calls


def profile(model, workload, method: str, mode: str, blocks: int, seconds: dict, calls: dict) -> dict:
    from vllm import SamplingParams

    from infokv_testing.local_engine import in_process_llm

    params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
    with in_process_llm(model, workload.compression(method), num_gpu_blocks_override=blocks,
                        max_model_len=workload.max_model_len, max_num_seqs=workload.requests,
                        enforce_eager=mode == "eager") as llm:
        engine = llm.llm_engine
        for request_id, prompt in workload.prompts().items():
            engine.add_request(request_id, prompt, params)
        seconds.clear()
        calls.clear()
        while engine.has_unfinished_requests():
            engine.step()
        steps = calls["engine step"]
        return {"method": method, "mode": mode, "steps": steps,
                "ms_per_step": {label: 1000 * seconds[label] / steps for label in seconds}}


def profile_hot_prefix(model, dtype: str, method: str, mode: str, args, seconds: dict, calls: dict) -> dict:
    """Time the steps up to the first token of requests whose prefix is cached (the engine otherwise idle)."""
    import random

    from throughput import PROMPT_TOKEN_RANGE
    from vllm import SamplingParams

    from infokv_testing.local_engine import in_process_llm

    rng = random.Random(0)
    prefix = [rng.randrange(*PROMPT_TOKEN_RANGE) for _ in range(args.prefix_len)]
    prompts = [{"prompt_token_ids": prefix + [rng.randrange(*PROMPT_TOKEN_RANGE) for _ in range(args.suffix_len)]}
               for _ in range(args.requests + 1)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    compression = None if method == "none" else {"method": method, "budget": args.budget,
                                                  "decode_interval": args.interval}
    first_token_ms, steps_to_first, cached_tokens, by_label = [], [], [], collections.defaultdict(float)
    with in_process_llm(model, compression, dtype=dtype, max_model_len=args.prefix_len + args.suffix_len +
                        args.output_len, enforce_eager=mode == "eager", enable_prefix_caching=True) as llm:
        engine = llm.llm_engine
        for index, prompt in enumerate(prompts):  # the first computes the prefix: a warm-up, not measured
            engine.add_request(f"r{index}", prompt, params)
            seconds.clear()
            calls.clear()
            started, first = time.perf_counter(), None
            while engine.has_unfinished_requests():
                outputs = [output for output in engine.step() if output.outputs[0].token_ids]
                if first is None and outputs:
                    first = time.perf_counter() - started
                    if index:
                        first_token_ms.append(1000 * first)
                        steps_to_first.append(calls["engine step"])
                        cached_tokens.append(outputs[0].num_cached_tokens)
                        for label, value in seconds.items():
                            by_label[label] += 1000 * value / args.requests
    return {"method": method, "mode": mode, "first_token_ms": first_token_ms, "steps_to_first_token": steps_to_first,
            "cached_tokens": cached_tokens, "ms_per_request": dict(by_label)}


def print_table(results: list[dict], key: str, title: str, count_key: str, count_title: str) -> None:
    depth = {}
    for _, _, label, parent in TIMED:
        depth[label] = 0 if parent is None else depth[parent] + 1
    print(f"{title:44}" + "".join(f"{r['method'][:9] + '/' + r['mode'][:5]:>16}" for r in results))
    for _, _, label, _ in TIMED:
        cells = [r[key].get(label) for r in results]
        if any(cells):
            print(f"{'  ' * depth[label] + label:44}" + "".join(f"{c:>16.2f}" if c else f"{'-':>16}" for c in cells))
    print(f"{count_title:44}" + "".join(f"{str(r[count_key]):>16}" for r in results))


def main() -> None:
    from report import methods_of, write_report
    from throughput import WORKLOADS, Workload

    from infokv_vllm.config import method_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--methods", default="none,streaming,entropy,infokv", type=methods_of(method_names()))
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--small-pool", action="store_true",
                        help="the throughput benchmark's CPU workload on its small pool, with --kv-memory-pressure "
                             "(24 requests, 384 output tokens, 61 blocks): compactions come from memory pressure too")
    parser.add_argument("--hot-prefix", action="store_true",
                        help="time the steps up to the first token of requests that find their prefix cached")
    parser.add_argument("--model", default="smollm2", help="a name in infokv_testing.models.MODELS")
    parser.add_argument("--prefix-len", type=int, default=2048, help="--hot-prefix: the shared prefix, in tokens")
    parser.add_argument("--suffix-len", type=int, default=32, help="--hot-prefix: each request's own tokens")
    parser.add_argument("--budget", type=int, default=512, help="--hot-prefix: --kv-budget (the prefix benchmark's)")
    parser.add_argument("--interval", type=int, default=64, help="--hot-prefix: --kv-decode-interval")
    args = parser.parse_args()
    methods = args.methods.split(",")
    workload = Workload(args.requests, (128, 384), args.output_len, budget=128, interval=64)
    if args.small_pool:
        cpu = WORKLOADS["cpu"]
        workload = Workload(cpu["requests"], tuple(map(int, cpu["prompt_len"].split(","))), cpu["output_len"],
                            cpu["budget"], cpu["interval"], memory_pressure=True)
    if args.smoke:
        workload, methods, args.modes = Workload(2, (40, 80), 96, 48, 32), ["none", "infokv"], "eager"
        args.model, args.requests, args.prefix_len, args.suffix_len = "smollm2", 2, 192, 16
        args.output_len, args.budget, args.interval = 48, 64, 32
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from infokv_testing.local_engine import BLOCK_SIZE
    from infokv_testing.models import MODELS, serving_dtype

    model = MODELS[args.model].ensure()
    seconds, calls = install_timers()
    modes = args.modes.split(",")
    if args.hot_prefix:
        results = [profile_hot_prefix(model, serving_dtype(model), method, mode, args, seconds, calls)
                   for mode in modes for method in methods]
        print_table(results, "ms_per_request", "ms up to the first token, per request", "steps_to_first_token",
                    "steps up to the first token")
        print(f"{'first token (ms)':44}" + "".join(
            f"{sorted(r['first_token_ms'])[len(r['first_token_ms']) // 2]:>16.0f}" for r in results))
        write_report("step_profile-hot-prefix", args.smoke, model=args.model,
                     workload={key: getattr(args, key) for key in ("requests", "prefix_len", "suffix_len",
                                                                   "output_len", "budget", "interval")},
                     parts=[{"label": label, "parent": parent} for _, _, label, parent in TIMED], results=results)
        return
    blocks = WORKLOADS["cpu"]["small_blocks"] if args.small_pool else \
        workload.requests * -(-workload.max_model_len // BLOCK_SIZE) + 1
    results = [profile(model, workload, method, mode, blocks, seconds, calls) for mode in modes for method in methods]
    print_table(results, "ms_per_step", "ms per engine step", "steps", "steps")
    name = "step_profile-small-pool" if args.small_pool else "step_profile"
    write_report(name, args.smoke, model=args.model, workload=vars(workload) | {"blocks": blocks},
                 parts=[{"label": label, "parent": parent} for _, _, label, parent in TIMED], results=results)


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
