"""Atomic checkpoints holding everything a run needs to continue exactly, and resuming from them.

A checkpoint `output_dir/checkpoint-<step>/` holds:
- the model as saved at the end of a run (adapter or full model, tokenizer, value head), so any
  checkpoint is also a usable model folder;
- `trainable_state.safetensors`: every trainable tensor by name (adapter-sized for LoRA; for full
  fine-tuning the model files above are read back instead, to avoid a second copy);
- `optimizer.pt`, `scheduler.pt`, `rng_state_<rank>.pt` (Python, NumPy, torch and CUDA RNGs);
- `trainer_state.json`: step counters and stage state (KL controller, reward statistics, ...).
It is written into a temporary folder, fsynced, then renamed: a crash never leaves a half-written
folder named like a checkpoint. Old checkpoints are pruned only after the new one is whole.

When weights are sharded over processes (FSDP, DeepSpeed) the model files hold the gathered full
weights, and the sharded model and optimizer state go to `sharded_state/` through accelerate's
`save_state` instead of `trainable_state.safetensors` and `optimizer.pt`; resume such a run with the
same launch config.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhfkit.errors import fail
from rlhfkit.models.saving import save_pretrained_model, split_trained
from rlhfkit.training.distributed import global_sums, is_sharded

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable_state.safetensors"
SHARDED_STATE_DIR = "sharded_state"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(value: Any, output_dir: str | Path) -> Path | None:
    """The checkpoint named by `resume_from_checkpoint` (true: the latest in output_dir), or None."""
    if value in (None, False, "", "false", "False", "none", "None"):
        return None
    if value is True or str(value).lower() == "true":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("resume_from_checkpoint: no checkpoint in %s yet; starting from scratch", output_dir)
            return None
        return checkpoints[-1]
    path = Path(str(value))
    if not (path / STATE_FILE).is_file():
        raise fail(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE}); "
                   "use true for the latest one in output_dir")
    return path


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(root, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _trainable_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    tensors = {}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if param.requires_grad:
                tensors[f"{prefix}.{name}"] = param.detach().to("cpu").contiguous()
    return tensors


def check_finite(modules: dict[str, torch.nn.Module], accelerator=None) -> None:
    """Refuse to save weights that hold NaN or Inf.

    Each process checks what it holds (its shards, when weights are sharded); with `accelerator`
    the verdict is shared, so every process raises together instead of some waiting forever.
    """
    bad = None
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP2 shard is a DTensor
            if param.requires_grad and not torch.isfinite(local.detach()).all():
                bad = f"{prefix}.{name}"
                break
    if accelerator is not None:
        (count,) = global_sums(accelerator, bad is not None)
        bad = bad or ("held by another process" if count else None)
    if bad is not None:
        raise fail(f"weights {bad} are not finite; not saving them. Lower learning_rate "
                   "or resume from an earlier checkpoint")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Writes and restores checkpoints of one run; only the main process writes shared files."""

    def __init__(self, output_dir: str | Path, save_steps: int, save_total_limit: int | None, accelerator) -> None:
        self.output_dir = Path(output_dir)
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit
        self.accelerator = accelerator

    def due(self, step: int, total_steps: int) -> bool:
        """Whether step `step` (1-based) ends with a checkpoint (never the last: the final save covers it)."""
        return self.save_steps > 0 and step % self.save_steps == 0 and step < total_steps

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer, scheduler, tokenizer,
             state: dict[str, Any], model=None, value_head=None, prepared=None) -> Path:
        """Write checkpoint-<step> atomically; `modules` maps a prefix to each trainable module.

        `prepared` is the module accelerate prepared; with sharded weights it is read collectively.
        """
        accel = self.accelerator
        random_state = rng_state()  # saving must not move the run's random streams (sharded saving does)
        sharded = prepared is not None and is_sharded(accel)
        check_finite(modules, accel)
        full_state = accel.get_state_dict(prepared) if sharded else None  # every process takes part
        final = self.output_dir / f"checkpoint-{step}"
        staging = self.output_dir / f".tmp-checkpoint-{step}"
        if accel.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            if sharded:
                root = accel.unwrap_model(prepared)
                lm, lm_state, head = split_trained(root, full_state)
                save_pretrained_model(lm, tokenizer, staging, head, state_dict=lm_state)
            else:
                save_pretrained_model(model, tokenizer, staging, value_head)
                if not _is_full_model(model):
                    save_file(_trainable_tensors(modules), str(staging / TRAINABLE_FILE))
                torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        accel.wait_for_everyone()
        if sharded:
            accel.save_state(str(staging / SHARDED_STATE_DIR))
            accel.wait_for_everyone()
        torch.save(random_state, staging / f"rng_state_{accel.process_index}.pt")
        accel.wait_for_everyone()
        if accel.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
            _fsync_tree(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            self._prune()
            logger.info("checkpoint saved: %s", final)
        accel.wait_for_everyone()
        set_rng_state(random_state)
        return final

    def _prune(self) -> None:
        if not self.save_total_limit:
            return
        for old in list_checkpoints(self.output_dir)[: -self.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler, model=None,
             value_head=None, prepared=None) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler and RNG from `path`; return its trainer state."""
        path = Path(path)
        sharded = prepared is not None and is_sharded(self.accelerator)
        if sharded != (path / SHARDED_STATE_DIR).is_dir():
            raise fail(f"checkpoint {path} was written {'with' if not sharded else 'without'} sharded weights "
                       "(FSDP / DeepSpeed); resume it with the launch config it was written with")
        if sharded:
            self.accelerator.load_state(str(path / SHARDED_STATE_DIR))  # model and optimizer shards
        elif _is_full_model(model):
            _load_full_model(model, path)
            if value_head is not None:
                value_head.load_state_dict(load_file(str(path / "value_head.safetensors")))
        else:
            tensors = load_file(str(path / TRAINABLE_FILE))
            for prefix, module in modules.items():
                for name, param in module.named_parameters():
                    key = f"{prefix}.{name}"
                    if param.requires_grad:
                        if key not in tensors:
                            raise fail(f"checkpoint {path} has no tensor {key}; it was written by a different "
                                       "configuration (finetuning_type, lora_target, ...)")
                        param.data.copy_(tensors[key].to(param.device, param.dtype))
        device = self.accelerator.device
        if not sharded:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng_state_{self.accelerator.process_index}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        state = json.loads((path / STATE_FILE).read_text())
        logger.info("resumed from %s (step %d)", path, state["step"])
        return state


def _is_full_model(model) -> bool:
    from peft import PeftModel

    return model is not None and not isinstance(model, PeftModel)


def _load_full_model(model, path: Path) -> None:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if set(missing) - tied or unexpected:
        raise fail(f"checkpoint {path} does not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                   f"unexpected {sorted(unexpected)[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def truncate_trainer_log(output_dir: str | Path, step: int) -> None:
    """Drop log lines after `step`: a resumed run rewrites them, so the log matches an uninterrupted run."""
    path = Path(output_dir) / "trainer_log.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["current_steps"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class RunCheckpoints:
    """What a stage loop needs around its steps: resume at start, checkpoint when due or signalled."""

    def __init__(self, config, accelerator, output_dir: Path, modules: dict[str, torch.nn.Module], optimizer,
                 scheduler, tokenizer, model, value_head=None, prepared=None) -> None:
        self.manager = CheckpointManager(output_dir, config.output.save_steps, config.output.save_total_limit,
                                         accelerator)
        self.config, self.output_dir = config, output_dir
        self.modules, self.optimizer, self.scheduler = modules, optimizer, scheduler
        self.tokenizer, self.model, self.value_head = tokenizer, model, value_head
        self.prepared = prepared

    def resume(self) -> dict[str, Any]:
        """Restore the checkpoint asked for by resume_from_checkpoint; `{"step": 0}` when none."""
        path = resolve_resume(self.config.training.resume_from_checkpoint, self.output_dir)
        if path is None:
            return {"step": 0}
        state = self.manager.load(path, self.modules, self.optimizer, self.scheduler, self.model, self.value_head,
                                  self.prepared)
        if self.manager.accelerator.is_main_process:
            truncate_trainer_log(self.output_dir, state["step"])
        return state

    def after_step(self, step: int, total_steps: int, signals, state: dict[str, Any],
                   before_save: Callable[[], None] | None = None) -> None:
        """Checkpoint when due or when a stop signal arrived (at any process); then honour the signal.

        `before_save`, called on every process before a checkpoint is written, may refuse it by raising."""
        from rlhfkit.training.control import StopRequested

        stop = bool(signals.received)
        if self.manager.accelerator.num_processes > 1:  # all processes stop together, or none does
            stop = global_sums(self.manager.accelerator, stop)[0] > 0
        if self.manager.due(step, total_steps) or (stop and step < total_steps):
            if before_save is not None:
                before_save()
            self.manager.save(step, self.modules, self.optimizer, self.scheduler, self.tokenizer, state,
                              self.model, self.value_head, self.prepared)
        if stop and step < total_steps:
            raise StopRequested(f"stopped by signal after step {step}; resume with resume_from_checkpoint: true",
                                signals.exit_code)
