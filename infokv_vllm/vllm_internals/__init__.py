"""Everything of vLLM's own that the plugin relies on or changes, for the supported range `SUPPORTED_VLLM`.

vLLM offers no public hook for most of what compression needs, so we subclass, override and wrap its internals:

- `manifest.VLLM_INTERNALS` lists each one, with the vLLM function and why (checked by `tests/test_compat.py`);
- `patches/` holds each change to vLLM's own objects in its own module, which `plugin.register` applies by name;
- `swaps` points vLLM's module globals at our classes for the duration of one call.

Registration checks the installed vLLM against `SUPPORTED_VLLM` first: outside it, nothing here is applied.
"""

from __future__ import annotations

SUPPORTED_VLLM = ">=0.32,<0.33"


def vllm_version_supported(version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(version) in SpecifierSet(SUPPORTED_VLLM)
