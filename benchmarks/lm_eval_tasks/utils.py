"""lm-eval glue for the seeded suites of `benchmarks/suites.py`.

The docs are the JSONL rows beside this file (written by `python benchmarks/suites.py --lm-eval`), one `suites.Sample`
each, and a reply is scored by `suites.score` itself, so lm-eval and the repo's own benchmarks share one rule.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # benchmarks/, the home of `suites`
    sys.path.insert(0, str(HERE.parent))

from suites import Sample, score  # noqa: E402

SAMPLE_FIELDS = tuple(field.name for field in fields(Sample))


def rows(suite: str) -> list[dict]:
    """The JSONL rows of one suite, read from beside this file whatever the current directory."""
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


def to_sample(doc: dict) -> Sample:
    return Sample(**{name: doc[name] for name in SAMPLE_FIELDS})


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """`results` holds the one generated reply of `doc`; 1 when `suites.score` says it is exactly right."""
    return {"accuracy": int(score(to_sample(doc), results[0]))}
