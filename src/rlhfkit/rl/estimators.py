"""Critic-free advantage estimators: GRPO, Dr. GRPO, RLOO, REINFORCE++ and REINFORCE++-baseline.

Shapes: ``n`` = rollout rows, ``t`` = response length. The group estimators take
``n = B * G`` rows where the ``G`` responses to one prompt are CONSECUTIVE rows:
group ``g`` is rows ``g*G .. g*G + G - 1``. Every estimator returns per-token
advantages ``(n, t)`` that are 0 on padding; a sequence-level advantage is
broadcast to every response token of its row.

Group means are taken after shifting each group by its first element
(``mean(r) = r_0 + mean(r - r_0)``), the same number in exact arithmetic, so a group
of equal scores gets advantages of exactly 0 (no rounding residue, no NaN).

Batch statistics (GRPO's ``scale="batch"`` std, the REINFORCE++ whitening) are taken over
the rows passed in. TRL gathers the scores of all processes before its batch std; in a
multi-process loop pass the gathered rows (then slice), or accept per-process statistics.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhfkit.rl.advantages import compute_gae
from rlhfkit.rl.shaping import shape_rewards
from rlhfkit.rl.stats import masked_whiten

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
"""Every advantage estimator the loop can be asked for (``gae`` is ``rl.advantages.compute_gae``)."""

GROUP_ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")
"""The estimators that compare the G responses of a prompt: they need G >= 2 consecutive rows per prompt."""

GRPO_SCALES = ("group", "batch", "none")

Whiten = Callable[[Tensor, Tensor], Tensor]  # (x (n, t), mask (n, t)) -> whitened x


def check_group_layout(num_rows: int, group_size: int) -> None:
    """Raise ValueError unless ``num_rows`` rows split into whole groups of ``group_size >= 2``.

    Args:
        num_rows: ``n``, the number of rollout rows (responses).
        group_size: ``G``, responses per prompt.
    """
    if int(group_size) != group_size or group_size < 2:
        raise ValueError(
            f"group_size (responses per prompt) must be an integer >= 2 for a group baseline, got {group_size}; "
            "sample at least 2 responses per prompt or use gae / reinforce_plus_plus"
        )
    if num_rows % group_size != 0:
        raise ValueError(
            f"{num_rows} rows do not split into groups of group_size={group_size}; the rollout batch must hold "
            f"whole groups (a multiple of {group_size} rows, the G responses of a prompt on consecutive rows)"
        )


def _grouped(scores: Tensor, response_mask: Tensor, group_size: int) -> Tensor:
    """Validate shapes and return the scores as ``(B, G)`` in a floating dtype."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (n,), got shape {tuple(scores.shape)}")
    if response_mask.dim() != 2 or response_mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"response_mask must be (n, t) with n = len(scores) = {scores.shape[0]}, got {tuple(response_mask.shape)}"
        )
    check_group_layout(scores.shape[0], group_size)
    if not scores.is_floating_point():
        scores = scores.to(torch.get_default_dtype())
    return scores.reshape(-1, group_size)


def _group_centered(grouped: Tensor) -> Tensor:
    """``r - mean_group(r)`` for ``(B, G)`` scores, shifted by ``r_0`` first (exact 0 for equal groups)."""
    shifted = grouped - grouped[:, :1]  # (B, G)
    return shifted - shifted.mean(dim=1, keepdim=True)


def _broadcast(sequence_advantages: Tensor, response_mask: Tensor) -> Tensor:
    """``(n,)`` -> ``(n, t)``: the row's value on each response token, 0 on padding."""
    mask_f = response_mask.to(sequence_advantages.dtype)
    return sequence_advantages.unsqueeze(1) * mask_f


