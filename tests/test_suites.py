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


def test_math_answers_are_graded_by_value_not_by_text():
    gsm = Sample("gsm8k", "gsm8k", "g", "", "1000", 640)
    assert score(gsm, "... so she pays \\boxed{1,000} dollars.")
    assert score(gsm, "The answer is \\boxed{\\$1000.00}")
    assert score(gsm, "3 * 250 = 750, and 750 + 250 = 1000")  # no box: the last expression
    assert not score(gsm, "\\boxed{100}") and not score(gsm, "I am not sure.")
    math = Sample("math500", "level2", "m", "", "\\left( 3, \\frac{\\pi}{2} \\right)", 1024)
    assert score(math, "Therefore the point is \\boxed{(3, \\pi/2)}.")
    assert not score(math, "\\boxed{(3, \\pi)}")
    assert score(Sample("math500", "level1", "f", "", "\\frac{1}{2}", 1024), "\\boxed{0.5}")


def test_gsm8k_and_math500_samples_come_from_the_data_files(monkeypatch):
    from benchmarks import suites
    from infokv_testing.datasets import DATASETS

    rows = {"gsm8k-test": [{"question": f"Q{i}?", "answer": f"work\n#### {i},000"} for i in range(5)],
            "math500-test": [{"problem": f"P{i}", "answer": str(i), "level": i % 5 + 1, "unique_id": f"u{i}"}
                             for i in range(10)]}
    for name, data in rows.items():
        monkeypatch.setitem(DATASETS, name, type("Rows", (), {"read_jsonl": staticmethod(lambda data=data: data)}))
    drawn = suites.gsm8k(3, seed=0)
    assert drawn == suites.gsm8k(3, seed=0) and len({s.id for s in drawn}) == 3
    for sample in drawn:
        index = int(sample.id.rsplit("-", 1)[1])
        assert sample.prompt == f"Q{index}?\n{suites.COT_INSTRUCTION}" and sample.answer == f"{index}000"
    assert {s.task for s in suites.math500(4, seed=1, levels=(1, 2))} <= {"level1", "level2"}


def test_ruler_tasks_hide_their_answers_in_real_text(monkeypatch):
    from benchmarks import suites
    from infokv_testing.datasets import DATASETS

    essays = " ".join(f"Essay sentence number {i} says something true." for i in range(3000))
    squad = {"data": [{"paragraphs": [{"context": f"Paragraph {i} names the river Avon{i}.", "qas": [
        {"question": f"Which river does paragraph {i} name?", "answers": [{"text": f"Avon{i}"}]}]}
        for i in range(30)]}]}
    hotpot = [{"question": f"Who wrote book {i}?", "answer": "yes" if i % 2 else f"Author{i}",
               "context": [[f"Book {i}", [f"Book {i} was written by Author{i}."]]]} for i in range(30)]
    for name, document in {"ruler-essays": {"text": essays}, "ruler-squad": squad, "ruler-hotpotqa": hotpot}.items():
        monkeypatch.setitem(DATASETS, name, type("Json", (), {"read_json": staticmethod(lambda d=document: d)}))
    samples = suites.ruler(8, seed=2, target_tokens=300, count_tokens=count_words)
    assert [s.task for s in samples] == list(suites.RULER_TASKS) * 2
    for sample in samples:
        assert count_words(sample.prompt) >= 300
        for reference in sample.answer.split("\n"):
            assert reference in sample.prompt
        assert score(sample, f"It is {sample.answer.split(chr(10))[0].upper()}.")  # QA is case-blind
    assert all(s.answer != "yes" for s in samples if s.task == "qa_hotpotqa")  # yes/no questions left out
    assert score(samples[0], samples[0].answer) and not score(samples[2], "I do not know")
