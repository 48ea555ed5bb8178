"""lm-eval glue for the suites of `benchmarks/suites.py`.

The docs are `suites.Sample`s: for the seeded suites, the JSONL rows beside this file (written by `python
benchmarks/suites.py --lm-eval`); for the real-data suites, drawn from the benchmark data fixtures when the task
loads (`REAL_DATA_COUNTS` samples, seed 0: the samples of the grids in docs/results), so no benchmark data is copied into the
repository. A reply is scored by `suites.score` itself, so lm-eval and the repo's own benchmarks share one rule.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # benchmarks/, the home of `suites`
    sys.path.insert(0, str(HERE.parent))

import checkout_root  # noqa: E402, F401 (infokv_testing, for the real-data suites)
from suites import SEEDED_SUITES, Sample, make_samples, score  # noqa: E402

SAMPLE_FIELDS = tuple(field.name for field in fields(Sample))
REAL_DATA_COUNTS = {"gsm8k": 100, "math500": 60, "ruler": 48}
RULER_TOKENS, RULER_TOKENIZER = 2000, "qwen2.5-0.5b"  # the context length and whose tokens measure it


def rows(suite: str) -> list[dict]:
    """One suite's docs: the JSONL rows beside this file (whatever the current directory), or the real-data
    samples drawn from the fixtures."""
    if suite not in SEEDED_SUITES:
        tokenizer = None
        if suite == "ruler":
            from transformers import AutoTokenizer

            from infokv_testing.models import MODELS

            tokenizer = AutoTokenizer.from_pretrained(MODELS[RULER_TOKENIZER].ensure())
        samples = make_samples(suite, REAL_DATA_COUNTS[suite], 0, tokenizer, RULER_TOKENS, 0)
        return [{name: getattr(sample, name) for name in SAMPLE_FIELDS} for sample in samples]
    lines = (HERE / f"infokv_{suite}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _dataset(suite: str) -> dict:
    import datasets  # lm-eval's dependency, imported here so the tests of this module do without it

    return {"test": datasets.Dataset.from_list(rows(suite))}


# `custom_dataset` callables: lm-eval passes them the task metadata and the model args as keywords, all unused.
def retrieval(**_kwargs) -> dict:
    return _dataset("retrieval")


def reasoning(**_kwargs) -> dict:
    return _dataset("reasoning")


def gsm8k(**_kwargs) -> dict:
    return _dataset("gsm8k")


def math500(**_kwargs) -> dict:
    return _dataset("math500")


def ruler(**_kwargs) -> dict:
    return _dataset("ruler")


def to_sample(doc: dict) -> Sample:
    return Sample(**{name: doc[name] for name in SAMPLE_FIELDS})


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """`results` holds the one generated reply of `doc`; 1 when `suites.score` says it is exactly right."""
    return {"accuracy": int(score(to_sample(doc), results[0]))}
