"""`KeptBuffer`: one tensor kept for a hot path's largest output, reused while nothing refers to it.

A PPO pass's vocabulary-sized tensors (the LM head's logits, their log-softmax: 16 rows x 32
positions x 49,152 entries = 100 MB each) are larger than malloc's mmap threshold
(`cpu.allocator`), so each would be a fresh mapping every pass, its pages faulted in and
zeroed again. A `KeptBuffer` hands out its one tensor again instead, but only when no other
tensor still refers to its storage (checked at every call): a caller that keeps an earlier
output gets a new buffer, never its data overwritten. Only CPU tensors from the mmap threshold up
are kept: smaller ones come from malloc's heap, which reuses them already, and GPU allocators
cache their blocks themselves.
"""

from __future__ import annotations

import math

import torch

from rlhfkit.cpu.allocator import MMAP_THRESHOLD


class KeptBuffer:
    """One kept tensor; `take` returns a view of it when it is free and large enough.

    Requests below `minimum_bytes` (default: malloc's mmap threshold) or off the CPU are plain
    allocations.
    """

    def __init__(self, minimum_bytes: int = MMAP_THRESHOLD) -> None:
        self.minimum_bytes = minimum_bytes
        self.buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape`, from the kept buffer when nothing else refers to it."""
        size = math.prod(shape)
        if device.type != "cpu" or size * dtype.itemsize < self.minimum_bytes:
            return torch.empty(shape, dtype=dtype, device=device)  # malloc's heap or a caching allocator reuses it
        buffer = self.buffer
        free = buffer is not None and buffer.dtype == dtype and buffer.device == device \
            and buffer.numel() >= size and storage_users(buffer) == 1
        if not free:
            keep = max(size, buffer.numel() if buffer is not None else 0)
            buffer = self.buffer = torch.empty(keep, dtype=dtype, device=device)
        return buffer[:size].view(shape)

    def release(self) -> None:
        """Drop the kept tensor (its memory is freed once no other tensor refers to it)."""
        self.buffer = None


def storage_users(tensor: torch.Tensor) -> int:
    """How many tensors share `tensor`'s storage, `tensor` included."""
    storage = tensor.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata) - 1  # minus the `storage` wrapper itself
