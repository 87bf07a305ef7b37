"""`rl.head_logprobs`: the LM head and log-softmax in chunks of positions equal the plain computation
(values and gradients w.r.t. the hidden states and the head's weight), and never hold the whole logits.

Exact algebra in float64 (rule 2 of conftest): the plain computation is autograd through
``log_softmax(h @ W^T / temperature)``; every sum the chunked one does has the plain one's length (the
vocabulary for a log-softmax, the positions for the weight's gradient, the vocabulary for the hidden
states'), so `float64_tolerance` over that length.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (
    float64_tolerance,
    gradient_tolerances,
    log_softmax_tolerance,
    logit_bound,
    pad_prompts_and_responses,
    tiny_llama,
)
from rlhfkit.rl.head_logprobs import head_logprobs
from rlhfkit.stages.ppo_steps import response_forward
from rlhfkit.stages.sft import label_positions, token_nll_sum

VOCAB, HIDDEN = 50, 8


def _plain(hidden, weight, labels, temperature):
    lsm = torch.log_softmax(hidden @ weight.t() / temperature, -1)  # (..., v)
    return lsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def _inputs(seed: int, rows: int = 3, tokens: int = 7):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, tokens, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (rows, tokens), generator=generator)
    upstream = torch.randn(2, rows, tokens, generator=generator, dtype=torch.float64)
    return hidden, weight, labels, upstream


@pytest.mark.parametrize("weight_trains", [True, False])  # full fine-tuning; LoRA (a frozen head)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_values_and_gradients_equal_the_plain_computation(weight_trains, with_entropy):
    hidden, weight, labels, upstream = _inputs(0)
    temperature = 0.7
    grads = {}
    results = {}
    for name in ("plain", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_trains)
        if name == "plain":
            logprobs, entropy = _plain(h, w, labels, temperature)
        else:  # 4 positions per chunk: 21 positions leave a remainder
            logprobs, entropy = head_logprobs(h, w, labels, temperature, chunk_size=4, with_entropy=with_entropy)
            assert (entropy is not None) == with_entropy and logprobs.dtype == torch.float64
        loss = (upstream[0] * logprobs).sum() + ((upstream[1] * entropy).sum() if with_entropy else 0.0)
        loss.backward()
        results[name] = (logprobs.detach(), entropy.detach() if with_entropy else None)
        grads[name] = {"hidden": h.grad, **({"weight": w.grad} if weight_trains else {})}
    logits = hidden @ weight.t() / temperature
    atol = float64_tolerance(max(float(logits.abs().max()), math.log(VOCAB)), VOCAB)
    torch.testing.assert_close(results["chunked"][0], results["plain"][0], atol=atol, rtol=0)
    if with_entropy:
        torch.testing.assert_close(results["chunked"][1], results["plain"][1], atol=atol, rtol=0)
    rtol, grad_atol = gradient_tolerances(grads["plain"], labels.numel() * VOCAB, float64_tolerance)
    for key, expected in grads["plain"].items():
        torch.testing.assert_close(grads["chunked"][key], expected, rtol=rtol, atol=grad_atol, msg=key)
    # What the tolerance guards against: another temperature moves the log-probs far more.
    other, _ = _plain(hidden, weight, labels, 1.0)
    assert (other - results["plain"][0]).abs().max() > 1e6 * atol


def test_no_grad_values_and_entropies_equal_the_plain_computation():
    hidden, weight, labels, _ = _inputs(1)
    with torch.no_grad():
        logprobs, entropy = head_logprobs(hidden, weight, labels, 1.3, chunk_size=5, with_entropy=True)
    expected_logprobs, expected_entropy = _plain(hidden, weight, labels, 1.3)
    atol = float64_tolerance(max(float((hidden @ weight.t()).abs().max()) / 1.3, math.log(VOCAB)), VOCAB)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=atol, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=atol, rtol=0)


def test_autocast_bf16_computes_the_head_in_bf16_and_keeps_each_gradients_dtype():
    """Under autocast the product runs in bf16, as nn.Linear's would: the log-probs equal the plain bf16
    head's up to the float32 log-softmax's rounding; gradients come back in the inputs' dtypes."""
    hidden, weight, labels, upstream = _inputs(2)
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _ = head_logprobs(hidden, weight, labels, chunk_size=4)
        logits = torch.nn.functional.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16 and logprobs.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, atol=log_softmax_tolerance(logits.float()), rtol=0)
    (upstream[0].float() * logprobs).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


