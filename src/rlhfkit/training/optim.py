"""Optimizers by name (`optim`), LR schedules with warm-up (`lr_scheduler_type`, `lr_scheduler_kwargs`),
step counting and gradient clipping.

Every optimizer gets two parameter groups: weight decay on matrices, none on biases, norms and other
1-D tensors. `check_optimizer` runs when a run starts (before data and model are loaded) and turns
what would fail later -- bitsandbytes missing or without kernels for the device, schedule arguments
the schedule does not take or lacks -- into one-line errors.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from transformers import get_scheduler

from rlhfkit.config import Config, FinetuningArguments, TrainingArguments
from rlhfkit.errors import fail

BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
MIN_LR_SCHEDULES = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")
# Arguments every schedule gets from the run itself, not from lr_scheduler_kwargs.
RUN_ARGUMENTS = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")


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
                    finetuning: FinetuningArguments | None = None) -> torch.optim.Optimizer:
    """The optimizer named by `args.optim` over the trainable `params`, grouped by `param_groups`.

    adamw_torch: torch's AdamW, with its fused kernel when every parameter is a floating tensor on
    the CPU or CUDA (one pass per tensor, 4x faster than foreach on CPU), foreach otherwise;
    adamw_torch_fused: the fused kernel, required. adamw_8bit (alias adamw_bnb_8bit) and
    paged_adamw_8bit: bitsandbytes' AdamW with 8-bit state (paged: state in paged memory, on CUDA).
    adafactor: transformers' Adafactor at the learning rate (no relative step, no parameter scaling,
    as transformers' Trainer sets it). sgd: plain SGD.
    """
    groups = param_groups(params, args, finetuning)
    adam = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    name = args.optim
    if name in ("adamw_torch", "adamw_torch_fused"):
        trainable = [p for group in groups for p in group["params"]]
        fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
        fused = True if name == "adamw_torch_fused" else (fusable or None)
        try:
            return torch.optim.AdamW(groups, **adam, fused=fused)
        except RuntimeError as err:  # the fused kernel refuses the device or dtype
            raise fail(f"optim adamw_torch_fused: {str(err).splitlines()[0]}; use optim: adamw_torch") from None
    if name in BITSANDBYTES_OPTIMIZERS:
        bnb = import_bitsandbytes(name)
        paged = name.startswith("paged")
        return (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)(groups, **adam)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=args.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    raise fail(f"optim is '{name}'; allowed: adamw_torch, adamw_torch_fused, {', '.join(BITSANDBYTES_OPTIMIZERS)}, "
               "adafactor, sgd")


def import_bitsandbytes(optim: str):
    """The bitsandbytes module, or a one-line error saying how to get it."""
    try:
        import bitsandbytes
    except ImportError:
        raise fail(f"optim {optim} needs bitsandbytes: pip install bitsandbytes (or choose optim: adamw_torch)") from None
    except Exception as err:  # noqa: BLE001 - a broken install raises anything on import
        raise fail(f"optim {optim}: bitsandbytes fails to import ({type(err).__name__}: "
                   f"{str(err).splitlines()[0] if str(err) else ''}); reinstall it or choose optim: adamw_torch") from None
    return bitsandbytes


def probe_bitsandbytes(optim: str, device: torch.device) -> None:
    """One 8-bit AdamW step on a throwaway tensor on `device`: fails in one line where bitsandbytes
    has no kernel for the device (4096 elements: bitsandbytes keeps smaller tensors' state in 32 bits)."""
    bnb = import_bitsandbytes(optim)
    try:
        probe = nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as err:  # noqa: BLE001 - kernels missing for the device raise various types
        message = str(err).splitlines()[0] if str(err) else ""
        raise fail(f"optim {optim}: bitsandbytes {getattr(bnb, '__version__', '')} cannot run its 8-bit optimizer on "
                   f"{device.type} ({type(err).__name__}: {message}); choose optim: adamw_torch or adafactor") from None


def warmup_steps_for(args: TrainingArguments, total_steps: int) -> int:
    """Warm-up steps: warmup_steps if set, else ceil(warmup_ratio x total)."""
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)


def _schedule_function(source: str, name: str):
    from transformers import __version__
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    try:
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except (ValueError, KeyError):
        raise fail(f"{source}: lr_scheduler_type {name} is not in transformers {__version__}; upgrade transformers "
                   "or choose another schedule") from None


def schedule_kwargs(args: TrainingArguments, total_steps: int) -> dict:
    """lr_scheduler_kwargs, with LLaMA-Factory's defaults for warmup_stable_decay: a third of the steps
    after warm-up stable, the rest decaying."""
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if args.lr_scheduler_type == "warmup_stable_decay":
        remaining = total_steps - warmup_steps_for(args, total_steps)
        kwargs.setdefault("num_stable_steps", remaining // 3)
        kwargs.setdefault("num_decay_steps", remaining - remaining // 3)
    return kwargs


def check_schedule(source: str, args: TrainingArguments) -> None:
    """lr_scheduler_kwargs against the arguments the schedule takes: unknown or missing ones fail in one line."""
    name = args.lr_scheduler_type
    parameters = inspect.signature(_schedule_function(source, name)).parameters
    accepted = [p for p, spec in parameters.items() if p not in RUN_ARGUMENTS
                and spec.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    given = schedule_kwargs(args, total_steps=1)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise fail(f"{source}: lr_scheduler_kwargs {', '.join(unknown)} not known to lr_scheduler_type {name}; {takes}")
    missing = [p for p in accepted if parameters[p].default is inspect.Parameter.empty and p not in given]
    if name in MIN_LR_SCHEDULES:
        bounds = [key for key in ("min_lr", "min_lr_rate") if given.get(key) is not None]
        if len(bounds) != 1:
            raise fail(f"{source}: lr_scheduler_type {name} needs exactly one of min_lr and min_lr_rate in "
                       f"lr_scheduler_kwargs (e.g. lr_scheduler_kwargs: {{min_lr_rate: 0.1}}), got "
                       f"{', '.join(bounds) or 'neither'}")
    if missing:
        raise fail(f"{source}: lr_scheduler_type {name} needs {', '.join(missing)} in lr_scheduler_kwargs")


def check_optimizer(config: Config, device: torch.device) -> None:
    """At the start of a run: bitsandbytes where optim needs it, and the schedule's arguments."""
    if config.training.optim in BITSANDBYTES_OPTIMIZERS:
        probe_bitsandbytes(config.training.optim, device)
    check_schedule(config.source, config.training)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int):
    """The LR schedule named by lr_scheduler_type, with linear warm-up and lr_scheduler_kwargs."""
    try:
        return get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=warmup_steps_for(args, total_steps),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=schedule_kwargs(args, total_steps),
        )
    except (TypeError, ValueError) as err:  # `check_schedule` catches these first; a safety net
        raise fail(f"lr_scheduler_type {args.lr_scheduler_type} with lr_scheduler_kwargs "
                   f"{args.lr_scheduler_kwargs}: {str(err).splitlines()[0]}") from None


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
