"""Each change the plugin makes to vLLM's own objects, one module each, with its reason; `plugin.PATCHES` lists
them and registration applies them in that order (`apply()` of each module).

vLLM calls registration in every process, and a process may import an already patched class, so a function is
wrapped at most once (`wrap`). Every wrapped function is listed in `manifest.VLLM_INTERNALS`, its reason starting
with "wrapped:".
"""

from __future__ import annotations

import functools
from typing import Any, Callable

_PATCHED_MARK = "__infokv_patched__"


def is_patched(function: Callable) -> bool:
    return getattr(function, _PATCHED_MARK, False)


def wrap(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable], kind: type | None = None) -> None:
    """Replace `owner.name` with `make_wrapper(original)` once; `kind` re-wraps static/class methods."""
    original_attr = owner.__dict__[name]
    original = original_attr.__func__ if kind is not None else original_attr
    if is_patched(original):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _PATCHED_MARK, True)
    setattr(owner, name, kind(wrapper) if kind is not None else wrapper)
