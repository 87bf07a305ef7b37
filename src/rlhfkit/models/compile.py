"""`torch_compile`: compile each transformer block (regional compilation), keep decoding eager.

Compiling the repeated block, not the whole model, costs one compilation shared by every layer
(the blocks have the same code and shapes), works with PEFT's LoRA layers and with DDP, and
leaves embedding, head and loss code untouched. Inductor fuses each block's elementwise work
(norms, rotary embedding, activation, LoRA scaling and sums) and saves fewer activations for the
backward pass. Shapes are dynamic, so varying sequence lengths reuse the compiled code.
Token-by-token decoding grows the KV cache every step, which would recompile the blocks for each
length, so generation runs the plain eager blocks (`eager_blocks`).
"""

from __future__ import annotations

import logging

import torch
import torch._functorch.config
from torch import nn

from rlhfkit.errors import fail

logger = logging.getLogger(__name__)


def block_class_names(model: nn.Module) -> set[str]:
    """Class names of the model's repeated blocks (transformers' `_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def compile_blocks(model: nn.Module, memory_budget: float = 1.0) -> int:
    """Compile every transformer block of `model` in place; returns how many were compiled.

    `memory_budget` (0, 1]: the saved activations allowed, as a fraction of the fastest plan's;
    the partitioner recomputes the cheapest operations to fit (process-wide setting, read when a
    block first compiles).
    """
    names = block_class_names(model)
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise fail(f"torch_compile: {type(model).__name__} names no transformer block class "
                   "(_no_split_modules); set torch_compile: false")
    torch._functorch.config.activation_memory_budget = memory_budget
    for block in blocks:
        block.compile(dynamic=True)
    logger.info("torch_compile: %d %s blocks compile on their first forward pass", len(blocks),
                "/".join(sorted({type(b).__name__ for b in blocks})))
    return len(blocks)


def eager_blocks():
    """Context in which compiled blocks run their eager code (used around decoding)."""
    return torch.compiler.set_stance("force_eager")
