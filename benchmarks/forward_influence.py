"""Forward Influence: how much removing a set of cached tokens shifts the model's predictions, by distance.

The analysis behind InfoKV (method doc, "Forward Influence"): prefill a document to position P, remove an
equal-size token set S from every layer's KV cache, chosen by attention (the SnapKV window score), by token
entropy (top-k, the prediction each token was drawn from) or at random (sinks and the observation window are
protected, as in compression), then run the document's true continuation with its true positions and report
KL(p_full || p_minus_S) of the next-token distributions, averaged in distance bins after P. The paper's finding:
attention-selected sets dominate the near bins, entropy-selected sets the far bins.

Documents are the model's own sampled answers to long-writing prompts (long decoding, as in reasoning traces),
sampled with vLLM; the analysis runs SmolLM2 in transformers directly, in float32 on CPU.

    .venv/bin/python benchmarks/forward_influence.py            # 3 documents, P=1024, 1280 continuation tokens
    .venv/bin/python benchmarks/forward_influence.py --smoke    # seconds-long check that the script runs
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch

BINS = ((0, 64), (64, 256), (256, 1024), (1024, 4096))
SELECTIONS = ("attention", "entropy", "random")
PROMPTS = ["Write a long, detailed story about a clockmaker who builds a clock that can stop time. Describe every "
           "character, place and invention in detail.",
           "Explain in great detail, step by step, how the internet works, from electrical signals in cables to "
           "web pages in a browser. Give many concrete examples and numbers.",
           "Write a long travel diary of a month-long journey through five different countries, with dates, "
           "places, people met, prices and meals."]


def sample_documents(model_dir: Path, tokenizer, count: int, length: int, seed: int) -> list[torch.Tensor]:
    """Chat prompts and the model's sampled answers, `length` tokens each (no end-of-sequence). Sampled with vLLM
    (in this process, then shut down): transformers' generate runs at a few tokens/s on 2 CPU cores."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from infokv_testing.local_engine import in_process_llm

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                             add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for i in range(count)]
    with in_process_llm(model_dir, max_model_len=length + 16) as llm:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
            [SamplingParams(temperature=0.8, top_p=0.95, seed=seed + i, max_tokens=length - len(ids),
                            min_tokens=length - len(ids), ignore_eos=True) for i, ids in enumerate(prompts)])
    return [torch.tensor(ids + list(out.outputs[0].token_ids)) for ids, out in zip(prompts, outputs)]


def removal_sets(attentions, logits: torch.Tensor, prefix: torch.Tensor, size: int, window: int, sinks: int,
                 top_k: int, seed: int) -> dict[str, torch.Tensor]:
    """Equal-size token sets among the candidates [sinks, P - window): the most attended by the last `window`
    queries (summed over layers and heads), the highest top-k entropy, and a random draw."""
    from infokv_vllm.signals.entropy import topk_entropy

    length = prefix.shape[0]
    attention = sum(layer[0, :, -window:, :].sum(dim=(0, 1)) for layer in attentions)
    entropy = torch.cat([torch.zeros(1), topk_entropy(logits[:-1], top_k)])  # entropy of token i's prediction
    candidates = torch.arange(sinks, length - window)
    generator = torch.Generator().manual_seed(seed)
    return {
        "attention": candidates[attention[candidates].topk(size).indices],
        "entropy": candidates[entropy[candidates].topk(size).indices],
        "random": candidates[torch.randperm(len(candidates), generator=generator)[:size]],
    }


def continuation_logits(model, cache, continuation: torch.Tensor, logical_start: int,
                        removed: torch.Tensor | None) -> torch.Tensor:
    """Logits over the continuation with `removed` dropped from every layer's cache; RoPE positions stay true."""
    from infokv_testing.transformers_reference import continue_after_eviction, keep_in_cache

    cache = copy.deepcopy(cache)
    if removed is not None:
        keep = torch.ones(cache.get_seq_length(), dtype=torch.bool)
        keep[removed] = False
        keep_in_cache(cache, keep.nonzero().flatten())
    return continue_after_eviction(model, cache, continuation, logical_start)


