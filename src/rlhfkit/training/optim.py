"""AdamW with decay groups, LR schedules with warm-up, step counting and gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_scheduler

from rlhfkit.config import FinetuningArguments, TrainingArguments


def param_groups(params: list[tuple[str, nn.Parameter]], args: TrainingArguments,
                 finetuning: FinetuningArguments | None = None) -> list[dict]:
    """Parameter groups of the trainable `params`: no weight decay on biases, norms and 1-D tensors;
    with loraplus_lr_ratio (LoRA+, grouped as LLaMA-Factory and peft group it) the LoRA B matrices
    and the 1-D tensors learn at learning_rate x ratio, B matrices of LoRA on embeddings at
    loraplus_lr_embedding. Groups at learning_rate come first, decayed before not decayed."""
    ratio = finetuning.loraplus_lr_ratio if finetuning is not None else None
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in params:
        if not param.requires_grad:
            continue
        lr = args.learning_rate
        if ratio is not None and "lora_embedding_B" in name:
            lr = finetuning.loraplus_lr_embedding
        elif ratio is not None and ("lora_B" in name or param.ndim == 1):
            lr = args.learning_rate * ratio
        decays = param.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((lr, decays), []).append(param)
    order = sorted(groups, key=lambda key: (key[0] != args.learning_rate, not key[1]))
    return [{"params": groups[key], "lr": key[0], "weight_decay": args.weight_decay if key[1] else 0.0}
            for key in order]


def build_optimizer(params: list[tuple[str, nn.Parameter]], args: TrainingArguments,
                    finetuning: FinetuningArguments | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable `params`, grouped by `param_groups`."""
    groups = param_groups(params, args, finetuning)
    trainable = [p for group in groups for p in group["params"]]
    # The fused kernel updates each tensor in one pass (4x faster than foreach on CPU); it takes
    # floating tensors on CPU or CUDA.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=fused or None,
    )


def warmup_steps_for(args: TrainingArguments, total_steps: int) -> int:
    """Warm-up steps: warmup_steps if set, else ceil(warmup_ratio x total)."""
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int):
    """The LR schedule named by lr_scheduler_type, with linear warm-up."""
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps_for(args, total_steps),
        num_training_steps=total_steps,
    )


def total_optimizer_steps(args: TrainingArguments, samples: int, samples_per_step: int) -> int:
    """max_steps if set, else ceil(num_train_epochs x steps per epoch)."""
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * math.ceil(samples / samples_per_step)))


def clip_and_step(
    accelerator, model: nn.Module, optimizer, scheduler, max_grad_norm: float, params: list[nn.Parameter],
    skip: bool = False, keep_gradients: bool = False,
) -> float:
    """Clip the gradient norm (if max_grad_norm > 0), step optimizer and schedule; return the norm.

    With `skip`, or when the norm is not finite, the gradients are dropped and nothing steps.
    Gradients are then freed, or zeroed in place with `keep_gradients` (the CPU's gradient block,
    `cpu.gradients.allocate_gradients`).
    """
    if max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros(())
    if not skip and math.isfinite(float(norm)):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=not keep_gradients)
    return float(norm)