class LargestVocabularyTensor(TorchDispatchMode):
    """Records the most entries of any new tensor (not a view of an input) an operation produces whose
    last dimension is the vocabulary."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == self.vocab \
                    and tensor.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, tensor.numel())
        return out


def _padded_batch():
    prompts = [[5, 6, 7], [8], [9, 10]]
    responses = [[11, 12, 13, 14], [15, 16], [17, 18, 19]]
    return pad_prompts_and_responses(prompts, responses)


@pytest.mark.parametrize("tied", [True, False])
def test_response_forward_in_chunks_equals_the_whole_head_and_never_holds_the_logits(tied):
    """Left-padded prompts, right-padded responses, temperature 0.8, a float64 model: log-probs, entropies
    and every parameter's gradient (the head's, tied to the embedding or not, included) equal the plain
    path's, whose log-softmax rounds to float32 (so float32 tolerances); the largest vocabulary-sized
    tensor holds one chunk's positions, not the batch's."""
    _, _, response, response_mask, ids, mask = _padded_batch()
    weights = response_mask.double()
    results, grads, largest = {}, {}, {}
    for chunk in (0, 2):
        model = tiny_llama(48, seed=4, tied=tied).double()
        with LargestVocabularyTensor(48) as record:
            logprobs, _, entropy = response_forward(model, None, ids, mask, response, 0.8, with_values=False,
                                                    with_entropy=True, logits_chunk_size=chunk)
            ((logprobs * weights).sum() + 0.1 * (entropy * weights).sum()).backward()
        largest[chunk] = record.largest
        results[chunk] = (logprobs.detach(), entropy.detach())
        grads[chunk] = {name: p.grad for name, p in model.named_parameters()}
    real = response_mask
    atol = log_softmax_tolerance(logit_bound(model), 48, 0.8)
    torch.testing.assert_close(results[2][0][real], results[0][0][real], atol=atol, rtol=0)
    torch.testing.assert_close(results[2][1][real], results[0][1][real], atol=atol, rtol=0)
    rtol, grad_atol = gradient_tolerances(grads[0], ids.numel() * 48)
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[2][name], expected, rtol=rtol, atol=grad_atol, msg=name)
    rows, width = response.shape
    assert largest[0] >= rows * width * 48  # the plain path's logits
    assert largest[2] <= 2 * 48  # one chunk of 2 positions at a time


def test_sft_loss_in_chunks_equals_cross_entropy_over_the_whole_logits():
    _, _, _, _, ids, mask = _padded_batch()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :2] = -100  # prompt tokens without labels
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results, grads = {}, {}
    for chunk in (0, 3):
        model = tiny_llama(48, seed=6).double()
        nll, count = token_nll_sum(model, batch, logits_chunk_size=chunk)
        nll.backward()
        results[chunk] = (float(nll.detach()), int(count))
        grads[chunk] = {name: p.grad for name, p in model.named_parameters()}
    assert results[3][1] == results[0][1] == int((labels[:, 1:] != -100).sum())
    # The plain path's cross-entropy is float32 (logits.float()); the chunked one float64, each term a
    # log-softmax over 48 entries, summed over the labelled positions.
    terms = results[0][1]
    assert abs(results[3][0] - results[0][0]) <= terms * log_softmax_tolerance(logit_bound(model), 48)
    rtol, atol = gradient_tolerances(grads[0], ids.numel() * 48)  # float32 log-softmax in the plain path
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[3][name], expected, rtol=rtol, atol=atol, msg=name)


def test_sft_label_positions_from_the_host_select_the_same_tokens():
    """`label_positions` computed beforehand (as the SFT step does on the host) gives the chunked loss and
    its gradients exactly as the positions found on the device do."""
    _, _, _, _, ids, mask = _padded_batch()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :2] = -100
    outcomes = []
    for given in (False, True):
        model = tiny_llama(48, seed=6).double()
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if given:
            batch["label_positions"] = label_positions(labels)
        nll, count = token_nll_sum(model, batch, logits_chunk_size=3)
        nll.backward()
        outcomes.append((nll.detach(), count, {name: p.grad for name, p in model.named_parameters()}))
    assert torch.equal(outcomes[0][0], outcomes[1][0]) and int(outcomes[0][1]) == int(outcomes[1][1])
    for name, grad in outcomes[0][2].items():
        assert torch.equal(outcomes[1][2][name], grad), name
    assert label_positions(labels).numel() == int((labels[:, 1:] != -100).sum())