def kl_per_position(full: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor:
    log_p, log_q = full.log_softmax(-1), reduced.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def analyse(model, document: torch.Tensor, prefix_len: int, size: int, window: int, sinks: int, top_k: int,
            seed: int) -> dict[str, torch.Tensor]:
    from transformers import DynamicCache

    prefix, continuation = document[:prefix_len], document[prefix_len:]
    cache = DynamicCache()
    model.set_attn_implementation("eager")  # only eager attention reports its probabilities
    try:
        with torch.no_grad():
            out = model(prefix[None], past_key_values=cache, use_cache=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    sets = removal_sets(out.attentions, out.logits[0], prefix, size, window, sinks, top_k, seed)
    del out
    full = continuation_logits(model, cache, continuation, prefix_len, None)
    return {name: kl_per_position(full, continuation_logits(model, cache, continuation, prefix_len, removed))
            for name, removed in sets.items()}


def bin_means(kl: torch.Tensor) -> list[float | None]:
    return [kl[lo:hi].mean().item() if kl.shape[0] > lo else None for lo, hi in BINS]


def main() -> None:
    from report import write_report  # beside this script (benchmarks run as files)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--prefix", type=int, default=1024, help="P: tokens prefilled before the removal")
    parser.add_argument("--continuation", type=int, default=1280, help="future positions scored after P")
    parser.add_argument("--removed", type=float, default=0.1, help="size of each removed set, share of P")
    parser.add_argument("--window", type=int, default=32, help="observation window (protected, scores attention)")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.documents, args.prefix, args.continuation = 1, 96, 80
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infokv_testing.smollm2 import MODEL_NAME, ensure_model

    model_dir = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    size = int(args.removed * args.prefix)
    per_document = []
    documents = sample_documents(model_dir, tokenizer, args.documents, args.prefix + args.continuation, args.seed)
    torch.set_num_threads(os.cpu_count() or 1)  # vLLM lowered it for serving
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    for index, document in enumerate(documents):
        kls = analyse(model, document, args.prefix, size, args.window, args.sinks, args.top_k, args.seed + index)
        per_document.append({name: bin_means(kl) for name, kl in kls.items()})
        print(f"document {index}: " + ", ".join(f"{name} {kl.mean():.4f}" for name, kl in kls.items()), flush=True)

    def average(name: str, column: int) -> float | None:
        values = [doc[name][column] for doc in per_document if doc[name][column] is not None]
        return sum(values) / len(values) if values else None

    table = {name: [average(name, column) for column in range(len(BINS))] for name in SELECTIONS}
    labels = [f"[{lo},{hi})" for lo, hi in BINS]
    print(f"\nmean KL(full || minus S) by distance after P={args.prefix}, |S|={size} tokens, "
          f"{args.documents} documents")
    print(f"{'removed set':12}" + "".join(f"{label:>13}" for label in labels))
    for name in SELECTIONS:
        print(f"{name:12}" + "".join("-".rjust(13) if v is None else f"{v:13.5f}" for v in table[name]))
    filled = [column for column in range(len(BINS)) if table["attention"][column] is not None]
    near, far = filled[0], filled[-1]
    reproduces = (table["attention"][near] > table["entropy"][near]
                  and table["entropy"][far] > table["attention"][far])
    verdict = {
        "near_bin": labels[near], "far_bin": labels[far],
        "attention_over_entropy_near": table["attention"][near] / table["entropy"][near],
        "entropy_over_attention_far": table["entropy"][far] / table["attention"][far],
        "paper_finding_reproduces": reproduces,
    }
    print(f"attention/entropy KL in {labels[near]}: {verdict['attention_over_entropy_near']:.2f}; "
          f"entropy/attention KL in {labels[far]}: {verdict['entropy_over_attention_far']:.2f}; "
          f"near/far finding {'reproduces' if reproduces else 'does not reproduce'} on {MODEL_NAME}")
    write_report("forward_influence", args.smoke, model=MODEL_NAME, dtype="float32",
                 settings={k: v for k, v in vars(args).items() if k != "smoke"}, removed_tokens=size, bins=labels,
                 mean_kl=table, per_document=per_document, verdict=verdict)


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
