"""The observation window of the current step: which queries score the cache, and where the mass accumulates.

The model runner opens it around the forward of a step that has window tokens; the attention backend reads it.
Steps outside every request's window never open one, so they do no scoring work at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from infokv_vllm.kv.compaction import PageLayout


@dataclass(frozen=True)
class ObservationWindow:
    query_tokens: dict[int, torch.Tensor]  # batch row -> indices (into the step's query tokens) to score with
    accumulators: dict[str, torch.Tensor]  # attention layer name -> [blocks, kv_heads, block_size] float32
    layout: PageLayout  # where each slot's key sits in a page
    use_triton: bool  # the Triton kernel (GPU path) rather than torch


_active: ObservationWindow | None = None


def active_window() -> ObservationWindow | None:
    return _active


@contextlib.contextmanager
def observation_window(window: ObservationWindow | None) -> Iterator[None]:
    global _active
    _active = window
    try:
        yield
    finally:
        _active = None
