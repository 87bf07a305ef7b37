"""`tf32`: whether float32 matrix products on CUDA may use TF32 tensor cores.

TF32 keeps float32's range and rounds each product's inputs to 10 mantissa bits; the sums stay
float32. It speeds up float32 training (what bf16/fp16 runs keep for the trainable weights' updates
and everything outside autocast) several times on Ampere and newer GPUs. Set for the process, as
transformers' `tf32` argument does; other devices are left alone.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def apply_tf32(setting: bool | None, device_type: str) -> None:
    """Set TF32 for CUDA float32 products (matmul and cuDNN) to `setting`; None or another device: nothing."""
    if setting is None:
        return
    if device_type != "cuda":
        logger.info("tf32: %s applies to CUDA devices only; running on %s, it changes nothing", setting, device_type)
        return
    torch.backends.cuda.matmul.allow_tf32 = setting
    torch.backends.cudnn.allow_tf32 = setting
