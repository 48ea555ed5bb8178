"""The scenario suites (benchmarks/suites.py): seeded, sized in the model's tokens, answerable from the prompt,
and scored by exact answer."""

from __future__ import annotations

import re

from benchmarks.suites import RETRIEVAL_TASKS, Sample, reasoning, retrieval, score


def count_words(text: str) -> int:
    return len(text.split())


def test_retrieval_is_seeded_sized_and_holds_its_answers():
    samples = retrieval(6, seed=3, target_tokens=300, count_tokens=count_words)
    assert samples == retrieval(6, seed=3, target_tokens=300, count_tokens=count_words)
    assert [s.task for s in samples] == list(RETRIEVAL_TASKS) * 2
    for sample in samples:
        assert 300 <= count_words(sample.prompt) <= 420
        for part in sample.answer.split(", "):
            assert part in sample.prompt
    tracking = samples[2]
    names = tracking.answer.split(", ")
    value = re.search(r"assigned the value (\d+)", tracking.prompt).group(1)
    assert f"VAR {names[0]} = {value}." in tracking.prompt
    assert all(f"VAR {b} = VAR {a}." in tracking.prompt for a, b in zip(names, names[1:]))


def test_reasoning_answer_follows_from_the_steps():
    for sample in reasoning(5, seed=1, steps=12):
        value = int(re.search(r"Start with the number (\d+) and apply these 12 steps", sample.prompt).group(1))
        steps = re.findall(r"Step \d+: (add|subtract) (\d+)\.", sample.prompt)
        assert len(steps) == 12
        for verb, operand in steps:
            value += int(operand) if verb == "add" else -int(operand)
            assert 0 <= value <= 99
        assert sample.answer == str(value)


def test_scores_are_exact():
    needle = Sample("retrieval", "niah_single", "r", "", "1234567", 16)
    assert score(needle, "The number is 1234567.") and not score(needle, "123456")
    tracking = Sample("retrieval", "variable_tracking", "v", "", "AAAAA, BBBBB", 40)
    assert score(tracking, "BBBBB, AAAAA") and not score(tracking, "AAAAA")
    chain = Sample("reasoning", "arithmetic_chain", "c", "", "42", 64)
    assert score(chain, "Step 1 (add 2): 40 + 2 = 42. The total is now 42.\nAnswer: 42")
    assert not score(chain, "Answer: 41") and not score(chain, "The total is now 42.")
    assert score(chain, "Answer: 7\nAnswer: 42")  # the last answer line counts
