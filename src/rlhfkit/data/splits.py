"""Deterministic train/validation splits."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

from rlhfkit.errors import fail

T = TypeVar("T")


def train_val_split(items: Sequence[T], val_size: float | int, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split `items` into (train, val); both keep the original order.

    `val_size` is a fraction in (0, 1) (rounded up to whole items) or a count >= 1; 0 or
    None gives an empty validation set. The choice of validation items depends only on
    `seed` and `len(items)`. At least one item is always left for training.
    """
    items = list(items)
    if val_size is None or val_size == 0:
        return items, []
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0:
        raise fail(f"val_size must be a fraction in (0, 1) or a count >= 1, got {val_size!r}")
    if isinstance(val_size, float) and val_size < 1:
        count = math.ceil(len(items) * val_size)
    elif float(val_size).is_integer():
        count = int(val_size)
    else:
        raise fail(f"val_size must be a fraction in (0, 1) or a whole count >= 1, got {val_size!r}")
    if count >= len(items):
        raise fail(
            f"val_size={val_size!r} leaves no training data out of {len(items)} examples; use a smaller val_size"
        )
    chosen = set(random.Random(seed).sample(range(len(items)), count))
    train = [item for index, item in enumerate(items) if index not in chosen]
    val = [item for index, item in enumerate(items) if index in chosen]
    return train, val
