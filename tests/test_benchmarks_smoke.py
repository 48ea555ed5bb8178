"""Each benchmark script runs end to end in its seconds-long smoke mode and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_throughput_smoke():
    subprocess.run([sys.executable, str(BENCHMARKS / "throughput.py"), "--smoke"], check=True, timeout=600,
                   capture_output=True)
    report = json.loads((BENCHMARKS / "results" / "throughput-smoke.json").read_text())
    runs = {(r["pool"], r["method"]): r for r in report["summary"]}
    assert set(runs) == {(pool, method) for pool in ("bound", "unbound")
                         for method in ("none", "streaming", "infokv")}
    assert all(r["output_tokens"] == 2 * 112 for r in runs.values())
    assert runs[("bound", "infokv")]["compression_events"] > 0
