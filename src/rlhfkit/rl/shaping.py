"""Turning generated responses and reward-model scores into per-token rewards.

Shapes: ``b`` = batch, ``t`` = response length.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def truncate_after_stop(
    response_ids: Tensor, stop_token_ids: Sequence[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each response after its first stop token.

    Tokens up to and including the first stop token are kept; everything after
    it becomes ``pad_token_id``. Only stop tokens truncate: other ids (pad
    included) are taken as generated. A row with no stop token keeps all ``t``
    tokens.

    Args:
        response_ids: ``(b, t)`` long, generated tokens (may hold pad after EOS).
        stop_token_ids: ids that end a response (e.g. EOS, end-of-turn).
        pad_token_id: id written over the truncated tail.

    Returns:
        ``response_ids`` ``(b, t)`` (new tensor), ``response_mask`` ``(b, t)`` bool
        True for kept tokens, ``ended_with_stop`` ``(b,)`` bool.
    """
    stop_ids = torch.as_tensor(list(stop_token_ids), dtype=response_ids.dtype, device=response_ids.device)
    is_stop = torch.isin(response_ids, stop_ids)  # (b, t)
    # Number of stop tokens strictly before each position; keep while it is 0.
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    response_mask = stops_before == 0
    ended_with_stop = is_stop.any(dim=1)
    truncated = response_ids.masked_fill(~response_mask, pad_token_id)
    return truncated, response_mask, ended_with_stop


def last_token_index(response_mask: Tensor) -> Tensor:
    """Index of the last kept token of each row.

    Args:
        response_mask: ``(b, t)`` bool or 0/1 float.

    Returns:
        ``(b,)`` long; 0 for a row with no kept token.
    """
    num_rows, num_positions = response_mask.shape
    if num_positions == 0:
        return torch.zeros(num_rows, dtype=torch.long, device=response_mask.device)
    positions = torch.arange(num_positions, device=response_mask.device)  # (t,)
    kept_positions = torch.where(response_mask.bool(), positions, torch.zeros_like(positions))  # (b, t)
    return kept_positions.max(dim=1).values


def apply_missing_eos_penalty(scores: Tensor, ended_with_stop: Tensor, penalty: float | None) -> Tensor:
    """Subtract ``penalty`` from the scores of responses that never stopped.

    Equation: ``scores - penalty * (1 - ended_with_stop)``.

    Args:
        scores: ``(b,)`` reward-model scores.
        ended_with_stop: ``(b,)`` bool.
        penalty: amount to subtract, or None for an unchanged copy.

    Returns:
        ``(b,)`` new tensor.
    """
    if penalty is None:
        return scores.clone()
    did_not_stop = (~ended_with_stop.bool()).to(scores.dtype)
    return scores - penalty * did_not_stop


def shape_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: a KL penalty on every response token plus the score at the end.

    Equation, with ``L_i = last_token_index(response_mask)[i]``::

        rewards[i, j] = -kl_coef * kl[i, j] * mask[i, j] + scores[i] * [j == L_i]

    A row with no response token gets no score (its rewards are all 0).

    Args:
        scores: ``(b,)`` sequence-level scores.
        kl: ``(b, t)`` per-token KL estimates.
        response_mask: ``(b, t)`` bool or 0/1 float.
        kl_coef: the KL coefficient beta.

    Returns:
        ``(b, t)`` rewards in ``kl``'s dtype.
    """
    mask_f = response_mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask_f
    row_has_tokens = mask_f.sum(dim=1) > 0  # (b,)
    placed_scores = scores.to(kl.dtype) * row_has_tokens.to(kl.dtype)  # (b,)
    last_index = last_token_index(response_mask).unsqueeze(1)  # (b, 1)
    return rewards.scatter_add(1, last_index, placed_scores.unsqueeze(1))
