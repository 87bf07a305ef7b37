"""Atomic checkpoints holding everything a run needs to continue exactly, and resuming from them.

A checkpoint `output_dir/checkpoint-<step>/` holds:
- the model as saved at the end of a run (adapter or full model, tokenizer, value head), so any
  checkpoint is also a usable model folder;
- `trainable_state.safetensors`: every trainable tensor by name (adapter-sized for LoRA; for full
  fine-tuning the model files above are read back instead, to avoid a second copy);
- `optimizer.pt`, `scheduler.pt`, `rng_state_<rank>.pt` (Python, NumPy, torch and CUDA RNGs): tensors
  and plain data, read with `weights_only=True` (`checkpoint_files`);
- `trainer_state.json`: step counters, stage state (KL controller, reward statistics, ...) and the
  config keys that shape the run (`resume_config`).
It is written into a temporary folder, fsynced, then renamed: a crash never leaves a half-written
folder named like a checkpoint, and a failed write (a full disk) removes the temporary folder and
stops the run with one line. Old checkpoints are pruned only after the new one is whole. Resuming
picks the latest checkpoint whose files are whole, and refuses a changed config.

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
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhfkit.checkpoint_files import (
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    SHARDED_STATE_DIR,
    STATE_FILE,
    TRAINABLE_FILE,
    CheckpointWriting,
    DamagedFile,
    choose_checkpoint,
    list_checkpoints,
    load_plain,
    read_state,
    save_plain,
)
from rlhfkit.errors import fail
from rlhfkit.models.saving import save_pretrained_model, split_trained
from rlhfkit.models.value_head import read_head_state
from rlhfkit.resume_config import apply_hyperparameters, check_resume_config, config_record, fresh_hyperparameters
from rlhfkit.tracking.trainer_log import truncate_logs
from rlhfkit.training.distributed import global_sums, is_sharded

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "RunCheckpoints", "check_finite", "list_checkpoints", "rng_state", "set_rng_state"]


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
    """Every random generator's state as tensors and plain lists (loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()` (or an older checkpoint's tuples and NumPy array)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
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
        A write that fails for lack of space (or any OSError) removes the temporary folder and stops
        every process with one line naming the path.
        """
        accel = self.accelerator
        random_state = rng_state()  # saving must not move the run's random streams (sharded saving does)
        sharded = prepared is not None and is_sharded(accel)
        check_finite(modules, accel)
        full_state = accel.get_state_dict(prepared) if sharded else None  # every process takes part
        final = self.output_dir / f"checkpoint-{step}"
        staging = self.output_dir / f".tmp-checkpoint-{step}"
        writing = CheckpointWriting(accel, final, staging)

        def write_shared() -> None:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            writing.at(staging)
            if sharded:
                lm, lm_state, head = split_trained(accel.unwrap_model(prepared), full_state)
                save_pretrained_model(lm, tokenizer, staging, head, state_dict=lm_state)
            else:
                save_pretrained_model(model, tokenizer, staging, value_head)
                if not _is_full_model(model):
                    save_file(_trainable_tensors(modules), str(writing.at(staging / TRAINABLE_FILE)))
                save_plain(optimizer.state_dict(), writing.at(staging / OPTIMIZER_FILE))
            save_plain(scheduler.state_dict(), writing.at(staging / SCHEDULER_FILE))

        def finish() -> None:
            writing.at(staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
            _fsync_tree(writing.at(staging))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            self._prune()

        writing.run(write_shared if accel.is_main_process else None)
        if sharded:
            writing.run(lambda: accel.save_state(str(writing.at(staging / SHARDED_STATE_DIR))))
        rng_file = staging / f"rng_state_{accel.process_index}.pt"
        writing.run(lambda: save_plain(random_state, writing.at(rng_file)))
        writing.run(finish if accel.is_main_process else None)
        if accel.is_main_process:
            logger.info("checkpoint saved: %s", final)
        set_rng_state(random_state)
        return final

    def _prune(self) -> None:
        if not self.save_total_limit:
            return
        for old in list_checkpoints(self.output_dir)[: -self.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler, model=None,
             value_head=None, prepared=None) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler and RNG from `path`; return its trainer state.

        Only tensors and plain data are read (`load_plain`); a tensor that does not fit the model
        stops the run with one line.
        """
        path = Path(path)
        sharded = prepared is not None and is_sharded(self.accelerator)
        if sharded != (path / SHARDED_STATE_DIR).is_dir():
            raise fail(f"checkpoint {path} was written {'with' if not sharded else 'without'} sharded weights "
                       "(FSDP / DeepSpeed); resume it with the launch config it was written with")
        try:
            if sharded:
                self.accelerator.load_state(str(path / SHARDED_STATE_DIR))  # model and optimizer shards
            elif _is_full_model(model):
                _load_full_model(model, path)
                if value_head is not None:
                    head = read_head_state(path)
                    _copy_tensors(path, {"value_head": value_head}, {f"value_head.{k}": v for k, v in head.items()})
            else:
                _copy_tensors(path, modules, load_file(str(path / TRAINABLE_FILE)))
            if not sharded:
                _load_optimizer(optimizer, load_plain(path / OPTIMIZER_FILE, map_location=self.accelerator.device),
                                path)
            scheduler.load_state_dict(load_plain(path / SCHEDULER_FILE))
            rng_file = path / f"rng_state_{self.accelerator.process_index}.pt"
            if rng_file.is_file():
                set_rng_state(load_plain(rng_file, numpy_arrays=True))
            state = read_state(path)
        except DamagedFile as err:
            raise fail(f"checkpoint {path} is damaged: {err}; resume from an earlier checkpoint") from None
        logger.info("resumed from %s (step %d)", path, state["step"])
        return state


