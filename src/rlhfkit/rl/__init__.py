"""Pure RL math for RLHF: log-probs, masked statistics, KL, reward shaping, GAE, PPO loss.

Depends only on torch; no models, no IO.
"""

from __future__ import annotations

from rlhfkit.rl.advantages import compute_gae
from rlhfkit.rl.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty
from rlhfkit.rl.logprobs import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits
from rlhfkit.rl.losses import PPOLoss
from rlhfkit.rl.shaping import (
    apply_missing_eos_penalty,
    last_token_index,
    shape_rewards,
    truncate_after_stop,
)
from rlhfkit.rl.stats import (
    RunningMoments,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "PPOLoss",
    "RunningMoments",
    "apply_missing_eos_penalty",
    "compute_gae",
    "entropy_from_logits",
    "explained_variance",
    "kl_penalty",
    "last_token_index",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "shape_rewards",
    "truncate_after_stop",
]

from rlhfkit.rl.estimators import (  # noqa: E402  (critic-free estimators, appended)
    ADVANTAGE_ESTIMATORS,
    GROUP_ADVANTAGE_ESTIMATORS,
    GRPO_SCALES,
    check_group_layout,
    discounted_returns,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    rloo_advantages,
)
from rlhfkit.rl.policy_losses import (  # noqa: E402
    KL_LOSS_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_policy_loss,
    kl_loss,
)

__all__ += [
    "ADVANTAGE_ESTIMATORS",
    "GROUP_ADVANTAGE_ESTIMATORS",
    "GRPO_SCALES",
    "KL_LOSS_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "check_group_layout",
    "clipped_policy_loss",
    "discounted_returns",
    "dr_grpo_advantages",
    "grpo_advantages",
    "kl_loss",
    "reinforce_plus_plus_advantages",
    "reinforce_plus_plus_baseline_advantages",
    "rloo_advantages",
]
