"""Masked statistics over response tokens and a running mean/variance tracker.

Shapes: ``values`` and ``mask`` are the same shape, usually ``(b, t)``. A mask is
bool or 0/1 float; it is converted with ``mask.to(values.dtype)``. Positions where
the mask is 0 never influence a result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(values * mask)`` over ``dim`` (all elements when ``dim`` is None).

    Args:
        values: ``(b, t)`` (any shape).
        mask: same shape as ``values``.
        dim: dimension to reduce, or None for a scalar over everything.
    """
    weighted = values * mask.to(values.dtype)
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(values * mask) / sum(mask)`` over ``dim`` (all elements when None).

    An empty mask (count 0) gives 0 rather than NaN.

    Args:
        values: ``(b, t)`` (any shape).
        mask: same shape as ``values``.
        dim: dimension to reduce, or None for a scalar over everything.
    """
    mask_f = mask.to(values.dtype)
    count = mask_f.sum() if dim is None else mask_f.sum(dim=dim)
    return masked_sum(values, mask_f, dim) / count.clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of the masked elements.

    Equation, with ``n = sum(mask)`` and ``mu = masked_mean(values, mask)``::

        var = sum(mask * (values - mu)^2) / n            (biased)
        var = sum(mask * (values - mu)^2) / (n - 1)      (unbiased, when n > 1)

    With ``unbiased`` and ``n <= 1`` the biased value (0) is returned instead of NaN.

    Args:
        values: ``(b, t)`` (any shape).
        mask: same shape as ``values``.
        unbiased: apply Bessel's correction.
    """
    mask_f = mask.to(values.dtype)
    mean = masked_mean(values, mask_f)
    var = masked_mean((values - mean) ** 2, mask_f)
    if unbiased:
        count = mask_f.sum()
        var = var * count.clamp(min=1.0) / (count - 1.0).clamp(min=1.0)
    return var


def masked_whiten(values: Tensor, mask: Tensor, keep_mean: bool = False, eps: float = 1e-8) -> Tensor:
    """Normalise the masked elements to mean 0 and (unbiased) variance ~1.

    Equation, with ``mu`` / ``var`` the masked mean / unbiased variance::

        whitened = (values - mu) / sqrt(var + eps)         (+ mu if keep_mean)

    Masked-out positions are returned as 0.

    Args:
        values: ``(b, t)`` (any shape).
        mask: same shape as ``values``.
        keep_mean: add ``mu`` back (rescale only; used for rewards).
        eps: added to the variance for numerical safety.

    Returns:
        Tensor shaped like ``values``.
    """
    mask_f = mask.to(values.dtype)
    mean = masked_mean(values, mask_f)
    var = masked_var(values, mask_f, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if keep_mean:
        whitened = whitened + mean
    return whitened * mask_f


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the variance of ``returns`` the value predictions explain.

    Equation (both variances over masked elements; Bessel's factor cancels)::

        ev = 1 - var(returns - values) / var(returns)

    1 is perfect, 0 is no better than predicting the mean, negative is worse.

    Args:
        values: ``(b, t)`` value predictions.
        returns: ``(b, t)`` regression targets.
        mask: ``(b, t)``.

    Returns:
        Scalar float tensor (NaN/inf if ``var(returns)`` is 0).
    """
    residual_var = masked_var(returns - values, mask, unbiased=False)
    returns_var = masked_var(returns, mask, unbiased=False)
    return 1.0 - residual_var / returns_var


class RunningMoments:
    """Running mean / variance / count of scalars seen across batches.

    Batches are merged with Chan et al.'s parallel formula. With the running state
    ``(mean_a, var_a, n_a)`` and a batch ``(mean_b, var_b, n_b)``, ``n = n_a + n_b``,
    ``delta = mean_b - mean_a``::

        mean = mean_a + delta * n_b / n
        var  = (var_a * n_a + var_b * n_b + delta^2 * n_a * n_b / n) / n

    All variances here are population (biased, divide-by-n) variances, and ``std``
    is the population standard deviation. Everything is kept as Python floats
    (float64) so the state is exact enough to checkpoint and reload.
    """

    def __init__(self) -> None:
        self._mean = 0.0
        self._var = 0.0
        self._count = 0

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def var(self) -> float:
        return self._var

    @property
    def std(self) -> float:
        return math.sqrt(self._var)

    @property
    def count(self) -> int:
        return self._count

    def update(self, values: Tensor) -> tuple[float, float]:
        """Merge a batch of scalars.

        Args:
            values: ``(n,)`` (any shape is flattened); must be non-empty.

        Returns:
            The batch's own mean and population std.
        """
        flat = values.detach().reshape(-1).to(torch.float64)
        if flat.numel() == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        batch_mean = flat.mean().item()
        batch_var = ((flat - batch_mean) ** 2).mean().item()
        self.update_from_moments(batch_mean, batch_var, flat.numel())
        return batch_mean, math.sqrt(batch_var)

    def update_from_moments(self, batch_mean: float, batch_var: float, batch_count: int) -> None:
        """Merge a batch given only its mean, population variance and count.

        For callers that all-reduced the moments across processes first.
        A ``batch_count`` of 0 is a no-op.
        """
        batch_count = int(batch_count)
        if batch_count < 0:
            raise ValueError(f"batch_count must be >= 0, got {batch_count}")
        if batch_count == 0:
            return
        total = self._count + batch_count
        delta = float(batch_mean) - self._mean
        sum_sq_dev = (
            self._var * self._count
            + float(batch_var) * batch_count
            + delta * delta * self._count * batch_count / total
        )
        self._mean = self._mean + delta * batch_count / total
        self._var = sum_sq_dev / total
        self._count = total

    def state_dict(self) -> dict:
        """Plain Python ``{"mean": float, "var": float, "count": int}``."""
        return {"mean": float(self._mean), "var": float(self._var), "count": int(self._count)}

    def load_state_dict(self, state: dict) -> None:
        self._mean = float(state["mean"])
        self._var = float(state["var"])
        self._count = int(state["count"])
