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


def step_batches(num_samples: int, samples_per_step: int, seed: int, start_step: int = 0,
                 fill_last: bool = False) -> Iterator[StepBatch]:
    """Endless optimizer-step batches over epochs, starting at `start_step` (for resuming).

    The last step of an epoch may be smaller; no sample is dropped. With `fill_last` it is topped
    up with the first samples of the same epoch's order instead, so every step has exactly
    `samples_per_step` samples (PPO: a rollout batch has one size on every process).
    """
    steps_per_epoch = math.ceil(num_samples / samples_per_step)
    step = start_step
    while True:
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_permutation(num_samples, seed, epoch)
        begin = position * samples_per_step
        indices = order[begin : begin + samples_per_step]
        if fill_last and len(indices) < samples_per_step:
            indices += order[: samples_per_step - len(indices)]
        yield StepBatch(step, (step + 1) / steps_per_epoch, indices)
        step += 1


def rank_share(indices: list[int], rank: int, world: int) -> tuple[list[int], int]:
    """This process's share of a step, padded so every process gets the same count.

    Process `rank` takes ``indices[rank::world]``; shares that come out one short are padded by
    repeating the step's first index, because DDP and FSDP need the same number of forward and
    backward passes on every process. Returns the padded share and how many of it are real: the
    caller gives the padding zero weight.
    """
    share = indices[rank::world]
    length = math.ceil(len(indices) / world)
    return share + indices[:1] * (length - len(share)), len(share)


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Split a step's indices into consecutive micro-batches."""
    return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
