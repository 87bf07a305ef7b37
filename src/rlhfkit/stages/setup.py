"""The set-up every stage shares: accelerator, seeds and output folder (`start_run`), then
optimizer, schedule, gradient block, checkpoints, resume and log around the trained module
(`prepare_training`), and the optimizer step with its non-finite guard (`Training.optimizer_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from torch import nn

from rlhfkit.checkpoint import RunCheckpoints
from rlhfkit.config import Config
from rlhfkit.cpu.speedups import CpuSpeedups
from rlhfkit.tracking.trainer_log import TrainerLog
from rlhfkit.training.control import NonFiniteGuard, StopSignals, active_signals
from rlhfkit.training.optim import build_optimizer, build_scheduler, clip_and_step
from rlhfkit.training.probe import check_outputs_finite, probe_ids
from rlhfkit.training.runtime import build_accelerator, check_output_dir, seed_everything, seed_per_process


def start_run(config: Config) -> tuple[Accelerator, Path]:
    """The accelerator, the shared seed (the same initial weights on every process) and the
    checked output folder."""
    accelerator = build_accelerator(config)
    seed_everything(config.training.seed)
    return accelerator, check_output_dir(config)


@dataclass
class Training:
    """A stage's trained module and everything its loop steps with; `with` releases the CPU buffers."""

    config: Config
    accelerator: Accelerator
    model: nn.Module
    """The module accelerate prepared (DDP/FSDP/DeepSpeed wrap it): run forward passes through it."""
    optimizer: Any
    scheduler: Any
    params: list[nn.Parameter]
    """Trainable parameters after preparation (FSDP replaces them)."""
    speedups: CpuSpeedups
    checkpoints: RunCheckpoints
    guard: NonFiniteGuard
    signals: StopSignals
    log: TrainerLog
    resumed: dict[str, Any]
    """The resumed checkpoint's stage state; ``{"step": 0}`` on a fresh start."""
    probe_ids: Any
    """The probe batch ``(1, T)`` the outputs are checked on before weights are written."""

    def __enter__(self) -> "Training":
        return self

    def __exit__(self, *exc) -> None:
        self.speedups.release()

    def optimizer_step(self, loss: float, step: int) -> tuple[float, bool]:
        """Clip and step unless the loss or the gradient norm is not finite; (norm, stepped)."""
        skip = not self.guard.ok(loss, what="loss", step=step)
        norm = clip_and_step(self.accelerator, self.model, self.optimizer, self.scheduler,
                             self.config.training.max_grad_norm, self.params, skip=skip,
                             keep_gradients=self.speedups.keep_gradients)
        stepped = not skip and self.guard.ok(norm, what="gradients", step=step)
        if stepped:
            self.guard.applied()
        return norm, stepped

    def end_step(self, step: int, total_steps: int, stats: dict[str, Any],
                 evaluate: Callable[[], dict[str, float]] | None = None) -> None:
        """After optimizer step `step`: `evaluate()` into `stats` every eval_steps (not at the last
        step, which the stage evaluates itself), advance the progress, log every logging_steps (and
        at the first and last steps and after an evaluation), checkpoint when due or signalled."""
        if evaluate is not None and self.config.training.eval_steps and step % self.config.training.eval_steps == 0 \
                and step < total_steps:
            stats.update(evaluate())
        self.log.advance(step)
        if step % self.config.output.logging_steps == 0 or step in (1, total_steps) or "eval_loss" in stats:
            self.log.log(step, stats)
        self.after_step(step, total_steps)

    def after_step(self, step: int, total_steps: int, state: dict[str, Any] | None = None) -> None:
        """Checkpoint when due or signalled (with the guard's and the stage's `state`), once the
        weights passed the probe."""
        self.checkpoints.after_step(step, total_steps, self.signals, {"guard": self.guard.state_dict(),
                                                                       **(state or {})},
                                    before_save=lambda: self.check_outputs(f"checkpoint-{step}"))

    def check_outputs(self, what: str) -> None:
        """Refuse to write `what` when the model's outputs on the probe batch are not finite."""
        check_outputs_finite(self.accelerator, self.model, self.probe_ids, what, self.checkpoints.output_dir)


def prepare_training(config: Config, accelerator: Accelerator, output_dir: Path, module: nn.Module,
                     named_params: list[tuple[str, nn.Parameter]], modules: dict[str, nn.Module], tokenizer,
                     total_steps: int, console_keys: tuple[str, ...],
                     optimizer_steps: int | None = None) -> Training:
    """Optimizer and schedule over `named_params`, `module` prepared with them, the gradient block,
    per-process seeds, checkpoints (resumed when asked) and the log.

    `modules`: the trainable parts by name as checkpoints save them (the first is the model, a
    ``value_head`` entry its head). `optimizer_steps`: the schedule's length when it differs from
    `total_steps` (PPO steps the optimizer several times per step).
    """
    t = config.training
    optimizer = build_optimizer(named_params, t)
    scheduler = build_scheduler(optimizer, t, optimizer_steps or total_steps)
    prepared, optimizer = accelerator.prepare(module, optimizer)
    params = [param for param in prepared.parameters() if param.requires_grad]  # FSDP replaces the parameters
    speedups = CpuSpeedups.for_run(t.cpu_speedups, accelerator)
    speedups.gradient_block(accelerator.unwrap_model(prepared), params)  # before any pass
    seed_per_process(t.seed, accelerator.process_index)
    model = next(iter(modules.values()))
    checkpoints = RunCheckpoints(config, accelerator, output_dir, modules, optimizer, scheduler, tokenizer,
                                 model, modules.get("value_head"), prepared=prepared)
    guard = NonFiniteGuard(t.max_bad_steps, output_dir)
    resumed = checkpoints.resume()
    if "guard" in resumed:
        guard.load_state_dict(resumed["guard"])
    log = TrainerLog(output_dir, total_steps, enabled=accelerator.is_main_process, console_keys=console_keys,
                     start_step=resumed["step"], config=config)
    return Training(config, accelerator, prepared, optimizer, scheduler, params, speedups, checkpoints, guard,
                    active_signals(), log, resumed, probe_ids(tokenizer, accelerator.device))
