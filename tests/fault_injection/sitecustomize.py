"""Test-only fault injection, kept out of the package: a Python process whose path starts with this directory
imports this module at start-up (every `vllm serve` process does: the API server, the engine core and its
workers inherit the environment). With `INFOKV_TEST_FAULT=compaction` set, the KV compactor raises inside its
first compaction, so a test sees how a failure inside a step reaches the client (vLLM's engine-dead error and a
server that exits, not a hang or wrong tokens).

The compactor is patched when its module is first imported (an import hook), so a process that never compacts
imports nothing more than it would have.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

FAULT_ENV = "INFOKV_TEST_FAULT"
COMPACTOR_MODULE = "infokv_vllm.core.paged_compactor"


def _raise_in_compaction(module) -> None:
    def compact(self, block_ids, keep) -> None:
        raise RuntimeError(f"infokv-vllm: fault injected into a compaction ({FAULT_ENV}=compaction, for tests)")

    module.PagedKVCompactor.compact = compact


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the compactor's module as the rest of `sys.meta_path` would, and patches it once it has run."""

    def find_spec(self, name, path, target=None):
        if name != COMPACTOR_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            _raise_in_compaction(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(FAULT_ENV) == "compaction":
    sys.meta_path.insert(0, _PatchOnImport())
