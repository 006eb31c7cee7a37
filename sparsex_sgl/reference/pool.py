"""A KV pool shaped like SGLang's (per layer ``[slots, kv_heads, head_dim]``) and a free-list allocator.

Slot 0 is reserved for padding as in SGLang and is never handed out, so slot ids seen in tests mean
the same as in the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class FreeListAllocator:
    """Hands out slot ids ``1..num_slots-1``; lowest ids first, freed ids go back to the end of the list."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 2:
            raise ValueError("a pool needs slot 0 (padding) and at least one usable slot")
        self.num_slots = num_slots
        self._free: list[int] = list(range(1, num_slots))
        self._used: set[int] = set()

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        slots, self._free = self._free[:n], self._free[n:]
        self._used.update(slots)
        return slots

    def free(self, slots: Sequence[int]) -> None:
        for s in slots:
            assert s in self._used, f"double free or foreign slot {s}"
            self._used.remove(s)
        self._free.extend(slots)

    @property
    def free_size(self) -> int:
        return len(self._free)


class TensorKVPool:
    """K and V of every layer for ``num_slots`` tokens: ``k, v [layers, slots, kv_heads, head_dim]``."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.k = torch.zeros(num_layers, num_slots, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.allocator = FreeListAllocator(num_slots)

    def write(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [layers, len(slots), kv_heads, head_dim]``."""
        index = torch.as_tensor(list(slots), dtype=torch.int64, device=self.k.device)
        self.k[:, index] = k.to(self.k.dtype)
        self.v[:, index] = v.to(self.v.dtype)

    def read(self, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(list(slots), dtype=torch.int64, device=self.k.device)
        return self.k[:, index], self.v[:, index]
