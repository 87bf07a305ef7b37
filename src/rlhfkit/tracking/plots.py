"""`plot_loss: true`: PNG curves of the logged statistics, smoothed, with the raw values faint behind.

One file per statistic present in the log, `training_<key>.png` ("/" in a key becomes "_"):
loss, eval_loss, reward, kl, and for PPO policy_loss, value_loss and response_length (for
the reward model also accuracy and eval_accuracy). Drawn with matplotlib's Agg canvas, so no
display and no global backend change are needed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

PLOT_KEYS = ("loss", "eval_loss", "reward", "kl", "policy_loss", "value_loss", "response_length", "accuracy",
             "eval_accuracy")


def smoothing_weight(count: int) -> float:
    """EMA weight for a curve of `count` points: 0 up to 10 points, then 1 - 10/count, at most 0.95.

    The effective window is then about a tenth of the run.
    """
    return min(0.95, max(0.0, 1.0 - 10.0 / max(count, 1)))


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average.

    s_t = weight * s_{t-1} + (1 - weight) * x_t with s_{-1} = 0, reported as s_t / (1 - weight^(t+1)),
    so the first point equals x_0 and early points are not pulled towards zero.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smooth: weight must be in [0, 1), got {weight}")
    smoothed, state = [], 0.0
    for t, value in enumerate(values):
        state = weight * state + (1.0 - weight) * value
        smoothed.append(state / (1.0 - weight ** (t + 1)))
    return smoothed


def curve(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that hold a finite number for it."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(record["current_steps"]))
            values.append(float(value))
    return steps, values


def plot_file_name(key: str) -> str:
    """`training_<key>.png` with "/" replaced by "_"."""
    return f"training_{key.replace('/', '_')}.png"


def plot_curves(records: Sequence[dict[str, Any]], output_dir: str | Path, title: str = "",
                keys: Sequence[str] = PLOT_KEYS) -> list[Path]:
    """Write one PNG per key of `keys` found in `records`; return the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for key in keys:
        steps, values = curve(records, key)
        if not values:
            continue
        figure = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(figure)
        axis = figure.add_subplot()
        axis.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1.0, label="raw")
        axis.plot(steps, smooth(values, smoothing_weight(len(values))), color="tab:blue", linewidth=2.0,
                  label="smoothed", marker="o" if len(values) == 1 else None)
        axis.set_xlabel("step")
        axis.set_ylabel(key)
        axis.set_title(f"{title}: {key}" if title else key)
        axis.grid(alpha=0.3)
        axis.legend(loc="best")
        figure.tight_layout()
        path = Path(output_dir) / plot_file_name(key)
        figure.savefig(path)
        written.append(path)
    return written
