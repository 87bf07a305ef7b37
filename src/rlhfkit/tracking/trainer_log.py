"""What a training run shows and records: trainer_log.jsonl (LLaMA-Factory's fields plus ours),
the console (progress bar on a terminal, one concise line per logging step), the trackers of
`report_to` (TensorBoard events, wandb, ...: `tracking.trackers`), samples.jsonl (PPO) and PNG
curves (`plot_loss: true`).

A stage loop uses one `TrainerLog`::

    log = TrainerLog(output_dir, total_steps, enabled=is_main_process, console_keys=("loss",), config=config,
                     trackers=start_trackers(accelerator, config, output_dir))
    for step in ...:
        log.advance(step)              # every step: moves the progress bar
        if step % logging_steps == 0:
            log.log(step, stats)       # trainer_log.jsonl, console line, trackers
    log.close()                        # closes the bar and the trackers; writes the plots
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from rlhfkit.tracking.progress import Progress, console_line, format_seconds, format_stats
from rlhfkit.tracking.samples import SAMPLES_FILE, append_samples, sample_rows
from rlhfkit.tracking.trackers import Trackers

logger = logging.getLogger(__name__)

LOG_FILE = "trainer_log.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


class TrainerLog:
    """Appends one JSON line per logged step and shows it on the console, TensorBoard and in plots.

    Only the main process writes or prints (`enabled`); `start_step` lets a resumed run keep its
    step count and ETA continuous. With `config`, its `plot_loss` and `stage` keys switch on the
    plots and the bar's label; `trackers` (`tracking.trackers.start_trackers`) get every record
    and sample table. `stream` is where the progress bar goes (default stderr); the bar is shown
    only when it is a terminal.
    """

    def __init__(self, output_dir: str | Path, total_steps: int, enabled: bool = True,
                 console_keys: tuple[str, ...] = ("loss",), start_step: int = 0, config: Any = None,
                 stream: TextIO | None = None, trackers: Trackers | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOG_FILE
        self.total_steps = total_steps
        self.enabled = enabled
        self.console_keys = console_keys
        self.start_time = time.time()
        self.start_step = start_step
        self.history: list[dict[str, Any]] = []
        self._last_time, self._last_step = self.start_time, start_step
        stage = ""
        self.trackers = trackers if trackers is not None and enabled else Trackers(None)
        self.plot = False
        if config is not None:
            stage = config.finetuning.stage
            self.plot = enabled and bool(config.output.plot_loss)
        self.stage = stage
        self.progress = Progress(total_steps, start_step, stage, stream, enabled)

    def advance(self, step: int) -> None:
        """Mark optimizer step `step` (1-based) done: moves the progress bar."""
        self.progress.advance(step)

    def log(self, step: int, stats: dict[str, Any], console: bool = True) -> dict[str, Any]:
        """Record the statistics of optimizer step `step` (1-based)."""
        now = time.time()
        elapsed = now - self.start_time
        done = max(step - self.start_step, 1)
        remaining = elapsed / done * (self.total_steps - step)
        record = {
            "current_steps": step,
            "total_steps": self.total_steps,
            **{k: _clean(v) for k, v in stats.items()},
            "percentage": round(100.0 * step / self.total_steps, 2),
            "elapsed_time": format_seconds(elapsed),
            "remaining_time": format_seconds(remaining),
        }
        self.history.append(record)
        seconds_per_step = (now - self._last_time) / max(step - self._last_step, 1)
        self._last_time, self._last_step = now, step
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self.trackers.log(step, record)
            self.advance(step)
            if console:
                shown = format_stats(record, self.console_keys)
                self.progress.line(console_line(step, self.total_steps, shown, seconds_per_step, elapsed, remaining),
                                   postfix=shown)
        return record

    def log_samples(self, step: int, prompts: Sequence[str], responses: Sequence[str],
                    source_scores: dict[str, torch.Tensor], rewards: torch.Tensor, kl: torch.Tensor) -> None:
        """Append a batch of b samples to samples.jsonl (and TensorBoard's `samples` table).

        `source_scores` maps each reward source's name to its raw scores ``(b,)``; `rewards` ``(b,)``
        are the scores PPO used and `kl` ``(b,)`` each response's summed KL to the reference.
        """
        if not self.enabled:
            return
        rows = sample_rows(step, prompts, responses, source_scores, rewards, kl)
        append_samples(self.output_dir, rows)
        self.trackers.samples(step, rows)

    def close(self) -> list[Path]:
        """Finish the bar and the trackers; write the plots if `plot_loss`. Returns the plots."""
        self.progress.close()
        self.trackers.finish()
        if not (self.plot and self.enabled):
            return []
        from rlhfkit.tracking.plots import plot_curves

        written = plot_curves(read_trainer_log(self.output_dir), self.output_dir, title=self.stage)
        if written:
            logger.info("plots: %s", ", ".join(p.name for p in written))
        self.plot = False  # once
        return written


def read_trainer_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of `output_dir/trainer_log.jsonl`."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


STEP_KEYS = {LOG_FILE: "current_steps", SAMPLES_FILE: "step"}
"""The per-step JSON-lines files of a run and the key holding each line's step."""


def truncate_logs(output_dir: str | Path, step: int) -> None:
    """Keep only the lines of steps up to `step` in trainer_log.jsonl and samples.jsonl, so that a run
    resumed from the checkpoint of `step` writes each later step once. A line that does not parse
    (torn by a kill mid-write) is dropped too. A file that changes is replaced atomically."""
    for name, key in STEP_KEYS.items():
        path = Path(output_dir) / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        kept, dropped = [], 0
        for line in text.splitlines():
            try:
                record = json.loads(line)
                keep = record[key] <= step
            except (ValueError, TypeError, KeyError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
        if dropped or not text.endswith("\n"):  # a whole last line without its newline: the next would join it
            staging = path.with_name(f".{name}.tmp")
            staging.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(staging, path)
            logger.info("%s: dropped %d line(s) after step %d (rewritten by the resumed run)", name, dropped, step)
