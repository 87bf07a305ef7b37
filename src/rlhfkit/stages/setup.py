"""The set-up every stage shares: accelerator, seeds and output folder (`start_run`), then
optimizer, schedule, gradient block, checkpoints, resume, trackers and log around the trained module
(`prepare_training`), the optimizer step with its non-finite guard (`Training.optimizer_step`) and
the count of input tokens seen (`Training.count_input_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from torch import nn

from rlhfkit.checkpoint import RunCheckpoints
from rlhfkit.config import Config
from rlhfkit.config.validation import NUM_INPUT_TOKENS_SEEN
from rlhfkit.cpu.speedups import CpuSpeedups
from rlhfkit.errors import RlhfkitError, fail
from rlhfkit.run_lock import hold_lock
from rlhfkit.tracking.trackers import start_trackers
from rlhfkit.tracking.trainer_log import TrainerLog
from rlhfkit.training.control import NonFiniteGuard, StopSignals, active_signals
from rlhfkit.training.distributed import global_sums
from rlhfkit.training.optim import build_optimizer, build_scheduler, check_optimizer, clip_and_step
from rlhfkit.training.probe import check_outputs_finite, probe_ids
from rlhfkit.training.runtime import (
    build_accelerator,
    check_output_dir,
    check_output_empty,
    seed_everything,
    seed_per_process,
)


def start_run(config: Config) -> tuple[Accelerator, Path]:
    """The accelerator, the shared seed (the same initial weights on every process) and the
    checked output folder, locked for this run; the optimizer's and schedule's settings are checked
    here, before the data and the model load."""
    accelerator = build_accelerator(config)
    check_optimizer(config, accelerator.device)
    seed_everything(config.training.seed)
    output_dir = check_output_dir(config)
    lock_output_dir(accelerator, output_dir)
    check_output_empty(config, output_dir)  # under the lock: no other run fills the folder meanwhile
    return accelerator, output_dir


def lock_output_dir(accelerator: Accelerator, output_dir: Path) -> None:
    """One run per output_dir: the main process takes its lock (held until the stage ends); when
    another run holds it, every process stops with the same one line."""
    refusal = None
    if accelerator.is_main_process:
        try:
            hold_lock(output_dir)
        except RlhfkitError as err:
            refusal = str(err)
    if accelerator.num_processes > 1 and global_sums(accelerator, refusal is not None)[0] and refusal is None:
        refusal = f"output_dir {output_dir} is in use by another run; wait for it to end, or choose another output_dir"
    if refusal is not None:
        raise fail(refusal)


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
    num_input_tokens_seen: int = 0
    """Input tokens trained on so far over all processes (`include_num_input_tokens_seen`)."""

    def __enter__(self) -> "Training":
        return self

    def __exit__(self, *exc) -> None:
        self.speedups.release()
        self.log.trackers.finish()  # after an error too (a no-op once `log.close` ran)

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

    @property
    def token_counting(self) -> str:
        """How input tokens are counted: no, non_padding or all (`include_num_input_tokens_seen`)."""
        return NUM_INPUT_TOKENS_SEEN[self.config.output.include_num_input_tokens_seen]

    def count_input_tokens(self, non_padding: int, padded: int) -> dict[str, int]:
        """Add this process's input tokens of a step -- without padding, or every position of its
        batches -- summed over all processes; returns ``{"num_input_tokens_seen": total so far}``, or
        ``{}`` when not counting. Collective: every process calls it once per step."""
        if self.token_counting == "no":
            return {}
        (step_tokens,) = global_sums(self.accelerator, non_padding if self.token_counting == "non_padding" else padded)
        self.num_input_tokens_seen += int(step_tokens)
        return {"num_input_tokens_seen": self.num_input_tokens_seen}

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
        self.checkpoints.after_step(step, total_steps, self.signals, {
            "guard": self.guard.state_dict(), "num_input_tokens_seen": self.num_input_tokens_seen, **(state or {})},
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
    optimizer = build_optimizer(named_params, t, config.finetuning)
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
                     start_step=resumed["step"], config=config, trackers=start_trackers(accelerator, config, output_dir, resumed["step"]))
    return Training(config, accelerator, prepared, optimizer, scheduler, params, speedups, checkpoints, guard,
                    active_signals(), log, resumed, probe_ids(tokenizer, accelerator.device),
                    num_input_tokens_seen=resumed.get("num_input_tokens_seen", 0))
