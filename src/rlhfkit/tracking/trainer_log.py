"""trainer_log.jsonl (LLaMA-Factory's fields plus ours) and a concise console line per log step."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOG_FILE = "trainer_log.jsonl"


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


class TrainerLog:
    """Appends one JSON line per logged step and prints a short summary of it.

    Only the main process writes (`enabled`); `start_step` and `elapsed_before` let a resumed run
    keep its timing and step count continuous.
    """

    def __init__(self, output_dir: str | Path, total_steps: int, enabled: bool = True,
                 console_keys: tuple[str, ...] = ("loss",), start_step: int = 0) -> None:
        self.path = Path(output_dir) / LOG_FILE
        self.total_steps = total_steps
        self.enabled = enabled
        self.console_keys = console_keys
        self.start_time = time.time()
        self.start_step = start_step
        self.history: list[dict[str, Any]] = []

    def log(self, step: int, stats: dict[str, Any], console: bool = True) -> dict[str, Any]:
        """Record the statistics of optimizer step `step` (1-based)."""
        elapsed = time.time() - self.start_time
        done = max(step - self.start_step, 1)
        remaining = elapsed / done * (self.total_steps - step)
        record = {
            "current_steps": step,
            "total_steps": self.total_steps,
            **{k: _clean(v) for k, v in stats.items()},
            "percentage": round(100.0 * step / self.total_steps, 2),
            "elapsed_time": _format_seconds(elapsed),
            "remaining_time": _format_seconds(remaining),
        }
        self.history.append(record)
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if console:
                shown = " ".join(
                    f"{k}={record[k]:.4g}" for k in self.console_keys if isinstance(record.get(k), (int, float))
                )
                logger.info("[%d/%d] %s (%s elapsed, %s left)", step, self.total_steps, shown,
                            record["elapsed_time"], record["remaining_time"])
        return record


def read_trainer_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of `output_dir/trainer_log.jsonl`."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
