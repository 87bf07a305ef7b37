"""Gradients kept in one block for the whole run, and sparse embedding gradients added into it.

glibc's heap (see `cpu.allocator`) suffers when each step's first backward pass creates the
gradients and the step frees them: they land between that pass's activations and stop the freed
blocks around them from merging, so later passes, which need blocks of other sizes, grow the
heap. Allocated once, before any pass, they sit in one block. GPU caching allocators do not have
this problem, so `CpuSpeedups` applies this only on one CPU process.
"""

from __future__ import annotations

import torch
from torch import nn


def allocate_gradients(params: list[nn.Parameter]) -> bool:
    """Give every parameter in `params` its gradient now, zeroed, as views of one buffer per
    (device, dtype); True if done. `clip_and_step` then zeroes them in place (``keep_gradients``).

    The arithmetic is unchanged (the first pass adds its gradient to zeros); a parameter that the
    loss does not reach gets a zero gradient instead of none.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for param in params:
        if param.requires_grad and param.grad is None:
            groups.setdefault((param.device, param.dtype), []).append(param)
    for (device, dtype), members in groups.items():
        buffer = torch.zeros(sum(p.numel() for p in members), device=device, dtype=dtype)
        offset = 0
        for param in members:
            param.grad = buffer[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
    return True


def sparse_embedding_gradients(model: nn.Module) -> int:
    """Let every trainable `nn.Embedding` of `model` give autograd a sparse gradient; returns how many.

    Call only after `allocate_gradients`, on one process (DDP decides at wrapping time which
    gradients are sparse): each pass's embedding gradient (the rows of the tokens it saw) is then
    added in place into the parameter's dense gradient buffer (or, for a tied LM head whose
    gradient autograd builds, into that first) instead of being built as a zero-filled
    vocabulary x hidden tensor and added whole. The gradient after accumulation is the same dense
    tensor, so clipping and the optimizer are unchanged.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad and module.weight.grad is not None \
                and not module.weight.grad.is_sparse:
            module.sparse = True
            switched += 1
    return switched
