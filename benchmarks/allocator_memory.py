"""Is the soak's memory growth a leak? Worker RSS under a varied load, then after glibc's `malloc_trim(0)`.

One in-process engine per method (SmolLM2, eager, an 80-block pool, memory pressure on for compression) serves 8
rounds of 16 greedy requests of random length (20-600 words, 32/96/200 output tokens); the process's RSS is read
after every round and once more after `malloc_trim(0)` asks glibc to return the freed memory it keeps. If the
trim takes RSS back to where it started, the growth was memory freed but kept by the allocator, not a leak.

    .venv/bin/python benchmarks/allocator_memory.py            # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/allocator_memory.py --smoke    # one round of 4 requests each; what CI runs
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys


def measure(method: str, rounds: int, requests: int) -> dict:
    import psutil
    from vllm import SamplingParams

    from infokv_testing.local_engine import in_process_llm, run_to_completion
    from infokv_testing.smollm2 import ensure_model

    compression = None if method == "none" else {"method": method, "budget": 128, "memory_pressure": True}
    rng = random.Random(0)
    words = "the river runs past the old mill seven boats leave the harbour at dawn".split()
    rss = []
    with in_process_llm(ensure_model(), compression, max_model_len=2048, num_gpu_blocks_override=80) as llm:
        rss.append(psutil.Process().memory_info().rss / 2**20)
        for round_index in range(rounds):
            prompts = {f"{round_index}-{i}": " ".join(rng.choice(words) for _ in range(rng.randint(20, 600)))
                       for i in range(requests)}
            params = SamplingParams(temperature=0, max_tokens=rng.choice([32, 96, 200]), ignore_eos=True)
            run_to_completion(llm, prompts, params)
            rss.append(psutil.Process().memory_info().rss / 2**20)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed = psutil.Process().memory_info().rss / 2**20
    return {"method": method, "rss_mib_by_round": [round(value) for value in rss], "after_trim_mib": round(trimmed),
            "growth_mib": round(rss[-1] - rss[0]), "after_trim_vs_start_mib": round(trimmed - rss[0])}


def main() -> None:
    from report import write_report  # beside this script (benchmarks run as files)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="one round of 4 requests per method: checks the script runs")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="requests per round")
    parser.add_argument("--methods", default="infokv,none")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # measure one method in this process, print its JSON
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        args.rounds, args.requests = 1, 4
    if args.one:
        print(json.dumps(measure(args.one, args.rounds, args.requests)))
        return
    # Each method in a fresh process, so that none starts with memory another engine left behind.
    rows = [json.loads(subprocess.run([sys.executable, __file__, "--one", method, "--rounds", str(args.rounds),
                                       "--requests", str(args.requests)],
                                      check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for method in args.methods.split(",")]
    print(f"{'method':8} {'start':>6} {'end':>6} {'growth':>6} {'after trim':>10}  (MiB)")
    for row in rows:
        print(f"{row['method']:8} {row['rss_mib_by_round'][0]:>6} {row['rss_mib_by_round'][-1]:>6} "
              f"{row['growth_mib']:>6} {row['after_trim_mib']:>10}")
    write_report("allocator_memory", args.smoke, rounds=args.rounds, requests=args.requests, rows=rows)


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
