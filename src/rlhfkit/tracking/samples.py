"""`samples.jsonl`: sampled PPO rollouts with their scores, one JSON line per sample.

Each line: `step`, `prompt`, `response`, `scores` (each reward source's raw score, by source
name), `reward` (the score PPO used: weighted sum after EOS penalty, normalisation and
clipping) and `kl` (sum over response tokens of log pi - log ref, nats).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

SAMPLES_FILE = "samples.jsonl"


def _floats(values: torch.Tensor | Sequence[float]) -> list[float | None]:
    """Plain floats; a non-finite value becomes None (JSON null)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().reshape(-1).tolist()
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def sample_rows(step: int, prompts: Sequence[str], responses: Sequence[str],
                source_scores: dict[str, torch.Tensor | Sequence[float]],
                rewards: torch.Tensor | Sequence[float], kl: torch.Tensor | Sequence[float]) -> list[dict[str, Any]]:
    """One row per sample of a batch of b: every per-sample input has length b.

    `source_scores` maps each reward source's name to its raw scores ``(b,)``; `rewards` ``(b,)``
    and `kl` ``(b,)`` are per sample.
    """
    count = len(responses)
    scores = {name: _floats(values) for name, values in source_scores.items()}
    columns = {"prompts": len(prompts), "rewards": len(_floats(rewards)), "kl": len(_floats(kl)),
               **{f"scores[{name}]": len(v) for name, v in scores.items()}}
    wrong = {name: n for name, n in columns.items() if n != count}
    if wrong:
        raise ValueError(f"sample_rows: {count} responses but lengths {wrong}")
    reward_values, kl_values = _floats(rewards), _floats(kl)
    return [{"step": step, "prompt": prompts[i], "response": responses[i],
             "scores": {name: values[i] for name, values in scores.items()},
             "reward": reward_values[i], "kl": kl_values[i]} for i in range(count)]


def append_samples(output_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Append `rows` to `output_dir/samples.jsonl` (created if needed)."""
    path = Path(output_dir) / SAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_samples(output_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of `output_dir/samples.jsonl` (empty if there is none)."""
    path = Path(output_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
