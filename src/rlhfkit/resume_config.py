"""Resume continues the run that wrote the checkpoint, or refuses.

Each checkpoint records the config keys that shape the run's trajectory (`config_record`). On
resume they are compared with the current config: a difference stops the run with one line listing
the keys, unless `resume_ignore_config_changes: true`; then they are listed in a warning and take
effect from the checkpoint on (learning rate, AdamW settings and schedule included). Keys that fix
which tensors are trained and their shapes cannot take effect on a checkpoint: a change there is
refused even then.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from rlhfkit.config import SECTIONS, Config
from rlhfkit.errors import fail

logger = logging.getLogger(__name__)

UNCHANGED_TRAJECTORY = frozenset({
    # where and how often results are written, and what is shown
    *(f.name for section in ("output", "export") for f in dataclasses.fields(SECTIONS[section])),
    "eval_steps", "resume_from_checkpoint", "resume_ignore_config_changes", "max_bad_steps",
    # the same computation, at most rounded differently or faster
    "per_device_eval_batch_size", "cpu_speedups", "gradient_checkpointing", "torch_compile",
    "torch_compile_memory_budget", "attn_implementation", "flash_attn", "device", "trust_remote_code",
    "overlong_prompts", "reward_api_timeout", "reward_api_retries", "disable_gradient_checkpointing",
    "logits_chunk_size", "rollout_engine", "rollout_compile", "stop_check_interval", "infer_backend",
    "cache_dir", "include_num_input_tokens_seen",
    # secrets are never written into a checkpoint
    "hf_hub_token",
})
"""Keys that cannot change what the run computes; every other key is recorded and compared."""

STRUCTURAL = ("stage", "finetuning_type", "lora_rank", "lora_target", "additional_target", "create_new_adapter",
              "freeze_trainable_layers", "freeze_trainable_modules")
"""Keys that decide which tensors are trained, and their shapes: a checkpoint cannot take a change."""


def config_record(config: Config) -> dict[str, Any]:
    """The trajectory-relevant keys of `config` and their values, as plain JSON data."""
    record = {}
    for section in SECTIONS:
        for f in dataclasses.fields(SECTIONS[section]):
            if f.name not in UNCHANGED_TRAJECTORY:
                record[f.name] = json.loads(json.dumps(getattr(getattr(config, section), f.name), default=str))
    return record


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for each key both records hold with different values."""
    return [(key, recorded[key], current[key]) for key in current if key in recorded and recorded[key] != current[key]]


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    """`key old → new, ...` on one line."""
    return ", ".join(f"{key} {_shown(old)} → {_shown(new)}" for key, old, new in changes)


def check_resume_config(recorded: dict[str, Any] | None, config: Config, checkpoint: Path,
                        report: bool = True) -> list[tuple[str, Any, Any]]:
    """Compare the config recorded in `checkpoint` with `config`; return the accepted changes.

    Refuses (one line) any change without `resume_ignore_config_changes`, and a structural change
    even with it. A checkpoint that records no config (written before configs were recorded) is
    resumed with a note. `report`: this process writes the notes and warnings.
    """
    if recorded is None:
        if report:
            logger.warning("note: %s records no config (an older checkpoint); resuming without checking that the "
                           "config is the one that made it", checkpoint)
        return []
    changes = config_changes(recorded, config_record(config))
    if not changes:
        return []
    structural = [c for c in changes if c[0] in STRUCTURAL]
    if structural:
        raise fail(f"cannot resume {checkpoint}: {describe(structural)} changes which tensors are trained or their "
                   f"shapes, which the checkpoint cannot provide; restore {'/'.join(c[0] for c in structural)} or "
                   "start a new run in another output_dir")
    if not config.training.resume_ignore_config_changes:
        raise fail(f"cannot resume {checkpoint} exactly: the config changed since it was written "
                   f"({describe(changes)}); "
                   "restore those values, or set resume_ignore_config_changes: true to continue with the new ones")
    if report:
        logger.warning("resume_ignore_config_changes: continuing %s with changed keys: %s", checkpoint,
                       describe(changes))
    return changes


HYPERPARAMETERS = ("betas", "eps", "weight_decay", "initial_lr")
"""The optimizer group entries the config sets (the learning rate follows from the schedule)."""


def fresh_hyperparameters(optimizer, scheduler) -> tuple[list[dict[str, Any]], list[float]]:
    """The config's optimizer settings and base learning rates, taken before a checkpoint replaces them."""
    groups = [{k: group[k] for k in HYPERPARAMETERS if k in group} for group in optimizer.param_groups]
    return groups, list(scheduler.base_lrs)


def apply_hyperparameters(optimizer, scheduler, fresh: tuple[list[dict[str, Any]], list[float]]) -> None:
    """After loading a checkpoint: the config's AdamW settings and peak learning rate take over, and the
    learning rate is the config's schedule at the checkpoint's step."""
    groups, base_lrs = fresh
    for group, settings in zip(optimizer.param_groups, groups):
        group.update(settings)
    scheduler.base_lrs = base_lrs
    if isinstance(scheduler, LambdaLR):  # every schedule of transformers' get_scheduler
        lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() reports (and the log shows) until the next step
