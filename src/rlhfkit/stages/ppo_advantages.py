"""Step 4-5 of a PPO step for every `advantage_estimator`: per-token KL, shaped rewards, advantages.

`gae` is PPO's estimator (the value head is the critic, `ppo_steps.compute_advantages`); the
others are critic-free (`rl.estimators`). The group estimators read the ``num_generations``
responses of a prompt on consecutive rows. With ``kl_in_reward`` the KL penalty
``kl_coef x KL_t`` enters the per-token rewards (gae, reinforce_plus_plus,
reinforce_plus_plus_baseline) or, for the estimators that compare whole responses (grpo, dr_grpo,
rloo), each response's score as ``score - kl_coef x sum_t KL_t``.
"""

from __future__ import annotations

import torch

from rlhfkit.config import PPOArguments
from rlhfkit.rl import kl_penalty, masked_whiten, shape_rewards
from rlhfkit.rl.estimators import (
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    rloo_advantages,
)
from rlhfkit.stages.ppo_steps import Evaluation, compute_advantages
from rlhfkit.training.distributed import global_masked_whiten


def estimate_advantages(p: PPOArguments, scores: torch.Tensor, evaluated: Evaluation, response_mask: torch.Tensor,
                        kl_coef: float, accelerator=None):
    """Shaped rewards, advantages, returns (None without a critic) and the per-token KL, each ``(b, R)``.

    `scores` ``(b,)``; `response_mask` ``(b, R)`` float. With `accelerator`, whitening spans every
    process's tokens.
    """
    beta = kl_coef if p.kl_in_reward else 0.0
    if p.advantage_estimator == "gae":
        return compute_advantages(scores, evaluated.logprobs, evaluated.ref_logprobs, evaluated.values,
                                  response_mask, beta, p.kl_estimator, p.gamma, p.lam, p.ppo_whiten_rewards,
                                  p.whiten_advantages, accelerator)

    def whiten(x, mask):
        return masked_whiten(x, mask) if accelerator is None else global_masked_whiten(accelerator, x, mask)

    kl = kl_penalty(evaluated.logprobs, evaluated.ref_logprobs, p.kl_estimator) * response_mask
    rewards = shape_rewards(scores, kl, response_mask, beta)
    group = p.num_generations
    response_scores = scores - beta * kl.sum(-1)  # (b,)
    estimator = p.advantage_estimator
    if estimator == "grpo":
        advantages = grpo_advantages(response_scores, response_mask, group, scale=p.scale_rewards)
    elif estimator == "dr_grpo":
        advantages = dr_grpo_advantages(response_scores, response_mask, group)
    elif estimator == "rloo":
        advantages = rloo_advantages(response_scores, response_mask, group)
    elif estimator == "reinforce_plus_plus":
        advantages = reinforce_plus_plus_advantages(rewards, response_mask, p.gamma, whiten=whiten)
    elif estimator == "reinforce_plus_plus_baseline":
        advantages = reinforce_plus_plus_baseline_advantages(scores, response_mask, group, beta * kl, whiten=whiten)
    else:
        raise ValueError(f"unknown advantage_estimator {estimator!r}")
    return rewards, advantages.to(scores.dtype), None, kl


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(b / G,)`` bool: the groups whose scores are not all equal (`filter_groups` keeps these)."""
    grouped = scores.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(-1)

