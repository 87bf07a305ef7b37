"""The LM head's product into reused memory, its weight gradient added in place (CPU speed).

A PPO pass's vocabulary logits are large (16 rows x 32 positions x 49,152 entries = 100 MB), and
so is the head weight's gradient (49,152 x hidden). Fresh tensors that size are mapped from the
system each pass and their pages faulted in again; with a tied embedding the head's gradient is
then added to the embedding's into a third fresh tensor before autograd adds that into the
parameter's gradient. `reuse_head_output` replaces the output embedding's forward so that:

* the logits are written into one `KeptBuffer` (reused whenever no tensor still refers to it, so
  a caller that keeps logits gets a new buffer);
* with ``accumulate=True`` the weight's gradient is added straight into ``weight.grad`` with one
  ``addmm_`` (which must be the dense block of `cpu.gradients.allocate_gradients`), instead of
  returned to autograd.

Both give the same numbers as ``nn.Linear`` up to float rounding (tests/test_head.py). The head
keeps its own forward wherever this does not apply: a head with bias or adapters, another dtype,
autocast, or sharded parameters (`CpuSpeedups` installs it only for one unsharded CPU process).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhfkit.cpu.buffers import KeptBuffer


class _HeadProduct(torch.autograd.Function):
    """``hidden @ weight^T`` ``(n, V)`` into `output`'s buffer; the weight's gradient optionally added into
    ``weight.grad``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, output: KeptBuffer, accumulate: bool):
        out = output.take((hidden.shape[0], weight.shape[0]), hidden.dtype, hidden.device)
        torch.mm(hidden, weight.t(), out=out)
        ctx.save_for_backward(hidden, weight)
        ctx.accumulate = accumulate
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None  # (n, H)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if ctx.accumulate:
                weight.grad.addmm_(grad.t(), hidden)  # (V, n) @ (n, H), added in place
            else:
                grad_weight = grad.t() @ hidden
        return grad_hidden, grad_weight, None, None


def _plain_head(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is None


LOGITS_BUFFER = KeptBuffer()  # one buffer for every head of the process (policy, reference)


def reuse_head_output(model: nn.Module, accumulate: bool, output: KeptBuffer = LOGITS_BUFFER) -> bool:
    """Run `model`'s output embedding through `_HeadProduct` from now on; True if installed.

    `accumulate`: add the weight's gradient into ``weight.grad`` directly. Only when that gradient
    is a dense buffer kept for the whole run and no other process needs to see it (DDP's hooks
    would miss it): `allocate_gradients` succeeded on one process. `output`: the logits buffer,
    shared by default, so a policy and a separate reference keep one buffer between them.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not _plain_head(head) or "forward" in vars(head):
        return False
    plain_forward = type(head).forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        weight = head.weight
        if hidden.dtype != weight.dtype or torch.is_autocast_enabled(hidden.device.type):
            return plain_forward(head, hidden)
        rows = hidden.reshape(-1, hidden.shape[-1])  # (n, H)
        adds = accumulate and weight.requires_grad and torch.is_grad_enabled() and weight.grad is not None \
            and not weight.grad.is_sparse and weight.grad.dtype == weight.dtype
        logits = _HeadProduct.apply(rows, weight, output, adds)  # (n, V)
        return logits.view(*hidden.shape[:-1], weight.shape[0])

    head.forward = forward
    return True
