"""TensorBoard event files (`report_to: tensorboard`): every statistic as a scalar, samples as text.

Tags: `eval_<name>` statistics become `eval/<name>`, every other statistic `train/<name>` (so
`score/rm` is `train/score/rm`; the other trackers get the same names); sampled rollouts go to the
text tag `samples` as a Markdown table. The events are written to `output_dir/runs`; view them with
`tensorboard --logdir output_dir`. `TensorBoardWriter` is an accelerate tracker (`tracking.trackers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

RUNS_DIR = "runs"
SAMPLES_TAG = "samples"
BOOKKEEPING_KEYS = frozenset({"current_steps", "total_steps", "percentage", "elapsed_time", "remaining_time"})
"""trainer_log.jsonl fields that describe progress rather than training; not written as scalars."""


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of statistic `key`."""
    if key.startswith("eval_"):
        return f"eval/{key[len('eval_'):]}"
    return f"train/{key}"


def scalar_items(record: dict[str, Any]) -> list[tuple[str, float]]:
    """(tag, value) of every numeric statistic of a trainer-log record, bookkeeping left out."""
    return [(scalar_tag(key), float(value)) for key, value in record.items()
            if key not in BOOKKEEPING_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)]


def _cell(value: Any, max_chars: int) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = " ".join(str(value).split())  # one line per cell
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("|", "\\|")


def sample_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Sample rows as a table: (header, cells): prompt, response, one column per score, reward, KL."""
    sources = list(rows[0].get("scores", {})) if rows else []
    header = ["prompt", "response", *[f"score/{name}" for name in sources], "reward", "kl"]
    cells = [[row["prompt"], row["response"], *[row["scores"].get(name, "") for name in sources], row["reward"],
              row["kl"]] for row in rows]
    return header, cells


def samples_table(rows: list[dict[str, Any]], max_rows: int = 16, max_chars: int = 200) -> str:
    """A Markdown table of sample rows (`sample_columns`).

    At most `max_rows` rows; long texts are cut to `max_chars` characters.
    """
    if not rows:
        return ""
    header, cells = sample_columns(rows[:max_rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c, max_chars) for c in row) + " |" for row in cells]
    if len(rows) > max_rows:
        lines.append(f"\n{len(rows) - max_rows} more in samples.jsonl")
    return "\n".join(lines)


class TensorBoardWriter(GeneralTracker):
    """Writes scalars and sample tables under `output_dir/runs`; the file is created on first use.

    As an accelerate tracker (`Accelerator(log_with=[...])`), `log` takes values already tagged
    (`scalar_tag`): numbers become scalars, text becomes a text summary. `purge_step`: a resumed
    run's first step; TensorBoard then hides the events of that step and later ones that earlier
    event files hold (written by the interrupted run after its checkpoint).
    """

    name = "tensorboard"
    requires_logging_directory = False

    def __init__(self, output_dir: str | Path, purge_step: int | None = None) -> None:
        super().__init__()
        self.log_dir = Path(output_dir) / RUNS_DIR
        self.purge_step = purge_step
        self.purge_step = purge_step
        self._writer = None

    @property
    def tracker(self):
        return self.writer

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs) -> None:
        """Tagged values at global step `step`: numbers as scalars, strings as text."""
        for tag, value in values.items():
            if isinstance(value, str):
                self.writer.add_text(tag, value, step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.close()

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """The sample rows of `step` as a Markdown table under the text tag `samples`."""
        if rows:
            self.writer.add_text(SAMPLES_TAG, samples_table(rows), step)
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
