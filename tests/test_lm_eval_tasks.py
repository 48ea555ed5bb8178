"""The lm-eval tasks of the seeded suites (benchmarks/lm_eval_tasks), checked without lm-eval installed: the YAML
names the tasks and settings the suites need, the JSONL rows are `suites.Sample`s, and the tasks score a reply with
`suites.score` itself."""

from __future__ import annotations

import importlib.util
import inspect
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from benchmarks.suites import MATH_MAX_TOKENS, RULER_QA_MAX_TOKENS, SEEDED_SUITES, SUITES, Sample, score

TASKS_DIR = Path(__file__).parent.parent / "benchmarks" / "lm_eval_tasks"
TASKS = {f"infokv_{suite}": suite for suite in SUITES}


class TaskLoader(yaml.SafeLoader):
    """Reads lm-eval's `!function module.name` tag as its plain "module.name" string."""


TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def load_yaml(name: str) -> dict:
    return yaml.load((TASKS_DIR / name).read_text(), Loader=TaskLoader)


@pytest.fixture(scope="module")
def utils():
    spec = importlib.util.spec_from_file_location("infokv_lm_eval_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(suite: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / f"infokv_{suite}.jsonl").read_text().splitlines()]


def max_tokens_asked(suite: str) -> int:
    if suite in SEEDED_SUITES:
        return max(row["max_tokens"] for row in rows(suite))
    return MATH_MAX_TOKENS.get(suite, RULER_QA_MAX_TOKENS)


def test_yaml_names_the_tasks_and_their_settings(utils):
    configs = {path.name: load_yaml(path.name) for path in TASKS_DIR.glob("*.yaml")}
    tasks = {config["task"]: config for config in configs.values() if "group" not in config}
    assert set(tasks) == set(TASKS)
    assert load_yaml("infokv.yaml")["task"] == list(TASKS)
    for name, config in tasks.items():
        assert config["output_type"] == "generate_until"
        assert config["doc_to_text"] == "prompt"
        kwargs = config["generation_kwargs"]
        assert kwargs["temperature"] == 0 and kwargs["do_sample"] is False
        assert kwargs["until"] == []  # lm-eval's default, "\n\n", would cut a reasoning trace
        assert kwargs["max_gen_toks"] >= max_tokens_asked(TASKS[name])
        assert config["metric_list"] == [{"metric": "accuracy", "aggregation": "mean", "higher_is_better": True}]
        # Every `!function` names a callable of utils.py.
        for field in ("custom_dataset", "process_results"):
            module, function = config[field].split(".")
            assert module == "utils" and callable(getattr(utils, function))
        assert config["custom_dataset"] == f"utils.{TASKS[name]}"


def test_real_data_suites_are_drawn_from_the_fixtures_not_committed(utils, monkeypatch):
    from infokv_testing.datasets import DATASETS

    problems = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(150)]
    monkeypatch.setitem(DATASETS, "gsm8k-test", type("Rows", (), {"read_jsonl": staticmethod(lambda: problems)}))
    loaded = utils.rows("gsm8k")
    assert len(loaded) == utils.REAL_DATA_COUNTS["gsm8k"] and {row["suite"] for row in loaded} == {"gsm8k"}
    assert utils.to_sample(loaded[0]).prompt.startswith("Q")
    assert not list(TASKS_DIR.glob("infokv_gsm8k*.jsonl"))
    assert set(utils.REAL_DATA_COUNTS) == set(SUITES) - set(SEEDED_SUITES)


@pytest.mark.parametrize("suite", SEEDED_SUITES)
def test_jsonl_rows_are_samples(utils, suite):
    loaded = utils.rows(suite)
    assert loaded == rows(suite) and len(loaded) > 0
    samples = [Sample(**row) for row in loaded]
    assert {sample.suite for sample in samples} == {suite}
    assert len({sample.id for sample in samples}) == len(samples)
    # utils imports suites as a top-level module (its own Sample class), so compare the fields.
    assert all(asdict(utils.to_sample(row)) == asdict(sample) for row, sample in zip(loaded, samples))


def test_process_results_is_suites_score(utils):
    # One home for the rule: utils scores with the function defined in benchmarks/suites.py.
    assert Path(inspect.getsourcefile(utils.score)).resolve() == (TASKS_DIR.parent / "suites.py").resolve()
    real = [Sample("gsm8k", "gsm8k", "g", "", "72", 640), Sample("ruler", "qa_squad", "q", "", "Avon", 32)]
    for doc in [rows(suite)[-1] for suite in SEEDED_SUITES] + [asdict(sample) for sample in real]:
        sample = Sample(**doc)
        suite = sample.suite
        if suite == "reasoning":
            right = f"Step 1: 1 + 1 = 2\nAnswer: {sample.answer}"
            wrong = f"Step 1: 1 + 1 = 2\nAnswer: {int(sample.answer) + 1}"
        else:
            right = f"The answer is {sample.answer}."
            wrong = f"The answer is {sample.answer.split(', ')[0][::-1]}."
        for reply, expected in ((right, 1), (wrong, 0)):
            assert utils.process_results(doc, [reply]) == {"accuracy": expected}
            assert int(score(sample, reply)) == expected
