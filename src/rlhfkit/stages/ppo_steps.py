"""PPO's per-batch steps as functions: forward passes over responses, advantages, the update."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable

import torch

from rlhfkit.models.forward import chunkable_head, forward_with_values, head_returns_input
from rlhfkit.rl.head_logprobs import head_logprobs
from rlhfkit.training.distributed import global_masked_whiten, global_sums, micro_batch_context
from rlhfkit.rl import (
    PPOLoss,
    compute_gae,
    entropy_from_logits,
    kl_penalty,
    logprobs_and_entropy,
    logprobs_from_logits,
    masked_whiten,
    shape_rewards,
)

if TYPE_CHECKING:
    from rlhfkit.stages.setup import Training


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
    values: torch.Tensor | None    # (b, R) value estimates at rollout time ("old"); None without a critic
    advantages: torch.Tensor       # (b, R)
    returns: torch.Tensor | None   # (b, R) value targets; None without a critic

    def select(self, rows: torch.Tensor | list[int]) -> "Rollout":
        """The sub-batch of `rows`."""
        return Rollout(**{f.name: _rows(getattr(self, f.name), rows) for f in fields(self)})

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + response tokens and mask, ``(b, P + R)``."""
        ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)
        return ids, mask

    def trimmed(self, bounds: tuple[int, int] | None = None) -> "Rollout":
        """The same rows without the columns that are padding in every row (see `padding_bounds`;
        `bounds`: those already computed, e.g. by `micro_batch_bounds`)."""
        start, end = padding_bounds(self.query_mask, self.response_mask) if bounds is None else bounds
        return Rollout(**{f.name: _trim_field(f.name, getattr(self, f.name), start, end) for f in fields(self)})


_QUERY_FIELDS = ("query_ids", "query_mask")


def _rows(value: torch.Tensor | None, rows) -> torch.Tensor | None:
    return None if value is None else value[rows]


