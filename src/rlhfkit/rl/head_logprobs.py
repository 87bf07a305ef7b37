"""Log-probs and entropies straight from the last hidden states and the LM head's weight, in chunks.

`logprobs_from_logits` needs the ``(n, v)`` logits first: for a micro-batch of 16 rows x 128
response tokens and a 49,152-entry vocabulary that is 100 M entries, held in the compute dtype,
again as the float32 log-softmax kept for the backward pass, and once more as its gradient. Here
the head's product ``z = h W^T / temperature`` is computed for `chunk_size` positions at a time, so
at most ``chunk_size x v`` logits ever exist:

    logprob_i = z_i[label_i] - logsumexp_k z_ik
    entropy_i = -sum_k p_ik log p_ik,             p_i = softmax(z_i)

Gradients are exact (the same algebra as autograd over the plain computation), for upstream
gradients ``g`` of the log-probs and ``e`` of the entropies:

    dL/dz_ik = g_i (onehot_ik - p_ik) - e_i p_ik (log p_ik + entropy_i)
    dL/dh_i  = sum_k dL/dz_ik W_k / temperature,   dL/dW = sum_i dL/dz_i^T h_i / temperature

When only the hidden states need gradients (LoRA: the head is frozen), the forward pass also
computes ``dlogprob_i/dh_i`` and ``dentropy_i/dh_i`` (``(n, H)`` each, while ``p`` is at hand), so
the backward pass is two scalings and no vocabulary-sized work. When the weight trains (full
fine-tuning), the backward pass recomputes each chunk's logits (one extra head product) and
accumulates both gradients.

Shapes: ``n`` positions, ``H`` hidden size, ``v`` vocabulary. The head's product runs in the
autocast dtype when autocast is on (as ``nn.Linear`` would), else in the hidden states' dtype;
log-softmax, log-probs and entropies are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The head product's dtype: autocast's where it is on, else the inputs' (promoted)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _softmax_dtype(compute: torch.dtype) -> torch.dtype:
    return torch.float64 if compute == torch.float64 else torch.float32


def _chunk_log_softmax(hidden: Tensor, weight: Tensor, temperature: float, softmax_dtype: torch.dtype) -> Tensor:
    """``log_softmax(hidden @ weight^T / temperature)`` ``(c, v)``, the product in the inputs' dtype."""
    logits = hidden @ weight.t()  # (c, v)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1, dtype=softmax_dtype)


def _entropy(lsm: Tensor, probs: Tensor) -> Tensor:
    """``-sum_k p_k lsm_k`` ``(c,)``; a -inf log-prob (p = 0) adds 0, not NaN."""
    return -(probs * lsm.clamp(min=torch.finfo(lsm.dtype).min)).sum(-1)


