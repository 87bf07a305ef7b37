"""TensorBoard event files (`report_to: tensorboard`): every statistic as a scalar, samples as text.

Tags: `eval_<name>` statistics become `eval/<name>`, every other statistic `train/<name>` (so
`score/rm` is `train/score/rm`); sampled rollouts go to the text tag `samples` as a Markdown
table. The events are written to `output_dir/runs`; view them with `tensorboard --logdir
output_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def samples_table(rows: list[dict[str, Any]], max_rows: int = 16, max_chars: int = 200) -> str:
    """A Markdown table of sample rows: prompt, response, one column per score, reward, KL.

    At most `max_rows` rows; long texts are cut to `max_chars` characters.
    """
    if not rows:
        return ""
    sources = list(rows[0].get("scores", {}))
    header = ["prompt", "response", *[f"score/{name}" for name in sources], "reward", "kl"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows[:max_rows]:
        cells = [row["prompt"], row["response"], *[row["scores"].get(name, "") for name in sources],
                 row["reward"], row["kl"]]
        lines.append("| " + " | ".join(_cell(c, max_chars) for c in cells) + " |")
    if len(rows) > max_rows:
        lines.append(f"\n{len(rows) - max_rows} more in samples.jsonl")
    return "\n".join(lines)


class TensorBoardWriter:
    """Writes scalars and sample tables under `output_dir/runs`; the file is created on first use.

    `purge_step`: a resumed run's first step; TensorBoard then hides the events of that step and
    later ones that earlier event files hold (written by the interrupted run after its checkpoint).
    """

    def __init__(self, output_dir: str | Path, purge_step: int | None = None) -> None:
        self.log_dir = Path(output_dir) / RUNS_DIR
        self.purge_step = purge_step
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        """Every numeric statistic of `record` at global step `step`."""
        for tag, value in scalar_items(record):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

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
