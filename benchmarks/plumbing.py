"""Is a loss on GSM8K the method's or the engine integration's? The same eviction in vLLM and in transformers.

StreamingLLM (sinks + most recent, on the plugin's schedule) needs no signal, so any difference between the two
runs is the integration's: positions, slot mapping, pages freed and reused, and many compactions over one long
trace. For each GSM8K problem (chat template, chain of thought, greedy), vLLM serves it with `--kv-compression
streaming` in-process and transformers applies the same evictions to its own cache
(`testing.transformers_reference.generate_with_streaming`). Both run the model in the dtype it is served in
(`testing.models.serving_dtype`: float32 for the bf16 Qwen models on CPUs without bf16 arithmetic), but their
kernels round differently, so traces may part after a while: what must agree is the accuracy, within noise, and
the share of identical traces shows how long they stay together.

    .venv/bin/python benchmarks/plumbing.py                       # 30 GSM8K train problems on the 0.5B
    .venv/bin/python benchmarks/plumbing.py --smoke               # SmolLM2, 2 problems, short traces
"""

from __future__ import annotations

import argparse
import os
import time


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((index for index, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    from quality import wilson_interval  # beside this script
    from report import write_report
    from suites import gsm8k, score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a name in infokv_testing.models.MODELS")
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    max_tokens = 640
    if args.smoke:
        args.model, args.count, args.budget, args.interval, max_tokens = "smollm2", 2, 48, 16, 40
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from infokv_testing.local_engine import in_process_llm, run_to_completion
    from infokv_testing.models import MODELS, serving_dtype
    from infokv_testing.transformers_reference import generate_with_streaming

    model_dir = MODELS[args.model].ensure()
    dtype = serving_dtype(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = gsm8k(args.count, args.seed, args.split)
    prompts = {sample.id: tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)["input_ids"] for sample in samples}
    compression = {"method": "streaming", "budget": args.budget, "decode_interval": args.interval,
                   "sinks": args.sinks}
    started = time.perf_counter()
    with in_process_llm(model_dir, compression, dtype=dtype, max_model_len=2048,
                        kv_cache_memory_bytes=2 * 2**30) as llm:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        served = run_to_completion(llm, {rid: TokensPrompt(prompt_token_ids=ids) for rid, ids in prompts.items()},
                                   params)
    vllm_seconds = time.perf_counter() - started
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    eos = model.generation_config.eos_token_id  # what vLLM stops on too (it reads the generation config)
    stop_ids = frozenset(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    reference = {rid: generate_with_streaming(model, ids, args.budget, args.interval, args.sinks, max_tokens,
                                              stop_ids) for rid, ids in prompts.items()}
    rows = []
    for sample in samples:
        ours, theirs = served[sample.id], reference[sample.id]
        rows.append({"id": sample.id, "prompt_tokens": len(prompts[sample.id]),
                     "vllm_correct": score(sample, tokenizer.decode(ours, skip_special_tokens=True)),
                     "transformers_correct": score(sample, tokenizer.decode(theirs, skip_special_tokens=True)),
                     "vllm_tokens": len(ours), "transformers_tokens": len(theirs),
                     "shared_prefix": shared_prefix(ours, theirs), "identical": ours == theirs})
    summary = {}
    for side in ("vllm", "transformers"):
        hits = sum(row[f"{side}_correct"] for row in rows)
        summary[side] = {"correct": hits, "accuracy": hits / len(rows), "interval": wilson_interval(hits, len(rows))}
    summary["identical_traces"] = sum(row["identical"] for row in rows)
    summary["mean_shared_share"] = sum(row["shared_prefix"] / max(row["vllm_tokens"], 1) for row in rows) / len(rows)
    summary["agreeing_verdicts"] = sum(row["vllm_correct"] == row["transformers_correct"] for row in rows)
    write_report("plumbing", args.smoke, model=args.model, dtype=dtype, settings=vars(args),
                 minutes=(time.perf_counter() - started) / 60, vllm_minutes=vllm_seconds / 60, summary=summary,
                 rows=rows)
    print(f"{args.model} {dtype}, {len(rows)} GSM8K {args.split} problems, streaming budget {args.budget} "
          f"interval {args.interval}")
    for side in ("vllm", "transformers"):
        low, high = summary[side]["interval"]
        print(f"  {side:13} accuracy {summary[side]['accuracy']:.2f} ({low:.2f}-{high:.2f})")
    print(f"  identical traces {summary['identical_traces']}/{len(rows)}, same verdict {summary['agreeing_verdicts']}"
          f"/{len(rows)}, mean shared prefix {summary['mean_shared_share']:.0%} of the trace")


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