def _trim_field(name: str, value: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    if value is None:
        return None
    if name in _QUERY_FIELDS:
        return value[:, start:]
    return value[:, :end] if value.dim() == 2 else value  # response-aligned (b, R); scores (b,) stay


def padding_bounds(query_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[int, int]:
    """First prompt column and response width that hold a real token in some row.

    Prompts are left-padded and responses right-padded, so the columns outside these bounds are
    padding in every row. Dropping them moves no real token relative to another, and positions
    come from the mask, so every result on real tokens is unchanged; only less work is done.
    At least the last prompt column (which predicts the first response token) and one response
    column are kept.
    """
    prompt_real = query_mask.bool().any(0)
    start = int(prompt_real.long().argmax()) if bool(prompt_real.any()) else query_mask.shape[1] - 1
    response_real = response_mask.bool().any(0).nonzero()
    end = int(response_real[-1]) + 1 if len(response_real) else 1
    return start, end


def micro_batch_bounds(query_mask: torch.Tensor, response_mask: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """`padding_bounds` of each run of `size` consecutive rows (the last may be shorter), read by the
    host at once: one wait for the device instead of several per micro-batch."""
    rows, width = query_mask.shape
    prompt, response = query_mask.bool(), response_mask.bool()
    # per row: the first real prompt column (width - 1 if none) and the response's real width (0 if none)
    first = torch.where(prompt.any(1), prompt.long().argmax(1), width - 1)
    columns = torch.arange(1, response.shape[1] + 1, device=response.device)
    last = (response.long() * columns).amax(1) if response.shape[1] else torch.zeros_like(first)
    chunks = -(-rows // size)
    padding = chunks * size - rows
    first = torch.nn.functional.pad(first, (0, padding), value=width - 1).view(chunks, size).amin(1)
    last = torch.nn.functional.pad(last, (0, padding), value=0).view(chunks, size).amax(1).clamp(min=1)
    return [tuple(pair) for pair in torch.stack([first, last], 1).tolist()]


def length_order(mask: torch.Tensor) -> torch.Tensor:
    """Row indices sorted by real length, so chunks of neighbouring rows carry little padding."""
    return torch.argsort(mask.sum(1), stable=True)


def response_forward(model, value_head, ids: torch.Tensor, mask: torch.Tensor, response_ids: torch.Tensor,
                     temperature: float, with_values: bool = True, with_entropy: bool = False,
                     logprobs_fn: Callable[..., torch.Tensor] = logprobs_from_logits, logits_chunk_size: int = 0):
    """Log-probs (and values, entropy) of the response tokens at the end of ``ids``.

    Vocabulary logits are computed only for the R positions that predict response tokens (an
    index tensor as `logits_to_keep`, so no slice of the logits needs a backward pass), and values
    at the same positions, from the LM head's input (no per-layer hidden states).
    `value_head` None with `with_values`: `model` is a `ModelWithValueHead` (see `forward_with_values`).
    `logprobs_fn`: the log-probs with gradients (`logprobs_from_logits` or the CPU's buffered twin).
    `logits_chunk_size` > 0: the head runs in chunks of that many positions (`rl.head_logprobs`), so
    the ``(b, R, v)`` logits never exist at once, wherever the head allows it (`chunkable_head`).
    Returns ``logprobs (b, R)``, ``values (b, R) | None``, ``entropy (b, R) | None``.
    """
    length, width = ids.shape[1], response_ids.shape[1]
    predicting = torch.arange(length - width - 1, length - 1, device=ids.device)  # (R,)
    head = chunkable_head(model) if logits_chunk_size > 0 else None
    if head is not None:
        with head_returns_input(head):
            output, values = forward_with_values(model, value_head, ids, mask, logits_to_keep=predicting,
                                                 with_values=with_values, at_logits=True)
        logprobs, entropy = head_logprobs(output.logits, head.weight, response_ids, temperature,  # hidden (b, R, H)
                                          logits_chunk_size, with_entropy)
        return logprobs.float(), values, None if entropy is None else entropy.float()
    output, values = forward_with_values(model, value_head, ids, mask, logits_to_keep=predicting,
                                         with_values=with_values, at_logits=True)  # values (b, R)
    logits = output.logits  # (b, R, v): position i predicts response token i
    if with_entropy and not torch.is_grad_enabled():  # one log-softmax for both
        logprobs, entropy = logprobs_and_entropy(logits, response_ids, temperature)
    else:
        logprobs = logprobs_fn(logits, response_ids, temperature)
        entropy = entropy_from_logits(logits, temperature) if with_entropy else None
    return logprobs, values, entropy


@dataclass
class Evaluation:
    """The evaluate phase's per-token results, every tensor ``(b, R)`` float32."""

    logprobs: torch.Tensor      # the policy's ("old") log-probs
    values: torch.Tensor | None  # the value head's ("old") estimates; None without a critic
    entropy: torch.Tensor       # the policy's entropies
    ref_logprobs: torch.Tensor  # the reference's log-probs


@torch.no_grad()
def evaluate_rollout(policy, value_head, reference, reference_context, ids, mask, response_ids, temperature,
                     chunk_size: int, recorded=None, with_values: bool = True,
                     logits_chunk_size: int = 0) -> Evaluation:
    """Old log-probs, values (`with_values`: a critic), entropy (policy) and reference log-probs, in
    chunks of rows.

    `recorded` (a `GeneratedBatch` sampled with ``record=True``) holds the policy's log-probs,
    values and entropy from the sampling passes; then only the reference runs here.
    `logits_chunk_size`: see `response_forward`.
    """
    rows_total, width = response_ids.shape
    def zeros():
        return torch.zeros(rows_total, width, device=ids.device)

    kept = ("logprobs", "values", "entropy") if with_values else ("logprobs", "entropy")
    out = {key: zeros() if recorded is None else getattr(recorded, key).float() for key in kept}
    out["ref_logprobs"] = zeros()
    prompt_width = ids.shape[1] - width
    order = length_order(mask)  # chunks of similar length, each trimmed to its own padding
    bounds = micro_batch_bounds(mask[order, :prompt_width], mask[order, prompt_width:], chunk_size)
    for index, begin in enumerate(range(0, rows_total, chunk_size)):
        rows = order[begin:begin + chunk_size]
        start, end = bounds[index]
        chunk_ids, chunk_mask = ids[rows, start:prompt_width + end], mask[rows, start:prompt_width + end]
        chunk_response = response_ids[rows, :end]
        computed = {}
        if recorded is None:
            computed["logprobs"], computed["values"], computed["entropy"] = response_forward(
                policy, value_head, chunk_ids, chunk_mask, chunk_response, temperature, with_values=with_values,
                with_entropy=True, logits_chunk_size=logits_chunk_size)
        with reference_context():
            computed["ref_logprobs"], _, _ = response_forward(reference, value_head=None, ids=chunk_ids,
                                                              mask=chunk_mask, response_ids=chunk_response,
                                                              temperature=temperature, with_values=False,
                                                              logits_chunk_size=logits_chunk_size)
        for key, value in computed.items():
            if value is not None:
                out[key][rows, :end] = value.float()
    return Evaluation(**{"values": None, **out})


def compute_advantages(scores, logprobs, ref_logprobs, values, response_mask, kl_coef: float, estimator: str,
                       gamma: float, lam: float, whiten_rewards: bool, whiten_advantages: bool, accelerator=None):
    """Shape per-token rewards with the KL penalty, then GAE. Returns rewards, advantages, returns, kl.

    With `accelerator`, whitening uses the mean and variance over every process's tokens, so
    several processes whiten like one process holding the whole rollout batch.
    """
    def whiten(x, keep_mean=False):
        if accelerator is None:
            return masked_whiten(x, response_mask, keep_mean=keep_mean)
        return global_masked_whiten(accelerator, x, response_mask, keep_mean=keep_mean)

    kl = kl_penalty(logprobs, ref_logprobs, estimator) * response_mask
    rewards = shape_rewards(scores, kl, response_mask, kl_coef)
    if whiten_rewards:
        rewards = whiten(rewards, keep_mean=True)
    advantages, returns = compute_gae(rewards, values * response_mask, response_mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages)
    return rewards, advantages, returns, kl


def ppo_update_minibatch(accelerator, policy, value_head, loss_fn: PPOLoss, minibatch: Rollout,
                         micro_batch_size: int, temperature: float, world: int,
                         logprobs_fn: Callable[..., torch.Tensor] = logprobs_from_logits,
                         logits_chunk_size: int = 0) -> dict[str, float]:
    """Accumulate gradients of the clipped PPO loss over the micro-batches of one mini-batch.

    Each micro-batch's loss is a sum over its response tokens divided by the mini-batch's token
    count (or, for the sequence aggregations, by its row count) over all processes, so accumulation
    equals one large batch exactly, on one process or several. Returns the loss and token-weighted
    means of the loss statistics over all processes.
    The caller clips and steps. `value_head` None: `policy` is a `ModelWithValueHead`.
    `logits_chunk_size`: see `response_forward`.
    """
    rows = minibatch.response_mask.shape[0]
    total_tokens, total_rows = global_sums(accelerator, float(minibatch.response_mask.sum()), rows)
    total_tokens = max(total_tokens, 1.0)
    sums: dict[str, torch.Tensor] = {}
    with_entropy = loss_fn.entropy_coef > 0
    with_values = minibatch.values is not None  # a critic
    order = length_order(minibatch.sequences()[1])  # similar lengths together: less padding per pass
    ordered = minibatch.select(order)
    bounds = micro_batch_bounds(ordered.query_mask, ordered.response_mask, micro_batch_size)
    # The statistics stay on the device until the mini-batch ends: the host does not wait for
    # each micro-batch's passes and keeps queueing the next one's (float64, as the sums are read).
    minibatch_loss = torch.zeros((), dtype=torch.float64, device=minibatch.response_mask.device)
    for index, begin in enumerate(range(0, rows, micro_batch_size)):
        micro = ordered.select(slice(begin, begin + micro_batch_size)).trimmed(bounds[index])
        ids, mask = micro.sequences()
        last = begin + micro_batch_size >= rows
        with micro_batch_context(accelerator, policy, last), accelerator.autocast():
            logprobs, values, entropy = response_forward(policy, value_head, ids, mask, micro.response_ids,
                                                         temperature, with_values=with_values,
                                                         with_entropy=with_entropy, logprobs_fn=logprobs_fn,
                                                         logits_chunk_size=logits_chunk_size)
            loss, stats = loss_fn(logprobs, micro.logprobs, micro.advantages, values, micro.values, micro.returns,
                                  micro.response_mask, entropy=entropy, normaliser=total_tokens,
                                  ref_logprobs=micro.ref_logprobs, sequence_normaliser=total_rows)
            accelerator.backward(loss * world)  # DDP averages gradients over processes
        tokens = micro.response_mask.sum().double()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(value).double() * tokens
        minibatch_loss += loss.detach().double()
    keys = sorted(sums)
    totals = global_sums(accelerator, minibatch_loss, *(sums[key] for key in keys))
    return {"loss": totals[0], **{key: value / total_tokens for key, value in zip(keys, totals[1:])}}


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """The row indices ``(len(groups) x G,)`` of `groups` (group indices), group by group: a prompt's G
    responses sit on consecutive rows."""
    return (groups.unsqueeze(-1) * group_size + torch.arange(group_size, device=groups.device)).reshape(-1)


def ppo_update(run: "Training", loss_fn: PPOLoss, rollout: Rollout, mini_size: int, micro_size: int,
               epochs: int, temperature: float, step: int, group_size: int = 1) -> dict[str, float]:
    """`epochs` passes over the rollout in shuffled mini-batches, one optimizer step each; the
    statistics averaged over the steps taken (those the non-finite guard skipped left out).

    Sizes count rows; whole groups of `group_size` consecutive rows (a prompt's responses) are
    shuffled, so a group always sits in one mini-batch. The shuffle is seeded by the step, so a
    resumed run shuffles as the uninterrupted one.
    """
    t, world = run.config.training, run.accelerator.num_processes
    rows = rollout.response_mask.shape[0]
    shuffle = torch.Generator().manual_seed(t.seed * 7919 + step - 1)
    sums: dict[str, float] = {}
    updates = 0
    # transformers checkpoints only layers in training mode; dropout is off throughout, so the mode
    # changes nothing else. Without checkpointing the policy stays in eval mode, as in the other
    # phases (compiled blocks would otherwise compile a variant for each mode).
    checkpointing = t.gradient_checkpointing
    run.model.train(checkpointing)
    for _ in range(epochs):
        order = group_rows(torch.randperm(rows // group_size, generator=shuffle), group_size)
        for begin in range(0, rows, mini_size):
            minibatch = rollout.select(order[begin:begin + mini_size])
            stats = ppo_update_minibatch(run.accelerator, run.model, value_head=None, loss_fn=loss_fn,
                                         minibatch=minibatch, micro_batch_size=micro_size, temperature=temperature,
                                         world=world, logprobs_fn=run.speedups.logprobs,
                                         logits_chunk_size=t.logits_chunk_size)
            stats["grad_norm"], stepped = run.optimizer_step(stats["loss"], step)
            if not stepped:
                continue
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            updates += 1
    run.model.eval()
    return {key: value / max(updates, 1) for key, value in sums.items()}


__all__ = ["Evaluation", "Rollout", "compute_advantages", "evaluate_rollout", "group_rows", "length_order",
           "padding_bounds", "ppo_update", "ppo_update_minibatch", "response_forward"]