def _logit_gradient(lsm: Tensor, probs: Tensor, labels: Tensor, grad_logprob: Tensor,
                    grad_entropy: Tensor | None, entropy: Tensor | None) -> Tensor:
    """``dL/dz`` ``(c, v)`` (before the division by the temperature) from the upstream gradients ``(c,)``."""
    dz = probs * (-grad_logprob.unsqueeze(-1))  # -g p
    dz.scatter_add_(-1, labels.unsqueeze(-1), grad_logprob.unsqueeze(-1))  # + g at the label
    if grad_entropy is not None:
        finite = lsm.clamp(min=torch.finfo(lsm.dtype).min)
        dz -= grad_entropy.unsqueeze(-1) * probs * (finite + entropy.unsqueeze(-1))
    return dz


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """Selected log-probs and entropies ``(n,)`` of ``softmax(hidden @ weight^T / temperature)``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, chunk_size: int,
                with_entropy: bool, compute_dtype: torch.dtype):
        softmax_dtype = _softmax_dtype(compute_dtype)
        weight_c = weight.to(compute_dtype)
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=softmax_dtype, device=hidden.device)
        entropy = torch.zeros(n, dtype=softmax_dtype, device=hidden.device)
        # LoRA: only the hidden states need a gradient, which is linear in the upstream gradients.
        precompute = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        hidden_grads = []  # per chunk: d logprob / dh (and d entropy / dh), (c, H) each
        with torch.autocast(hidden.device.type, enabled=False):
            for begin in range(0, n, chunk_size):
                h = hidden[begin:begin + chunk_size].to(compute_dtype)  # (c, H)
                index = labels[begin:begin + chunk_size]
                lsm = _chunk_log_softmax(h, weight_c, temperature, softmax_dtype)  # (c, v)
                logprobs[begin:begin + chunk_size] = lsm.gather(-1, index.unsqueeze(-1)).squeeze(-1)
                probs = lsm.exp()
                if with_entropy:
                    entropy[begin:begin + chunk_size] = _entropy(lsm, probs)
                if precompute:
                    ones = torch.ones_like(index, dtype=softmax_dtype)
                    dz = _logit_gradient(lsm, probs, index, ones, None, None)
                    grads = [dz.to(compute_dtype) @ weight_c]
                    if with_entropy:
                        chunk_entropy = entropy[begin:begin + chunk_size]
                        dz = _logit_gradient(lsm, probs, index, torch.zeros_like(ones), ones, chunk_entropy)
                        grads.append(dz.to(compute_dtype) @ weight_c)
                    hidden_grads.append([(g / temperature).to(softmax_dtype) for g in grads])
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        ctx.compute_dtype, ctx.precomputed = compute_dtype, precompute
        if precompute:
            ctx.hidden_grads = [torch.cat(parts) for parts in zip(*hidden_grads)] if hidden_grads else []
            ctx.save_for_backward(hidden, labels)
        else:
            ctx.save_for_backward(hidden, weight, labels, entropy)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob: Tensor, grad_entropy: Tensor | None):
        softmax_dtype = _softmax_dtype(ctx.compute_dtype)
        grad_logprob = grad_logprob.to(softmax_dtype)
        grad_entropy = grad_entropy.to(softmax_dtype) if ctx.with_entropy and grad_entropy is not None else None
        if ctx.precomputed:
            hidden, _ = ctx.saved_tensors
            if not ctx.hidden_grads:
                return (torch.zeros_like(hidden),) + (None,) * 6
            grad_hidden = grad_logprob.unsqueeze(-1) * ctx.hidden_grads[0]
            if grad_entropy is not None:
                grad_hidden = grad_hidden + grad_entropy.unsqueeze(-1) * ctx.hidden_grads[1]
            return (grad_hidden.to(hidden.dtype),) + (None,) * 6
        hidden, weight, labels, entropy = ctx.saved_tensors
        compute_dtype, temperature, chunk = ctx.compute_dtype, ctx.temperature, ctx.chunk_size
        weight_c = weight.to(compute_dtype)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The weight's gradient sums over every position: accumulated in at least float32.
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, softmax_dtype),
                                  device=weight.device) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            for begin in range(0, hidden.shape[0], chunk):
                end = begin + chunk
                h = hidden[begin:end].to(compute_dtype)
                lsm = _chunk_log_softmax(h, weight_c, temperature, softmax_dtype)
                dz = _logit_gradient(lsm, lsm.exp(), labels[begin:end], grad_logprob[begin:end],
                                     None if grad_entropy is None else grad_entropy[begin:end], entropy[begin:end])
                dz = (dz / temperature if temperature != 1.0 else dz).to(compute_dtype)  # (c, v)
                if need_hidden:
                    grad_hidden[begin:end] = dz @ weight_c
                if need_weight:
                    grad_weight += (dz.t() @ h).to(grad_weight.dtype)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)) + (None,) * 5


@torch.no_grad()
def _no_grad_head_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, chunk_size: int,
                           with_entropy: bool, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    softmax_dtype = _softmax_dtype(compute_dtype)
    weight_c = weight.to(compute_dtype)
    logprobs = torch.empty(hidden.shape[0], dtype=softmax_dtype, device=hidden.device)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    with torch.autocast(hidden.device.type, enabled=False):
        for begin in range(0, hidden.shape[0], chunk_size):
            lsm = _chunk_log_softmax(hidden[begin:begin + chunk_size].to(compute_dtype), weight_c, temperature,
                                     softmax_dtype)
            logprobs[begin:begin + chunk_size] = lsm.gather(-1, labels[begin:begin + chunk_size, None]).squeeze(-1)
            if entropy is not None:
                entropy[begin:begin + chunk_size] = _entropy(lsm, lsm.exp())
    return logprobs, entropy


def head_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                  chunk_size: int = 1024, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each label, and optionally the entropy, under ``softmax(hidden @ weight^T / temperature)``.

    Args:
        hidden: ``(..., H)`` the LM head's input (the last hidden states after the final norm).
        weight: ``(v, H)`` the LM head's weight (a head without bias).
        labels: ``(...)`` long, token ids in ``[0, v)``, one per hidden state.
        temperature: sampling temperature (> 0).
        chunk_size: positions whose logits exist at once (> 0).
        with_entropy: also return the entropies (differentiable like the log-probs).

    Returns:
        ``(...)`` float32 log-probs and ``(...)`` float32 entropies or None; differentiable w.r.t.
        `hidden` and `weight` when grad mode is on (float64 for float64 inputs).
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected hidden (..., H), weight (v, H) and labels (...), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(labels.shape)}")
    shape = labels.shape
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    compute_dtype = _compute_dtype(hidden, weight)
    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if differentiable and flat_labels.numel() > 0:
        logprobs, entropy = _ChunkedHeadLogprobs.apply(flat_hidden, weight, flat_labels, float(temperature),
                                                       chunk_size, with_entropy, compute_dtype)
        return logprobs.view(shape), entropy.view(shape) if with_entropy else None
    logprobs, entropy = _no_grad_head_logprobs(flat_hidden, weight, flat_labels, float(temperature), chunk_size,
                                               with_entropy, compute_dtype)
    return logprobs.view(shape), None if entropy is None else entropy.view(shape)
