"""Puts the checkout's root on sys.path, for `infokv_testing`: the test and benchmark support (offline models and
data, in-process engines and servers), which lives at the root and is never installed.

Benchmarks run as files (`python benchmarks/x.py`), which puts only benchmarks/ on sys.path, so each one imports
this module before its main(). Imported as `benchmarks.x` (by the tests, which run from the root) they need nothing.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
# Last, not first: the checkout's infokv_vllm must not shadow the plugin installed where the benchmark runs (the GPU
# machines install it from the wheel).
if ROOT not in sys.path:
    sys.path.append(ROOT)
