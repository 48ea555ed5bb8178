"""SlotSignals: a signal's layers live in one tensor, written in one indexed store per step; every operation must
still reach each (layer, block, head, offset) exactly as a plane per layer would."""

from __future__ import annotations

import torch

from infokv_vllm.kernels.families import TorchKernels
from infokv_vllm.signals.storage import SlotSignals

LAYERS, BLOCKS, HEADS, BLOCK_SIZE = 3, 6, 2, 4


def storage() -> SlotSignals:
    return SlotSignals(frozenset({"entropy", "representation"}), LAYERS, BLOCKS, HEADS, BLOCK_SIZE, TorchKernels(),
                       torch.device("cpu"))


def test_writes_reach_each_layer_and_slot_and_gather_reads_them_in_request_order():
    signals = storage()
    block_ids = [4, 1, 3]  # a request's pages, out of order in the pool
    slots = signals.request_slots(block_ids, torch.arange(10))
    per_layer = torch.arange(1, LAYERS * 10 + 1, dtype=torch.float32).reshape(LAYERS, 10)
    signals.write("representation", slots, per_layer)
    signals.write("entropy", slots, torch.arange(10, dtype=torch.float32))
    for layer in range(LAYERS):
        plane = signals.planes["representation"][layer]
        for index in range(10):
            block, offset = block_ids[index // BLOCK_SIZE], index % BLOCK_SIZE
            assert plane[block, :, offset].tolist() == [float(per_layer[layer, index])] * HEADS
    assert signals.planes["representation"].count_nonzero() == LAYERS * HEADS * 10  # nothing else written
    gathered = signals.gather(block_ids, 10)
    assert gathered["representation"].shape == (LAYERS, HEADS, 10)
    assert torch.equal(gathered["representation"], per_layer[:, None].expand(LAYERS, HEADS, 10))
    assert torch.equal(gathered["entropy"], torch.arange(10.0).expand(LAYERS, HEADS, 10))


def test_zero_copy_and_compact_act_on_every_layer():
    signals = storage()
    block_ids = [2, 5]
    slots = signals.request_slots(block_ids, torch.arange(8))
    values = torch.rand(LAYERS, 8) + 1
    signals.write("entropy", slots, values)
    signals.copy_blocks([2], [0])
    assert torch.equal(signals.planes["entropy"][:, 0], signals.planes["entropy"][:, 2])
    # Each layer and head keeps its own slots, as per-(layer, head) compaction does
    generator = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.stack([torch.randperm(8, generator=generator)[:3].sort().values
                                     for _ in range(HEADS)]) for _ in range(LAYERS)])
    signals.compact(block_ids, keep)
    kept = signals.gather(block_ids, 3)["entropy"]
    assert torch.equal(kept, torch.stack([values[layer, keep[layer]] for layer in range(LAYERS)]))
    signals.zero_blocks("entropy", [2, 5])
    assert signals.planes["entropy"][:, [2, 5]].count_nonzero() == 0
    assert signals.planes["entropy"][:, 0].count_nonzero() == LAYERS * HEADS * BLOCK_SIZE
