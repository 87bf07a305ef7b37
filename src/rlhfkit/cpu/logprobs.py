"""The update's log-probs with their vocabulary-sized log-softmax written into a kept buffer.

`rl.logprobs.logprobs_from_logits` with gradients keeps a ``(b, t, v)`` float32 log-softmax for
its backward pass; on the CPU a fresh tensor that size is a fresh mapping whose pages are faulted
in every pass (see `cpu.buffers`). Here it is written into `LOG_SOFTMAX_BUFFER` instead; the
forward and backward arithmetic are `rl.logprobs.SelectedLogSoftmax`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.cpu.buffers import KeptBuffer
from rlhfkit.rl.logprobs import SelectedLogSoftmax, check_logprob_inputs, logprobs_from_logits, scaled_logits

LOG_SOFTMAX_BUFFER = KeptBuffer()


class _BufferedSelectedLogSoftmax(SelectedLogSoftmax):
    """`SelectedLogSoftmax` whose forward writes the log-softmax into a `KeptBuffer`."""

    @staticmethod
    def forward(ctx, z: Tensor, labels: Tensor, buffer: KeptBuffer) -> Tensor:
        lsm = torch.log_softmax(z, dim=-1, dtype=torch.float32, out=buffer.take(z.shape, torch.float32, z.device))
        return SelectedLogSoftmax.select(ctx, lsm, labels, z.dtype)


def buffered_logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                                  buffer: KeptBuffer = LOG_SOFTMAX_BUFFER) -> Tensor:
    """`logprobs_from_logits` ``(b, t)``, with the log-softmax kept for the backward pass in `buffer`."""
    if not (torch.is_grad_enabled() and logits.requires_grad) or logits.numel() == 0:
        return logprobs_from_logits(logits, labels, temperature)
    check_logprob_inputs(logits, labels, temperature)
    return _BufferedSelectedLogSoftmax.apply(scaled_logits(logits, temperature), labels, buffer)