def _is_full_model(model) -> bool:
    from peft import PeftModel

    return model is not None and not isinstance(model, PeftModel)


def _copy_tensors(path: Path, modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Copy each trainable parameter of `modules` from `tensors` (named `<prefix>.<name>`)."""
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            key = f"{prefix}.{name}"
            if not param.requires_grad:
                continue
            if key not in tensors:
                raise fail(f"checkpoint {path} has no tensor {key}; it was written by a different "
                           "configuration (finetuning_type, lora_target, ...)")
            if tensors[key].shape != param.shape:
                raise fail(f"checkpoint {path} holds {key} with shape {tuple(tensors[key].shape)}, the model has "
                           f"{tuple(param.shape)}; it was written with another LoRA shape or model (lora_rank, "
                           "lora_target, model_name_or_path)")
            param.data.copy_(tensors[key].to(param.device, param.dtype))


def _load_optimizer(optimizer, state: dict[str, Any], path: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise fail(f"checkpoint {path}: its optimizer state does not fit the trained parameters ({err}); it was "
                   "written for another set of trained tensors") from None


def _load_full_model(model, path: Path) -> None:
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ
        raise fail(f"checkpoint {path} does not match the model: {str(err).splitlines()[-1].strip()}") from None
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if set(missing) - tied or unexpected:
        raise fail(f"checkpoint {path} does not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                   f"unexpected {sorted(unexpected)[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


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
        """Restore the checkpoint asked for by resume_from_checkpoint; `{"step": 0}` when none.

        The latest whole checkpoint is chosen (damaged newer ones are skipped with a note), its
        recorded config is compared with this one (`resume_config`), and the logs are cut back to
        its step.
        """
        main = self.manager.accelerator.is_main_process
        path = choose_checkpoint(self.config.training.resume_from_checkpoint, self.output_dir,
                                 _is_full_model(self.model), report=main)
        if path is None:
            return {"step": 0}
        changes = check_resume_config(read_state(path).get("config"), self.config, path, report=main)
        fresh = fresh_hyperparameters(self.optimizer, self.scheduler)
        state = self.manager.load(path, self.modules, self.optimizer, self.scheduler, self.model, self.value_head,
                                  self.prepared)
        if changes:
            apply_hyperparameters(self.optimizer, self.scheduler, fresh)
        if main:
            truncate_logs(self.output_dir, state["step"])
            for stale in self.output_dir.glob(".tmp-checkpoint-*"):  # left by a kill mid-save; this run holds the lock
                shutil.rmtree(stale, ignore_errors=True)
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
            self.manager.save(step, self.modules, self.optimizer, self.scheduler, self.tokenizer,
                              {**state, "config": config_record(self.config)}, self.model, self.value_head,
                              self.prepared)
        if stop and step < total_steps:
            raise StopRequested(f"stopped by signal after step {step}; resume with resume_from_checkpoint: true",
                                signals.exit_code)
