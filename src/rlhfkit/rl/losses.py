"""The clipped PPO objective (Schulman et al. 2017) for the policy and value heads.

Shapes: ``b`` = (micro-)batch, ``t`` = response length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.rl.stats import masked_mean, masked_sum


class PPOLoss(torch.nn.Module):
    """Clipped policy loss + clipped value loss - entropy bonus.

    Per response token, with ``ratio = exp(logprobs - old_logprobs)``::

        policy_loss = max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange))
        V_clipped   = clip(V, V_old - cliprange_value, V_old + cliprange_value)
        value_loss  = 0.5 * max((V - R)^2, (V_clipped - R)^2)

        loss = agg(policy_loss) + vf_coef * agg(value_loss) - entropy_coef * agg(entropy)

    ``agg`` is the masked mean over the micro-batch's response tokens when
    ``normaliser`` is None, else the masked sum divided by ``normaliser``. Pass the
    response-token count of the whole mini-batch as ``normaliser`` and the summed
    micro-batch losses give exactly the gradient of one large batch.
    """

    def __init__(
        self,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
    ) -> None:
        super().__init__()
        self.cliprange = cliprange
        self.cliprange_value = cliprange_value
        self.vf_coef = vf_coef
        self.entropy_coef = entropy_coef

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        response_mask: Tensor,
        entropy: Tensor | None = None,
        normaliser: float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss and detached statistics.

        Args:
            logprobs: ``(b, t)`` current policy log-probs of the sampled tokens (grad).
            old_logprobs: ``(b, t)`` log-probs at rollout time.
            advantages: ``(b, t)`` (usually whitened) advantages.
            values: ``(b, t)`` current value predictions (grad).
            old_values: ``(b, t)`` value predictions at rollout time.
            returns: ``(b, t)`` value targets.
            response_mask: ``(b, t)`` bool or 0/1 float.
            entropy: ``(b, t)`` optional per-token policy entropy.
            normaliser: divide masked sums by this instead of taking masked means.

        Returns:
            Scalar ``loss`` and a dict of detached scalar tensors: ``policy_loss``,
            ``value_loss``, ``entropy`` (if given), ``policy_clipfrac``,
            ``value_clipfrac``, ``approx_kl``, ``ratio_mean`` (masked means over
            this micro-batch).
        """
        mask_f = response_mask.to(logprobs.dtype)

        def aggregate(per_token: Tensor) -> Tensor:
            if normaliser is None:
                return masked_mean(per_token, mask_f)
            return masked_sum(per_token, mask_f) / normaliser

        # Zero the log-ratio off the response so padding can never overflow exp().
        log_ratio = (logprobs - old_logprobs) * mask_f
        ratio = torch.exp(log_ratio)
        policy_unclipped = -advantages * ratio
        policy_clipped = -advantages * torch.clamp(ratio, 1.0 - self.cliprange, 1.0 + self.cliprange)
        policy_per_token = torch.maximum(policy_unclipped, policy_clipped)

        values_clipped = old_values + torch.clamp(
            values - old_values, -self.cliprange_value, self.cliprange_value
        )
        value_err_unclipped = (values - returns) ** 2
        value_err_clipped = (values_clipped - returns) ** 2
        value_per_token = 0.5 * torch.maximum(value_err_unclipped, value_err_clipped)

        policy_loss = aggregate(policy_per_token)
        value_loss = aggregate(value_per_token)
        loss = policy_loss + self.vf_coef * value_loss
        if entropy is not None:
            loss = loss - self.entropy_coef * aggregate(entropy)

        with torch.no_grad():
            stats = {
                "policy_loss": masked_mean(policy_per_token, mask_f).detach(),
                "value_loss": masked_mean(value_per_token, mask_f).detach(),
                "policy_clipfrac": masked_mean(
                    (policy_clipped > policy_unclipped).to(mask_f.dtype), mask_f
                ).detach(),
                "value_clipfrac": masked_mean(
                    (value_err_clipped > value_err_unclipped).to(mask_f.dtype), mask_f
                ).detach(),
                "approx_kl": (0.5 * masked_mean(log_ratio**2, mask_f)).detach(),
                "ratio_mean": masked_mean(ratio, mask_f).detach(),
            }
            if entropy is not None:
                stats["entropy"] = masked_mean(entropy, mask_f).detach()
        return loss, stats
