"""Per-slot scoring signals, stored like the KV pages so they move with their tokens during compaction.

One float32 plane [blocks, kv_heads, block_size] per layer and signal, the layers of a signal stacked in one tensor
so that a step's values reach every layer in one indexed write. After per-(layer, head) compaction a slot holds
different tokens in different layers and heads, so even per-token signals (entropy) are kept per plane.

With the entropy signal, each block also keeps the entropy of the token after its last slot (`next_entropy`): a
request that reuses the block from the prefix cache computes that token without the logits it was drawn from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from infokv_vllm.kernels.families import KernelFamily


DTYPE = torch.float32


class SlotSignals:
    def __init__(self, names: frozenset[str], num_layers: int, num_blocks: int, num_kv_heads: int,
                 block_size: int, kernels: KernelFamily, device: torch.device) -> None:
        self.block_size = block_size
        self.kernels = kernels
        self.device = device
        # planes[name][layer] is that layer's plane (a view).
        self.planes = {name: torch.zeros(num_layers, num_blocks, num_kv_heads, block_size, device=device,
                                         dtype=DTYPE)
                       for name in sorted(names)}
        self.next_entropy = torch.zeros(num_blocks, device=device, dtype=DTYPE)

    @staticmethod
    def plane_bytes_per_block(num_layers: int, num_kv_heads: int, block_size: int) -> int:
        """One float32 value per layer, KV head and slot of a block: a signal's planes, or a probe's scores."""
        return num_layers * num_kv_heads * block_size * DTYPE.itemsize

    @staticmethod
    def bytes_per_block(names: frozenset[str], num_layers: int, num_kv_heads: int, block_size: int) -> int:
        """What the signals of `names` hold for each KV block (nothing without signals: no planes are built)."""
        if not names:
            return 0
        # the planes, and the block's next entropy
        return len(names) * SlotSignals.plane_bytes_per_block(num_layers, num_kv_heads, block_size) + DTYPE.itemsize

    def nbytes(self) -> int:
        return sum(planes.nbytes for planes in self.planes.values()) + self.next_entropy.nbytes

    def _locate(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return slots // self.block_size, slots % self.block_size

    def write(self, name: str, slots: torch.Tensor, values: torch.Tensor) -> None:
        """values at global slot ids [tokens], every head: [tokens] for every layer alike, or [layers, tokens]."""
        blocks, offsets = self._locate(slots.to(self.device, torch.long))
        planes = self.planes[name]
        values = values.to(self.device, planes.dtype)
        # Indices split by a slice put the indexed dimension first: the target is [tokens, layers, kv_heads].
        planes[:, blocks, :, offsets] = (values[:, None] if values.dim() == 1 else values.T)[..., None]

    def zero_blocks(self, name: str, block_ids: list[int]) -> None:
        if block_ids:
            self.planes[name][:, block_ids] = 0.0

    def copy_blocks(self, sources: list[int], destinations: list[int]) -> None:
        """Every signal of whole blocks, as their KV is copied (prefix-cache copies)."""
        if sources:
            for planes in self.planes.values():
                planes[:, destinations] = planes[:, sources]
            self.next_entropy[destinations] = self.next_entropy[sources]

    def request_slots(self, block_ids: list[int], indices: torch.Tensor) -> torch.Tensor:
        """Global slot ids of a request's physical token indices (its position in the request's pages)."""
        table = torch.tensor(block_ids, dtype=torch.long)
        return table[indices // self.block_size] * self.block_size + indices % self.block_size

    def gather(self, block_ids: list[int], length: int) -> dict[str, torch.Tensor]:
        """Each signal for a request's first `length` slots: [layers, kv_heads, length]."""
        blocks, offsets = self._locate(self.request_slots(block_ids, torch.arange(length)).to(self.device))
        return {name: planes[:, blocks, :, offsets].permute(1, 2, 0) for name, planes in self.planes.items()}

    def compact(self, block_ids: list[int], keep: torch.Tensor) -> None:
        """Move one request's kept slots (keep [layers, kv_heads, kept], as the KV moves) in every signal."""
        block_table = torch.tensor([block_ids], dtype=torch.int32, device=self.device)
        keep = keep.to(device=self.device, dtype=torch.int32)
        for planes in self.planes.values():
            self.kernels.compact_signals(planes, block_table, keep)
