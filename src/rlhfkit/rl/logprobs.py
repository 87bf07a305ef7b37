"""Per-token log-probabilities and entropies from language-model logits.

Shapes: ``b`` = batch, ``t`` = sequence (response) length, ``v`` = vocabulary.

Both functions compute in float32 whatever the logits dtype (bf16/fp16 logits are upcast inside
the softmax kernel, with no separate float32 copy of the logits). Both run on one fused
``log_softmax`` over the vocabulary: on CPU that kernel is several times faster than
``logsumexp`` (which takes separate max, exp, sum and log passes), and the selected log-prob's
backward pass is written out below, ``d/dz = onehot(label) - softmax(z)``, in two passes over the
``(b, t, v)`` block instead of autograd's four.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` (the same tensor when the temperature is 1); shape unchanged."""
    return logits if temperature == 1.0 else logits / temperature


class SelectedLogSoftmax(torch.autograd.Function):
    """``log_softmax(z)[label]`` over the last dimension, as float32, with a two-pass backward.

    Forward: ``lsm = log_softmax(z)`` ``(b, t, v)`` float32, kept for the backward pass; returns
    ``lsm`` at the labels ``(b, t)``. Backward, for upstream gradient ``g`` ``(b, t)``:
    ``dz = g * (onehot(label) - exp(lsm))``, written over ``lsm`` (no second vocabulary-sized
    tensor, half the memory traffic); so a second backward pass
    through the same graph (``retain_graph``) is refused.
    """

    @staticmethod
    def forward(ctx, z: Tensor, labels: Tensor) -> Tensor:
        lsm = torch.log_softmax(z, dim=-1, dtype=torch.float32)  # (b, t, v)
        return SelectedLogSoftmax.select(ctx, lsm, labels, z.dtype)

    @staticmethod
    def select(ctx, lsm: Tensor, labels: Tensor, input_dtype: torch.dtype) -> Tensor:
        """Keep ``lsm`` ``(b, t, v)`` for the backward pass; return it at the labels ``(b, t)``."""
        index = labels.long().unsqueeze(-1)  # (b, t, 1)
        ctx.save_for_backward(lsm, index)
        ctx.input_dtype = input_dtype
        return lsm.gather(-1, index).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the log-probs' backward pass overwrites its saved log-softmax; "
                               "it cannot run twice over one graph (retain_graph)")
        ctx.consumed = True
        lsm, index = ctx.saved_tensors
        upstream = grad.to(torch.float32).unsqueeze(-1)  # (b, t, 1)
        dz = lsm.exp_().mul_(-upstream)  # -g * softmax, in place of lsm
        dz.scatter_add_(-1, index, upstream)  # + g at the label
        return (dz.to(ctx.input_dtype),) + (None,) * (len(ctx.needs_input_grad) - 1)


def check_logprob_inputs(logits: Tensor, labels: Tensor, temperature: float) -> None:
    """Raise ValueError unless ``logits`` is ``(b, t, v)``, ``labels`` ``(b, t)`` and ``temperature > 0``."""
    _check_temperature(temperature)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (b, t, v) and labels (b, t), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Equation, with ``z = logits / temperature``::

        logprobs[i, j] = z[i, j, labels[i, j]] - logsumexp_k z[i, j, k]

    Args:
        logits: ``(b, t, v)`` any floating dtype.
        labels: ``(b, t)`` long, token ids in ``[0, v)``.
        temperature: sampling temperature (> 0) the tokens were drawn with.

    Returns:
        ``(b, t)`` float32 log-probabilities (differentiable w.r.t. ``logits``).
    """
    check_logprob_inputs(logits, labels, temperature)
    if logits.numel() == 0:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _chunked_no_grad(logits, labels, temperature)[0]
    return SelectedLogSoftmax.apply(scaled_logits(logits, temperature), labels)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``p = softmax(logits / temperature)`` at every position.

    Equation, with ``z = logits / temperature``::

        H = -sum_k p_k log p_k,   log p = log_softmax(z)

    Args:
        logits: ``(b, t, v)`` any floating dtype.
        temperature: softmax temperature (> 0).

    Returns:
        ``(b, t)`` float32 entropies (nats).
    """
    _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"expected logits (b, t, v), got {tuple(logits.shape)}")
    if logits.numel() == 0:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    return _entropy(torch.log_softmax(scaled_logits(logits, temperature), dim=-1, dtype=torch.float32))


def logprobs_and_entropy(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """`logprobs_from_logits` and `entropy_from_logits` from one log-softmax (no gradient).

    Returns ``(b, t)`` float32 log-probabilities of ``labels`` and ``(b, t)`` entropies.
    """
    check_logprob_inputs(logits, labels, temperature)
    if logits.numel() == 0:
        empty = logits.new_zeros(labels.shape, dtype=torch.float32)
        return empty, empty.clone()
    return _chunked_no_grad(logits, labels, temperature, with_entropy=True)


# Positions x vocabulary entries per log-softmax block without gradients (16 MB of float32):
# a whole (b, t, v) log-softmax beside the logits would double the logits' memory.
NO_GRAD_BLOCK_ELEMENTS = 1 << 22


@torch.no_grad()
def _chunked_no_grad(logits: Tensor, labels: Tensor, temperature: float,
                     with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Selected log-probs (and entropies) ``(b, t)``, one block of positions at a time.

    Each position's log-softmax is independent of the others, so the blocks give exactly the
    values of one whole-tensor pass while holding at most `NO_GRAD_BLOCK_ELEMENTS` extra floats.
    """
    vocab = logits.shape[-1]
    flat_logits, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1, 1).long()
    logprobs = torch.empty(flat_labels.shape[0], dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    block = max(1, NO_GRAD_BLOCK_ELEMENTS // vocab)
    for begin in range(0, flat_labels.shape[0], block):
        end = begin + block
        lsm = torch.log_softmax(scaled_logits(flat_logits[begin:end], temperature), dim=-1, dtype=torch.float32)
        logprobs[begin:end] = lsm.gather(-1, flat_labels[begin:end]).squeeze(-1)
        if entropy is not None:
            entropy[begin:end] = _entropy(lsm)
    return logprobs.view(labels.shape), entropy.view(labels.shape) if entropy is not None else None


def _entropy(lsm: Tensor) -> Tensor:
    """``-sum_k exp(lsm_k) lsm_k`` over the last dimension; ``(b, t, v)`` -> ``(b, t)``.

    A -inf log-prob (a banned token) has p = 0 and contributes 0, not 0 * -inf = NaN: the
    clamp makes it a finite number that p = 0 then zeroes.
    """
    finite = lsm.clamp(min=torch.finfo(lsm.dtype).min)
    return -(torch.exp(lsm) * finite).sum(dim=-1)
