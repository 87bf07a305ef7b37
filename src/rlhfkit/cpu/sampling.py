"""Sampling one token per row by inverting the CDF (one uniform number per row).

The same distribution as ``torch.multinomial``, whose CPU kernel draws an exponential variate
per vocabulary entry and so costs a large share of a CPU rollout's time. GPUs keep torch's own
kernel (`rollout.sampler.multinomial_draw`).
"""

from __future__ import annotations

import torch


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` ``(b, v)`` (rows need not be normalised) -> ``(b,)`` long.

    Inverse CDF: the first index whose cumulative sum exceeds ``u x total`` for a uniform ``u``;
    an index of probability 0 adds nothing to the sum, so it is never chosen.
    """
    cdf = probs.float().cumsum(-1)  # (b, v)
    threshold = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * cdf[:, -1:]
    index = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)  # (b,)
    return index.clamp_(max=probs.shape[-1] - 1)
