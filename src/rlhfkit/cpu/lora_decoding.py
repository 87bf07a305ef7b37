"""A lean forward for PEFT's LoRA linear layers while decoding.

Each decoding step calls every adapted projection once on a few rows, so PEFT's general forward
(adapter bookkeeping, dtype casts, the dropout call, a separate scale and sum) costs more than its
two rank-r products. Inside `lean_lora_decoding` each plain LoRA layer computes
``base(x) + scale * (x A^T) B^T`` as the base product, one rank-r product and one in-place
``addmm_``: the same function up to float rounding (tests/test_lora_decoding.py compares it with
PEFT's forward; tests/test_rollout_sampler.py the recorded log-probs with full forward passes).

A layer keeps PEFT's forward unless it is the plain case: exactly one active adapter, not merged,
not disabled, no variant (DoRA), no adapter bias, dropout inactive, adapter and base weights of
one dtype, and no extra arguments in the call.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


def _plain_lora(module: nn.Module) -> tuple[nn.Linear, nn.Linear, float] | None:
    """``(lora_A, lora_B, scale)`` of `module` if it is a PEFT LoRA linear layer in the plain case."""
    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
        return None
    active = module.active_adapters
    if len(active) != 1 or active[0] not in module.lora_A:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None
    lora_a, lora_b, base = module.lora_A[name], module.lora_B[name], module.base_layer
    dropout = module.lora_dropout[name]
    if lora_a.bias is not None or lora_b.bias is not None or not isinstance(base, nn.Linear):
        return None
    if module.training and not isinstance(dropout, nn.Identity):
        return None
    if lora_a.weight.dtype != base.weight.dtype or lora_b.weight.dtype != base.weight.dtype:
        return None
    return lora_a, lora_b, float(module.scaling[name])


def _lean_forward(module: nn.Module, lora_a: nn.Linear, lora_b: nn.Linear, scale: float):
    peft_forward = type(module).forward
    base = module.base_layer

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or x.dtype != base.weight.dtype:
            return peft_forward(module, x, *args, **kwargs)
        out = base(x)  # (..., out)
        rows = x.reshape(-1, x.shape[-1])  # (n, in)
        # weights read at call time: sharded training swaps in gathered ones around generation
        out.view(-1, out.shape[-1]).addmm_(rows @ lora_a.weight.t(), lora_b.weight.t(), alpha=scale)
        return out

    return forward


@contextlib.contextmanager
def lean_lora_decoding(model: nn.Module) -> Iterator[int]:
    """Run `model`'s plain LoRA linear layers with the lean forward inside; yields how many."""
    patched = []
    for module in model.modules():
        plain = _plain_lora(module)
        if plain is not None and "forward" not in vars(module):
            module.forward = _lean_forward(module, *plain)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
