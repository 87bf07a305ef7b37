"""Summaries of per-sample numbers: mean, standard deviation and a percentile bootstrap interval."""

from __future__ import annotations

import math
from typing import Sequence

import torch

RESAMPLES = 2000
CONFIDENCE = 0.95


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` ``(n,)``.

    Draws `resamples` samples of size n with replacement, sorts their means m_(1) <= ... <= m_(B)
    and returns (m_(lo), m_(hi)) with lo = floor(B * a / 2) + 1 and hi = ceil(B * (1 - a / 2)),
    a = 1 - confidence (1-based order statistics). Seeded: the same values give the same interval.
    """
    if not values:
        raise ValueError("bootstrap_interval: no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_interval: confidence must be in (0, 1), got {confidence}")
    data = torch.tensor([float(v) for v in values], dtype=torch.float64)
    n = data.numel()
    generator = torch.Generator().manual_seed(seed)
    means = []
    chunk = max(1, 2_000_000 // n)  # bounds the (chunk, n) index matrix
    for begin in range(0, resamples, chunk):
        rows = min(chunk, resamples - begin)
        index = torch.randint(0, n, (rows, n), generator=generator)
        means.append(data[index].mean(dim=1))
    ordered = torch.cat(means).sort().values
    alpha = 1.0 - confidence
    low = math.floor(resamples * alpha / 2)
    high = math.ceil(resamples * (1.0 - alpha / 2)) - 1
    return float(ordered[low]), float(ordered[high])


def summarize(values: Sequence[float], seed: int = 0) -> dict[str, float]:
    """`n`, `mean`, `std` (n - 1 denominator; 0 for one value) and the 95% bootstrap `ci_low`, `ci_high`."""
    data = [float(v) for v in values]
    n = len(data)
    mean = sum(data) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1)) if n > 1 else 0.0
    low, high = bootstrap_interval(data, seed=seed)
    return {"n": n, "mean": mean, "std": std, "ci_low": low, "ci_high": high}