def grpo_advantages(
    scores: Tensor, response_mask: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2, outcome supervision).

    For row ``i`` of group ``g`` (G responses to one prompt)::

        A_i = (r_i - mean_g(r)) / (std + eps)          broadcast to every response token of row i

        scale="group": std = std_g(r), the UNBIASED (Bessel, divide by G - 1) std of the group's G scores
        scale="batch": std = std(r), the unbiased std of all n scores of the batch (mean still per group)
        scale="none":  no division, A_i = r_i - mean_g(r)  (Dr. GRPO, see ``dr_grpo_advantages``)

    Conventions match TRL's ``GRPOTrainer`` (``scale_rewards`` "group" / "batch" / "none"):
    ``rewards.view(-1, G).std(dim=1)`` is torch's default, unbiased, std, and eps = 1e-4 is
    added to the std, not the variance. The paper writes ``std(r)`` without saying which.
    Note the unbiased std of a group of 2 is ``|r_1 - r_2| / sqrt(2)``, so G = 2 gives
    ``A = +-1/sqrt(2)`` (up to eps) whenever the two scores differ. A group of equal
    scores gets A = 0 exactly in every mode, even with eps = 0.

    Args:
        scores: ``(n,)`` one score per response, n = B * G, groups on consecutive rows.
        response_mask: ``(n, t)`` bool or 0/1 float.
        group_size: G, responses per prompt (>= 2, divides n).
        scale: one of ``GRPO_SCALES``.
        eps: added to the std (>= 0).

    Returns:
        ``(n, t)`` advantages in the scores' (floating) dtype, 0 on padding.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"unknown GRPO scale {scale!r}; allowed: {', '.join(GRPO_SCALES)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    grouped = _grouped(scores, response_mask, group_size)  # (B, G)
    centered = _group_centered(grouped)  # (B, G)
    if scale == "none":
        return _broadcast(centered.reshape(-1), response_mask)
    # std is shift-invariant; shifting first makes it exactly 0 for equal scores.
    if scale == "group":
        std = (grouped - grouped[:, :1]).std(dim=1, keepdim=True)  # (B, 1), unbiased
    else:
        flat = grouped.reshape(-1)  # (n,) the raw scores: batch std is not per-group shifted
        std = (flat - flat[0]).std()  # scalar, unbiased over all n scores
    # std + eps is 0 only when every score it covers is equal, and then centered is exactly 0:
    # the clamp turns that 0/0 into 0/tiny = 0.
    advantages = centered / (std + eps).clamp(min=torch.finfo(centered.dtype).tiny)  # (B, G)
    return _broadcast(advantages.reshape(-1), response_mask)


