"""Kernel tests run Triton's interpreter on CPU; set it before any kernel module is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
