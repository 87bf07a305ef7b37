"""Run control shared by the stage loops: stop signals and non-finite guards."""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path

from rlhfkit.errors import RlhfkitError

logger = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequested(RlhfkitError):
    """Raised after a checkpoint was written because SIGINT/SIGTERM asked the run to stop."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (the step finishes first).

    A second signal of the same kind stops at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        global _ACTIVE
        _ACTIVE = self
        for sig in EXIT_CODES:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received == signum:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s: finishing this step, then writing a checkpoint",
                       signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1)


_ACTIVE: StopSignals | None = None


def active_signals() -> StopSignals:
    """The StopSignals of the running stage (`run_stage` installs them), or an inert one."""
    return _ACTIVE if _ACTIVE is not None else StopSignals()


class NonFiniteGuard:
    """Counts updates skipped for NaN/Inf: in a row and in total; stops the run after `max_bad_steps` in a row.

    Only an update that was applied (`applied`) ends a run of skips: a finite reward or loss on its
    own proves nothing when the update that follows is skipped anyway. `output_dir`, if given, is
    searched for the checkpoint to name in the stop message.
    """

    def __init__(self, max_bad_steps: int, output_dir: str | Path | None = None) -> None:
        self.max_bad_steps = max_bad_steps
        self.output_dir = output_dir
        self.consecutive = 0
        self.total = 0

    def ok(self, *values: float, what: str = "loss", step: int = 0) -> bool:
        """True if every value is finite; otherwise count a skipped update (and stop when too many in a row)."""
        if all(math.isfinite(float(v)) for v in values):
            return True
        self.consecutive += 1
        self.total += 1
        logger.warning("step %d: non-finite %s; update skipped (%d in a row)", step, what, self.consecutive)
        if self.consecutive >= self.max_bad_steps:
            raise RlhfkitError(f"{self.consecutive} consecutive updates had non-finite {what} (max_bad_steps="
                               f"{self.max_bad_steps}); lower learning_rate, check the data or reward source, "
                               f"or resume from {resume_hint(self.output_dir)}")
        return False

    def applied(self) -> None:
        """An update was applied: the run of skipped ones is over."""
        self.consecutive = 0

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = state["consecutive"], state["total"]


def resume_hint(output_dir: str | Path | None) -> str:
    """What a run stopped for broken weights can resume from: the last checkpoint in `output_dir`, if any."""
    from rlhfkit.checkpoint import list_checkpoints  # the checkpoints import this module

    found = list_checkpoints(output_dir) if output_dir is not None else []
    return f"the last checkpoint, {found[-1]}" if found else "an earlier checkpoint"
