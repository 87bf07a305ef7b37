"""Run control shared by the stage loops: stop signals and non-finite guards."""

from __future__ import annotations

import logging
import math
import signal

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
    """Counts consecutive skipped updates caused by NaN/Inf; aborts after `max_bad_steps`."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.total = 0

    def ok(self, *values: float, what: str = "loss", step: int = 0) -> bool:
        """True if every value is finite; otherwise count the skip (and abort when too many)."""
        if all(math.isfinite(float(v)) for v in values):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        logger.warning("step %d: non-finite %s; update skipped (%d in a row)", step, what, self.consecutive)
        if self.consecutive >= self.max_bad_steps:
            raise RlhfkitError(f"{self.consecutive} consecutive updates had non-finite {what} (max_bad_steps="
                               f"{self.max_bad_steps}); lower learning_rate, check the data or reward source, "
                               "or resume from an earlier checkpoint")
        return False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = state["consecutive"], state["total"]