def dr_grpo_advantages(scores: Tensor, response_mask: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO advantages (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective")::

        A_i = r_i - mean_g(r)          broadcast to every response token of row i

    GRPO without the std division, which the paper shows up-weights prompts that are too
    easy or too hard. Its other fix, a constant length normaliser in place of each
    response's length, belongs to the loss: ``aggregate_loss(..., "seq_mean_token_sum_norm")``.
    Same as ``grpo_advantages(scale="none")`` and OpenRLHF's ``dr_grpo`` estimator.

    Args:
        scores: ``(n,)`` one score per response, n = B * G, groups on consecutive rows.
        response_mask: ``(n, t)`` bool or 0/1 float.
        group_size: G, responses per prompt (>= 2, divides n).

    Returns:
        ``(n, t)`` advantages, 0 on padding.
    """
    return grpo_advantages(scores, response_mask, group_size, scale="none")


def rloo_advantages(scores: Tensor, response_mask: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs", eq. 7)::

        A_i = r_i - 1/(G-1) * sum_{j in g, j != i} r_j   (= G/(G-1) * (r_i - mean_g(r)))

    broadcast to every response token of row i. For G = 2: ``A_1 = r_1 - r_2``. Matches
    OpenRLHF's ``rloo`` (``baseline = (sum - r) / (G - 1)``) on our consecutive-rows layout.
    The paper's ``r`` is the sequence reward with the KL penalty folded in
    (``score - beta * sum_t KL_t``); pass that as ``scores`` to reproduce it. No
    normalisation is applied here.

    Args:
        scores: ``(n,)`` one score per response, n = B * G, groups on consecutive rows.
        response_mask: ``(n, t)`` bool or 0/1 float.
        group_size: G, responses per prompt (>= 2, divides n).

    Returns:
        ``(n, t)`` advantages, 0 on padding.
    """
    grouped = _grouped(scores, response_mask, group_size)  # (B, G)
    shifted = grouped - grouped[:, :1]  # (B, G); the baseline is shift-invariant
    leave_one_out_mean = (shifted.sum(dim=1, keepdim=True) - shifted) / (group_size - 1)  # (B, G)
    return _broadcast((shifted - leave_one_out_mean).reshape(-1), response_mask)


def discounted_returns(token_rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go of each response token::

        G_j = sum_{k >= j} gamma^(k - j) * r_k        (over the row's response tokens)

    This is GAE with all values 0 and lambda = 1, so it is computed by ``compute_gae``.

    Args:
        token_rewards: ``(n, t)`` per-token rewards.
        response_mask: ``(n, t)`` bool or 0/1 float; rewards on padding are ignored.
        gamma: discount factor.

    Returns:
        ``(n, t)`` returns, 0 on padding.
    """
    if not token_rewards.is_floating_point():
        token_rewards = token_rewards.to(torch.get_default_dtype())
    returns, _ = compute_gae(token_rewards, torch.zeros_like(token_rewards), response_mask, gamma=gamma, lam=1.0)
    return returns


def reinforce_plus_plus_advantages(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0,
                                   whiten: Whiten = masked_whiten) -> Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++", arXiv:2501.03262, sec. 3)::

        G_j = sum_{k >= j} gamma^(k - j) * r_k
        A   = (G - mean(G)) / sqrt(var(G) + 1e-8)     mean / unbiased var over ALL response tokens of the batch

    ``token_rewards`` are the PPO-style shaped rewards, ``-beta * KL_t`` on every response
    token plus the score on the last one (``rl.shaping.shape_rewards``). No critic and no
    group: the baseline is the batch-wide whitening (``masked_whiten``), as in OpenRLHF's
    ``reinforce`` estimator. OpenRLHF divides by the biased token variance and clamps it at
    1e-8; ``masked_whiten`` uses the unbiased one plus 1e-8, a factor sqrt(N/(N-1)) over N
    response tokens.

    Args:
        token_rewards: ``(n, t)`` per-token rewards.
        response_mask: ``(n, t)`` bool or 0/1 float.
        gamma: discount factor.
        whiten: ``whiten(x, mask)``, the batch whitening (a multi-process loop passes one over
            every process's tokens).

    Returns:
        ``(n, t)`` advantages with masked mean 0 and unbiased variance ~1, 0 on padding.
    """
    returns = discounted_returns(token_rewards, response_mask, gamma)
    return whiten(returns, response_mask)


def reinforce_plus_plus_baseline_advantages(
    scores: Tensor, response_mask: Tensor, group_size: int, kl_token_penalty: Tensor | None = None,
    whiten: Whiten = masked_whiten,
) -> Tensor:
    """REINFORCE++-baseline advantages (Hu 2025, arXiv:2501.03262; OpenRLHF ``reinforce_baseline``)::

        s_i    = r_i - mean_g(r)                                 group-mean baseline, no std division
        u_ij   = -kl_token_penalty_ij + s_i * [j == last_i]      per-token reward (no KL term if None)
        G_ij   = sum_{k >= j} u_ik                               return, gamma = 1
        A      = (G - mean(G)) / sqrt(var(G) + 1e-8)             over all response tokens of the batch

    Matches OpenRLHF's ``compute_advantages_and_returns``: it subtracts the group mean from
    the scores, adds ``-kl_coef * kl`` per token (``compute_reward``), takes cumulative
    returns with gamma forced to 1, then whitens over the batch's response tokens
    (OpenRLHF: biased variance clamped at 1e-8; here ``masked_whiten``'s unbiased variance
    + 1e-8). Without ``kl_token_penalty`` every token of row i gets ``s_i`` before
    whitening. OpenRLHF recommends putting the KL in the loss instead (``kl_loss``) for this
    estimator; then leave ``kl_token_penalty`` as None.

    Args:
        scores: ``(n,)`` one score per response, n = B * G, groups on consecutive rows.
        response_mask: ``(n, t)`` bool or 0/1 float.
        group_size: G, responses per prompt (>= 2, divides n).
        kl_token_penalty: optional ``(n, t)`` penalty already scaled, ``beta * KL_t`` (it is
            subtracted), e.g. ``kl_coef * kl_penalty(logprobs, ref_logprobs)``.
        whiten: ``whiten(x, mask)``, the batch whitening (see `reinforce_plus_plus_advantages`).

    Returns:
        ``(n, t)`` advantages with masked mean 0 and unbiased variance ~1, 0 on padding.
    """
    centered = _group_centered(_grouped(scores, response_mask, group_size)).reshape(-1)  # (n,)
    if kl_token_penalty is None:
        kl_token_penalty = torch.zeros(response_mask.shape, dtype=centered.dtype, device=centered.device)
    elif kl_token_penalty.shape != response_mask.shape:
        raise ValueError(f"kl_token_penalty must be shaped like response_mask {tuple(response_mask.shape)}, "
                         f"got {tuple(kl_token_penalty.shape)}")
    token_rewards = shape_rewards(centered, kl_token_penalty.to(centered.dtype), response_mask, kl_coef=1.0)
    returns = discounted_returns(token_rewards, response_mask, gamma=1.0)
    return whiten(returns, response_mask)
