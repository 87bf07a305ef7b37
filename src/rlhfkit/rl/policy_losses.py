"""Loss pieces for critic-free policy optimisation (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++).

Per-token terms are computed first and aggregated with one of ``LOSS_AGGREGATIONS``, so
the policy term and a KL term share one aggregation. Shapes: ``n`` = (micro-)batch rows,
``t`` = response length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.rl.kl import KL_ESTIMATORS, kl_penalty
from rlhfkit.rl.stats import masked_mean, masked_sum

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_LOSS_ESTIMATORS = KL_ESTIMATORS


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    normaliser: float | None = None,
    max_length: int | None = None,
) -> Tensor:
    """Reduce ``(n, t)`` per-token losses to a scalar.

    With ``M`` = mask, ``L_i = sum_j M_ij`` the length of row i, ``N`` the row count::

        token_mean:               sum_ij M_ij l_ij / D        D = normaliser or sum_ij M_ij   (DAPO)
        seq_mean_token_mean:      sum_i (sum_j M_ij l_ij / L_i) / D     D = normaliser or N   (GRPO paper)
        seq_mean_token_sum:       sum_i  sum_j M_ij l_ij        / D     D = normaliser or N
        seq_mean_token_sum_norm:  sum_ij M_ij l_ij / (D * max_length)   D = normaliser or N   (Dr. GRPO)

    Gradient accumulation stays exact when every micro-batch passes the count of the
    whole mini-batch as ``normaliser``: its response-token count for ``token_mean``, its
    sequence count for the three ``seq_*`` modes. Each of those is a sum over tokens or
    over rows divided by a constant, so the micro-batch losses then add up to the
    mini-batch loss (and their gradients to its gradient). Without ``normaliser`` the
    micro-batch's own count is used, and equal-sized micro-batches must be averaged.

    ``seq_mean_token_sum_norm`` divides by a constant ``max_length``; pass the
    generation budget (``max_new_tokens``), as Dr. GRPO and TRL's ``dr_grpo`` loss do
    (``sum / (N * max_completion_length)``). When None the padded width ``t`` is used,
    which changes from batch to batch, so the loop should pass it.

    A row with no response token contributes 0 and, in the ``seq_*`` modes, still counts
    in ``N``. An all-padding batch gives 0, not NaN.

    Args:
        per_token_loss: ``(n, t)``.
        mask: ``(n, t)`` bool or 0/1 float.
        mode: one of ``LOSS_AGGREGATIONS``.
        normaliser: the mini-batch's token count (``token_mean``) or sequence count (``seq_*``).
        max_length: the constant length normaliser of ``seq_mean_token_sum_norm``.

    Returns:
        Scalar tensor.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {', '.join(LOSS_AGGREGATIONS)}")
    if normaliser is not None and not normaliser > 0:
        raise ValueError(f"normaliser must be > 0 (the mini-batch's token or sequence count), got {normaliser}")
    if max_length is not None and mode != "seq_mean_token_sum_norm":
        raise ValueError(f"max_length is only used by seq_mean_token_sum_norm, not by {mode!r}; leave it None")
    if max_length is not None and not max_length > 0:
        raise ValueError(f"max_length must be > 0 (the generation budget in tokens), got {max_length}")
    mask_f = mask.to(per_token_loss.dtype)
    if mode == "token_mean":
        if normaliser is None:
            return masked_mean(per_token_loss, mask_f)
        return masked_sum(per_token_loss, mask_f) / normaliser
    num_sequences = float(per_token_loss.shape[0]) if normaliser is None else float(normaliser)
    if mode == "seq_mean_token_mean":
        per_sequence = masked_mean(per_token_loss, mask_f, dim=1)  # (n,)
        return per_sequence.sum() / max(num_sequences, 1.0)
    if mode == "seq_mean_token_sum":
        return masked_sum(per_token_loss, mask_f) / max(num_sequences, 1.0)
    length = float(per_token_loss.shape[1]) if max_length is None else float(max_length)
    return masked_sum(per_token_loss, mask_f) / max(num_sequences * length, 1.0)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(policy || ref) estimate to add to the loss, as GRPO does (DeepSeekMath eq. 4).

    With ``d = ref_logprobs - logprobs`` (``log(ref / policy)``) on tokens sampled from the policy::

        k1 = -d                       (unbiased value; its gradient -grad(d) = grad(logprobs) is 1 per token)
        k2 = 0.5 * d^2                (biased value; gradient -d * grad(d) = (logprobs - ref) * grad(logprobs))
        k3 = exp(d) - d - 1           (unbiased, >= 0; GRPO's estimator; gradient (1 - exp(d)) * grad(logprobs))

    All three come from ``rl.kl.kl_penalty`` (Schulman 2020, "Approximating KL Divergence").
    The gradient flows through ``logprobs`` only; ``ref_logprobs`` should
    be detached. Positions where ``mask`` is 0 are 0 (and their log-probs are never
    exponentiated, so padding garbage cannot overflow). Aggregate the result with
    ``aggregate_loss`` in the same mode as the policy term and scale it by beta.

    Args:
        logprobs: ``(n, t)`` current policy log-probs of the sampled tokens (grad).
        ref_logprobs: ``(n, t)`` reference-model log-probs of the same tokens.
        mask: ``(n, t)`` bool or 0/1 float.
        estimator: one of ``KL_LOSS_ESTIMATORS``.

    Returns:
        ``(n, t)`` per-token KL estimates, 0 on padding.
    """
    if estimator not in KL_LOSS_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {', '.join(KL_LOSS_ESTIMATORS)}")
    keep = mask.bool()
    logprobs = torch.where(keep, logprobs, torch.zeros_like(logprobs))
    ref_logprobs = torch.where(keep, ref_logprobs.to(logprobs.dtype), torch.zeros_like(logprobs))
    per_token = kl_penalty(logprobs, ref_logprobs, estimator)
    return per_token * keep.to(per_token.dtype)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    cliprange_low: float = 0.2,
    cliprange_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate with decoupled ranges (DAPO's clip-higher, Yu et al. 2025)::

        ratio = exp(logprobs - old_logprobs)
        loss  = max(-A * ratio, -A * clip(ratio, 1 - cliprange_low, 1 + cliprange_high))

    ``cliprange_low == cliprange_high`` is the PPO policy term of ``rl.losses.PPOLoss``
    (Schulman et al. 2017); DAPO uses low 0.2, high 0.28. Aggregate the per-token loss
    with ``aggregate_loss``.

    Args:
        logprobs: ``(n, t)`` current policy log-probs of the sampled tokens (grad).
        old_logprobs: ``(n, t)`` log-probs at rollout time.
        advantages: ``(n, t)`` per-token advantages (e.g. from ``rl.estimators``).
        response_mask: ``(n, t)`` bool or 0/1 float.
        cliprange_low: epsilon below 1.
        cliprange_high: epsilon above 1; None means ``cliprange_low`` (symmetric PPO).

    Returns:
        ``per_token_loss`` ``(n, t)`` (0 on padding) and ``clipfrac``, a detached scalar: the
        masked fraction of tokens where the clipped branch is the active (larger) one.
    """
    if cliprange_high is None:
        cliprange_high = cliprange_low
    if not (0 <= cliprange_low < 1 and cliprange_high >= 0):
        raise ValueError(f"need 0 <= cliprange_low < 1 and cliprange_high >= 0, got low={cliprange_low}, "
                         f"high={cliprange_high}")
    mask_f = response_mask.to(logprobs.dtype)
    # Zero the log-ratio off the response so padding can never overflow exp().
    log_ratio = torch.where(response_mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
    per_token_loss = torch.maximum(unclipped, clipped) * mask_f
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(mask_f.dtype), mask_f)
    return per_token_loss, clipfrac.detach()
