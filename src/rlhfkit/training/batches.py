"""Deterministic data order: a fresh seeded permutation each epoch, split into steps and micro-batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class StepBatch:
    """The samples of one optimizer step."""

    step: int
    """0-based optimizer step."""
    epoch: float
    """Epochs completed when this step ends (fractional)."""
    indices: list[int]
    """Dataset indices of the step's samples."""


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of `epoch`: a permutation seeded by (seed, epoch), independent of history."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def step_batches(num_samples: int, samples_per_step: int, seed: int, start_step: int = 0) -> Iterator[StepBatch]:
    """Endless optimizer-step batches over epochs, starting at `start_step` (for resuming).

    The last step of an epoch may be smaller; no sample is dropped.
    """
    steps_per_epoch = math.ceil(num_samples / samples_per_step)
    step = start_step
    while True:
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_permutation(num_samples, seed, epoch)
        begin = position * samples_per_step
        yield StepBatch(step, (step + 1) / steps_per_epoch, order[begin : begin + samples_per_step])
        step += 1


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Split a step's indices into consecutive micro-batches."""
    return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
