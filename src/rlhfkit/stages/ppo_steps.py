"""PPO's per-batch steps as functions: forward passes over responses, advantages, the update."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from rlhfkit.models.forward import causal_lm_forward
from rlhfkit.rl import (
    PPOLoss,
    compute_gae,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    shape_rewards,
)


@dataclass
class Rollout:
    """One rollout batch; every tensor has b rows, so the batch can be sliced generically."""

    query_ids: torch.Tensor        # (b, P) left-padded prompts
    query_mask: torch.Tensor       # (b, P)
    response_ids: torch.Tensor     # (b, R) truncated after the stop token, right-padded
    response_mask: torch.Tensor    # (b, R) bool
    scores: torch.Tensor           # (b,) final scores (after penalty, normalisation, clipping)
    logprobs: torch.Tensor         # (b, R) policy log-probs at rollout time ("old")
    ref_logprobs: torch.Tensor     # (b, R)
    values: torch.Tensor           # (b, R) value estimates at rollout time ("old")
    advantages: torch.Tensor       # (b, R)
    returns: torch.Tensor          # (b, R)

    def select(self, rows: torch.Tensor | list[int]) -> "Rollout":
        """The sub-batch of `rows`."""
        return Rollout(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + response tokens and mask, ``(b, P + R)``."""
        ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)
        return ids, mask


def response_forward(model, value_head, ids: torch.Tensor, mask: torch.Tensor, response_ids: torch.Tensor,
                     temperature: float, with_values: bool = True, with_entropy: bool = False):
    """Log-probs (and values, entropy) of the response tokens at the end of ``ids``.

    Vocabulary logits are computed only for the R positions that predict response tokens.
    Returns ``logprobs (b, R)``, ``values (b, R) | None``, ``entropy (b, R) | None``.
    """
    width = response_ids.shape[1]
    output = causal_lm_forward(model, ids, mask, logits_to_keep=width + 1, output_hidden_states=with_values)
    logits = output.logits[:, :-1]  # (b, R, v): position i predicts response token i
    logprobs = logprobs_from_logits(logits, response_ids, temperature)
    values = value_head(output.hidden_states[-1][:, -width - 1:-1]) if with_values else None
    entropy = entropy_from_logits(logits, temperature) if with_entropy else None
    return logprobs, values, entropy


@torch.no_grad()
def evaluate_rollout(policy, value_head, reference, reference_context, ids, mask, response_ids, temperature,
                     chunk_size: int) -> dict[str, torch.Tensor]:
    """Old log-probs, values, entropy (policy) and reference log-probs, in chunks of rows."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "entropy": [], "ref_logprobs": []}
    for begin in range(0, ids.shape[0], chunk_size):
        rows = slice(begin, begin + chunk_size)
        logprobs, values, entropy = response_forward(policy, value_head, ids[rows], mask[rows], response_ids[rows],
                                                     temperature, with_values=True, with_entropy=True)
        with reference_context():
            ref_logprobs, _, _ = response_forward(reference, None, ids[rows], mask[rows], response_ids[rows],
                                                  temperature, with_values=False)
        for key, value in (("logprobs", logprobs), ("values", values), ("entropy", entropy),
                           ("ref_logprobs", ref_logprobs)):
            parts[key].append(value.float())
    return {key: torch.cat(value) for key, value in parts.items()}


def compute_advantages(scores, logprobs, ref_logprobs, values, response_mask, kl_coef: float, estimator: str,
                       gamma: float, lam: float, whiten_rewards: bool, whiten_advantages: bool):
    """Shape per-token rewards with the KL penalty, then GAE. Returns rewards, advantages, returns, kl."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * response_mask
    rewards = shape_rewards(scores, kl, response_mask, kl_coef)
    if whiten_rewards:
        rewards = masked_whiten(rewards, response_mask, keep_mean=True)
    advantages, returns = compute_gae(rewards, values * response_mask, response_mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, response_mask)
    return rewards, advantages, returns, kl


def ppo_update_minibatch(accelerator, policy, value_head, loss_fn: PPOLoss, minibatch: Rollout,
                         micro_batch_size: int, temperature: float, world: int) -> dict[str, float]:
    """Accumulate gradients of the clipped PPO loss over the micro-batches of one mini-batch.

    Each micro-batch's loss is a sum over its response tokens divided by the mini-batch's token
    count over all processes, so accumulation equals one large batch exactly. Returns token-weighted
    means of the loss statistics. The caller clips and steps.
    """
    local_tokens = minibatch.response_mask.sum().float()
    total_tokens = accelerator.reduce(local_tokens.to(accelerator.device), "sum").clamp(min=1)
    rows = minibatch.response_mask.shape[0]
    sums: dict[str, float] = {}
    with_entropy = loss_fn.entropy_coef > 0
    minibatch_loss = 0.0
    for begin in range(0, rows, micro_batch_size):
        micro = minibatch.select(list(range(begin, min(begin + micro_batch_size, rows))))
        ids, mask = micro.sequences()
        sync = begin + micro_batch_size >= rows
        context = contextlib.nullcontext() if sync else accelerator.no_sync(policy)
        with context, accelerator.autocast():
            logprobs, values, entropy = response_forward(policy, value_head, ids, mask, micro.response_ids,
                                                         temperature, with_values=True, with_entropy=with_entropy)
            loss, stats = loss_fn(logprobs, micro.logprobs, micro.advantages, values, micro.values, micro.returns,
                                  micro.response_mask, entropy=entropy, normaliser=float(total_tokens))
            accelerator.backward(loss * world)  # DDP averages gradients over processes
        tokens = float(micro.response_mask.sum())
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + float(value) * tokens
        minibatch_loss += float(loss.detach())
    weight = float(local_tokens.clamp(min=1))
    return {"loss": minibatch_loss, **{key: value / weight for key, value in sums.items()}}


def masked_row_sum_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over rows of the masked per-row sum (e.g. KL in nats per response)."""
    return float((values * mask).sum(-1).mean())


__all__ = ["Rollout", "compute_advantages", "evaluate_rollout", "masked_mean", "masked_row_sum_mean",
           "ppo_update_minibatch", "response_forward"]
