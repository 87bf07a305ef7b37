"""The clipped PPO objective (Schulman et al. 2017) for the policy and, with a critic, the value head.

Shapes: ``b`` = (micro-)batch, ``t`` = response length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.rl.policy_losses import aggregate_loss, clipped_policy_loss, kl_loss
from rlhfkit.rl.stats import masked_mean


class PPOLoss(torch.nn.Module):
    """Clipped policy loss [+ clipped value loss] [+ KL-to-reference loss] - entropy bonus.

    Per response token, with ``ratio = exp(logprobs - old_logprobs)``::

        policy_loss = max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange_high))
        V_clipped   = clip(V, V_old - cliprange_value, V_old + cliprange_value)
        value_loss  = 0.5 * max((V - R)^2, (V_clipped - R)^2)
        kl_loss     = k(logprobs, ref_logprobs)          (``kl_estimator``: k1, k2 or k3)

        loss = agg(policy_loss) + vf_coef * mean(value_loss) + kl_loss_coef * agg(kl_loss)
               - entropy_coef * agg(entropy)

    ``agg`` is `aggregate_loss` in mode ``aggregation``; ``mean`` the token mean. Each divides by
    the micro-batch's own count when no normaliser is given, else by the mini-batch's (tokens for
    token means, ``sequence_normaliser`` rows for the sequence modes), so that summed micro-batch
    losses give exactly the gradient of one large batch. Without ``values`` (a critic-free
    estimator) the value term and its statistics are absent.
    """

    def __init__(
        self,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        cliprange_high: float | None = None,
        kl_loss_coef: float = 0.0,
        kl_estimator: str = "k3",
        aggregation: str = "token_mean",
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.cliprange = cliprange
        self.cliprange_high = cliprange if cliprange_high is None else cliprange_high
        self.cliprange_value = cliprange_value
        self.vf_coef = vf_coef
        self.entropy_coef = entropy_coef
        self.kl_loss_coef = kl_loss_coef
        self.kl_estimator = kl_estimator
        self.aggregation = aggregation
        self.max_length = max_length if aggregation == "seq_mean_token_sum_norm" else None

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        values: Tensor | None,
        old_values: Tensor | None,
        returns: Tensor | None,
        response_mask: Tensor,
        entropy: Tensor | None = None,
        normaliser: float | None = None,
        ref_logprobs: Tensor | None = None,
        sequence_normaliser: float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss and detached statistics.

        Args:
            logprobs: ``(b, t)`` current policy log-probs of the sampled tokens (grad).
            old_logprobs: ``(b, t)`` log-probs at rollout time.
            advantages: ``(b, t)`` advantages.
            values: ``(b, t)`` current value predictions (grad), or None without a critic.
            old_values: ``(b, t)`` value predictions at rollout time (None without a critic).
            returns: ``(b, t)`` value targets (None without a critic).
            response_mask: ``(b, t)`` bool or 0/1 float.
            entropy: ``(b, t)`` optional per-token policy entropy.
            normaliser: the mini-batch's response-token count (token means).
            ref_logprobs: ``(b, t)`` reference log-probs, needed when ``kl_loss_coef > 0``.
            sequence_normaliser: the mini-batch's row count (the sequence aggregations).

        Returns:
            Scalar ``loss`` and a dict of detached scalar tensors (masked means over this
            micro-batch): ``policy_loss``, ``policy_clipfrac``, ``approx_kl``, ``ratio_mean``, and
            ``value_loss``, ``value_clipfrac`` with a critic, ``kl_loss`` with a KL term,
            ``entropy`` if given.
        """
        mask_f = response_mask.to(logprobs.dtype)

        def token_mean(per_token: Tensor) -> Tensor:
            return aggregate_loss(per_token, mask_f, "token_mean", normaliser)

        def aggregate(per_token: Tensor) -> Tensor:
            if self.aggregation == "token_mean":
                return token_mean(per_token)
            return aggregate_loss(per_token, mask_f, self.aggregation, sequence_normaliser, self.max_length)

        policy_per_token, policy_clipfrac = clipped_policy_loss(logprobs, old_logprobs, advantages, response_mask,
                                                                self.cliprange, self.cliprange_high)
        loss = aggregate(policy_per_token)
        stats = {"policy_loss": masked_mean(policy_per_token, mask_f).detach(), "policy_clipfrac": policy_clipfrac}
        if values is not None:
            values_clipped = old_values + torch.clamp(values - old_values, -self.cliprange_value,
                                                      self.cliprange_value)
            value_err_unclipped = (values - returns) ** 2
            value_err_clipped = (values_clipped - returns) ** 2
            value_per_token = 0.5 * torch.maximum(value_err_unclipped, value_err_clipped)
            loss = loss + self.vf_coef * token_mean(value_per_token)
            with torch.no_grad():
                stats["value_loss"] = masked_mean(value_per_token, mask_f).detach()
                stats["value_clipfrac"] = masked_mean(
                    (value_err_clipped > value_err_unclipped).to(mask_f.dtype), mask_f).detach()
        if self.kl_loss_coef > 0:
            if ref_logprobs is None:
                raise ValueError("kl_loss_coef > 0 needs ref_logprobs")
            kl_per_token = kl_loss(logprobs, ref_logprobs, response_mask, self.kl_estimator)
            loss = loss + self.kl_loss_coef * aggregate(kl_per_token)
            stats["kl_loss"] = masked_mean(kl_per_token, mask_f).detach()
        if entropy is not None:
            loss = loss - self.entropy_coef * aggregate(entropy)
        with torch.no_grad():
            log_ratio = (logprobs - old_logprobs) * mask_f
            stats["approx_kl"] = (0.5 * masked_mean(log_ratio**2, mask_f)).detach()
            stats["ratio_mean"] = masked_mean(torch.exp(log_ratio), mask_f).detach()
            if entropy is not None:
                stats["entropy"] = masked_mean(entropy, mask_f).detach()
        return loss, stats
