"""Generalised Advantage Estimation (Schulman et al. 2016) over response tokens.

Shapes: ``b`` = batch, ``t`` = response length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE advantages and value-regression targets.

    Response tokens are a left-aligned prefix of each row. Rewards and values at
    masked-out positions are treated as 0, so the value after a row's last real
    token is 0 (the episode ends there)::

        delta_j = r_j + gamma * V_{j+1} - V_j
        A_j     = delta_j + gamma * lam * A_{j+1}        (A_t = 0 past the end)
        R_j     = A_j + V_j

    No whitening is done here (see ``masked_whiten``). Pass detached tensors:
    the results are targets, not something to differentiate through.

    Args:
        rewards: ``(b, t)`` per-token rewards (e.g. from ``shape_rewards``).
        values: ``(b, t)`` value estimates of the states before each token.
        response_mask: ``(b, t)`` bool or 0/1 float.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``advantages`` ``(b, t)`` and ``returns`` ``(b, t)``, both 0 at masked-out positions.
    """
    mask_f = response_mask.to(values.dtype)
    rewards = rewards.to(values.dtype) * mask_f
    values = values * mask_f
    num_positions = values.shape[1]

    next_advantage = values.new_zeros(values.shape[0])  # (b,) A_{j+1}
    next_value = values.new_zeros(values.shape[0])  # (b,) V_{j+1}
    advantages_reversed = []
    for j in reversed(range(num_positions)):
        delta = rewards[:, j] + gamma * next_value - values[:, j]  # (b,)
        next_advantage = (delta + gamma * lam * next_advantage) * mask_f[:, j]
        next_value = values[:, j]
        advantages_reversed.append(next_advantage)
    if advantages_reversed:
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
    else:
        advantages = torch.zeros_like(values)
    returns = (advantages + values) * mask_f
    return advantages, returns
