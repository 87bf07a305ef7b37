"""Host-to-device copies that do not make the host wait for the device.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory synchronises the stream: the host
waits until the device has finished everything queued before it, so a training loop that copies each
micro-batch's batch drains the device every micro-batch. From page-locked (pinned) memory the copy
is queued like a kernel (``non_blocking=True``) and ordered before the passes that read it, so the
host goes on queueing. Other devices copy as usual.
"""

from __future__ import annotations

import torch


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`batch`'s tensors on `device`; from the CPU to CUDA through pinned memory, without a host wait."""
    if torch.device(device).type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) if value.device.type == "cpu"
            else value.to(device) for key, value in batch.items()}
