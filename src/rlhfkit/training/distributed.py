"""What the stage loops need to run the same way on one process or many (DDP, FSDP, DeepSpeed).

Every process must run the same number of forward and backward passes through a prepared model
(FSDP gathers weights and DDP/FSDP/DeepSpeed reduce gradients collectively), so the loops give
each process an equal share of every step (`rank_share`) and never branch on local data alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from accelerate.utils import DistributedType


def is_sharded(accelerator) -> bool:
    """Whether parameters may be split over processes (FSDP or DeepSpeed): read them only collectively."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@contextlib.contextmanager
def micro_batch_context(accelerator, model, last: bool) -> Iterator[None]:
    """Accumulate gradients locally, and synchronise them only on the `last` micro-batch of a step.

    DDP and FSDP skip their gradient reduction inside `no_sync`; DeepSpeed instead reduces and
    steps inside `backward` at the accumulation boundary, which accelerate takes from its
    `sync_gradients` flag.
    """
    if getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
        return
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        yield


def global_sums(accelerator, *values: float | torch.Tensor) -> list[float]:
    """Each value summed over all processes, in one all-reduce, in float64.

    Tensor values (one element each) are gathered on their device, so the host waits for the
    device once, when it reads the sums, not once per value.
    """
    device = accelerator.device
    numbers = [i for i, v in enumerate(values) if not isinstance(v, torch.Tensor)]
    tensors = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    parts = []
    if numbers:  # one host-to-device copy
        parts.append(torch.tensor([float(values[i]) for i in numbers], dtype=torch.float64).to(device))
    if tensors:
        parts.append(torch.stack([values[i].detach().reshape(()).to(device, torch.float64) for i in tensors]))
    summed = accelerator.reduce(torch.cat(parts), "sum").tolist()
    result = [0.0] * len(values)
    for position, index in enumerate(numbers + tensors):
        result[index] = summed[position]
    return result


def global_masked_whiten(accelerator, values: torch.Tensor, mask: torch.Tensor, keep_mean: bool = False,
                         eps: float = 1e-8) -> torch.Tensor:
    """`rl.masked_whiten` with the mean and unbiased variance taken over every process's elements.

    On one process it equals `masked_whiten`; on several it equals `masked_whiten` of the
    concatenated batches. ``values``, ``mask``: ``(b, t)``; returns ``(b, t)``, 0 where masked.
    """
    mask_f = mask.to(values.dtype)
    total, count = global_sums(accelerator, (values * mask_f).sum(), mask_f.sum())
    mean = total / max(count, 1.0)
    (squares,) = global_sums(accelerator, (((values - mean) ** 2) * mask_f).sum())
    var = squares / max(count - 1.0, 1.0)
    whitened = (values - mean) * (var + eps) ** -0.5
    if keep_mean:
        whitened = whitened + mean
    return whitened * mask_f
