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
