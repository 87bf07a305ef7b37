"""Per-token log-probabilities and entropies from language-model logits.

Shapes: ``b`` = batch, ``t`` = sequence (response) length, ``v`` = vocabulary.

Both functions compute in float32 whatever the logits dtype (bf16/fp16 logits
are upcast), and work one batch row at a time so that the only full-size
temporary is one row's ``(t, v)`` float32 copy; no full ``(b, t, v)``
log-softmax tensor is ever built.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _scaled_float32(logits_row: Tensor, temperature: float) -> Tensor:
    """Return ``logits_row / temperature`` as float32; shape unchanged ``(t, v)``."""
    scaled = logits_row.to(torch.float32)
    if temperature != 1.0:
        scaled = scaled / temperature
    return scaled


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Equation, with ``z = logits / temperature``::

        logprobs[i, j] = z[i, j, labels[i, j]] - logsumexp_k z[i, j, k]

    Args:
        logits: ``(b, t, v)`` any floating dtype.
        labels: ``(b, t)`` long, token ids in ``[0, v)``.
        temperature: sampling temperature (> 0) the tokens were drawn with.

    Returns:
        ``(b, t)`` float32 log-probabilities.
    """
    _check_temperature(temperature)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (b, t, v) and labels (b, t), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    rows = []
    for logits_row, labels_row in zip(logits, labels):
        scaled = _scaled_float32(logits_row, temperature)  # (t, v)
        label_logit = scaled.gather(-1, labels_row.long().unsqueeze(-1)).squeeze(-1)  # (t,)
        rows.append(label_logit - torch.logsumexp(scaled, dim=-1))
    if not rows:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.stack(rows, dim=0)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``p = softmax(logits / temperature)`` at every position.

    Equation, with ``z = logits / temperature``::

        H = -sum_k p_k log p_k = logsumexp_k z_k - sum_k p_k z_k

    Args:
        logits: ``(b, t, v)`` any floating dtype.
        temperature: softmax temperature (> 0).

    Returns:
        ``(b, t)`` float32 entropies (nats).
    """
    _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"expected logits (b, t, v), got {tuple(logits.shape)}")
    rows = []
    for logits_row in logits:
        scaled = _scaled_float32(logits_row, temperature)  # (t, v)
        probs = torch.softmax(scaled, dim=-1)  # (t, v)
        # -inf logits (banned tokens) have p = 0; 0 * -inf would be NaN, so zero them.
        finite_scaled = scaled.masked_fill(scaled == float("-inf"), 0.0)
        rows.append(torch.logsumexp(scaled, dim=-1) - (probs * finite_scaled).sum(dim=-1))
    if not rows:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    return torch.stack(rows, dim=0)
