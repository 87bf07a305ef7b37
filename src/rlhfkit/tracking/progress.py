"""Console progress: a tqdm bar on a terminal, and one concise line per logging step.

The bar (steps done, rate, ETA) appears only when the stream is a terminal, so CI logs and
redirected output get the plain lines alone. Lines printed while the bar is shown go above it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

logger = logging.getLogger(__name__)

TIMING_KEY = "seconds_per_step"
"""Shown by the line's own timing part rather than among the statistics."""


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (never raises)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def terminal_size(stream: Any) -> tuple[int, int] | None:
    """None when the terminal reports its size; else (100, 24) (pseudo-terminals may report 0 x 0)."""
    try:
        columns, rows = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # not a real file, or no size
        return 100, 24
    return None if columns > 0 and rows > 0 else (100, 24)


def format_seconds(seconds: float) -> str:
    """`H:MM:SS` of a non-negative duration (negative counts as 0)."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_stats(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    """`loss=0.5321 kl=0.05`: the numeric `keys` present in `record`, in the order given."""
    return " ".join(f"{key}={record[key]:.4g}" for key in keys
                    if key != TIMING_KEY and isinstance(record.get(key), (int, float))
                    and not isinstance(record.get(key), bool))


def console_line(step: int, total_steps: int, shown: str, seconds_per_step: float, elapsed: float,
                 remaining: float) -> str:
    """`[12/100] loss=0.5321 kl=0.05 | 1.84 s/step, 0:00:22 elapsed, 0:02:40 left`."""
    timing = f"{seconds_per_step:.2f} s/step, {format_seconds(elapsed)} elapsed, {format_seconds(remaining)} left"
    return f"[{step}/{total_steps}] {shown} | {timing}" if shown else f"[{step}/{total_steps}] {timing}"


class Progress:
    """A step counter shown as a tqdm bar when `stream` is a terminal, plus the per-log-step lines."""

    def __init__(self, total_steps: int, start_step: int = 0, description: str = "",
                 stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self._redirect = None
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm

            size = terminal_size(self.stream)  # None: follow the terminal as it is resized
            self.bar = tqdm(total=total_steps, initial=start_step, desc=description or None, unit="step",
                            file=self.stream, dynamic_ncols=size is None, ncols=size and size[0],
                            nrows=size and size[1], leave=True)
            # Other log messages go above the bar too, instead of through it.
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
            self._redirect.__enter__()

    def advance(self, step: int) -> None:
        """Move the bar to `step` optimizer steps done."""
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def line(self, text: str, postfix: str = "") -> None:
        """Print one line: above the bar on a terminal, through logging otherwise."""
        if self.bar is None:
            logger.info("%s", text)
            return
        self.bar.write(text, file=self.stream)
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=True)

    def close(self) -> None:
        """Finish the bar (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
