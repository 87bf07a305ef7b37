"""Hand-derived checks for rlhfkit.rl.logprobs.

The functions compute in float32: a log-softmax of logits z over v entries is compared with
`log_softmax_tolerance` (conftest: float32 rounding of sums of v terms of size max |z / temperature|
or log v), its gradient with that times the upstream gradient's size.
"""

from __future__ import annotations

import math

import torch

from conftest import log_softmax_tolerance
from rlhfkit.rl import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_logprobs_temperature_one_and_half():
    # logits [0, ln2, ln3] -> exp = [1, 2, 3], sum 6 -> p = [1/6, 1/3, 1/2].
    # temperature 0.5 -> logits * 2 = [0, ln4, ln9] -> exp [1, 4, 9], sum 14 -> p = [1/14, 4/14, 9/14].
    logits = torch.tensor([[[0.0, LN2, LN3], [0.0, LN2, LN3]]])  # (1, 2, 3)
    labels = torch.tensor([[2, 0]])
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (1, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[math.log(1 / 2), math.log(1 / 6)]]),
                               atol=log_softmax_tolerance(logits), rtol=0)

    out_t = logprobs_from_logits(logits, labels, temperature=0.5)
    torch.testing.assert_close(out_t, torch.tensor([[math.log(9 / 14), math.log(1 / 14)]]),
                               atol=log_softmax_tolerance(logits, temperature=0.5), rtol=0)

    # temperature 2 -> logits / 2 = [0, ln sqrt2, ln sqrt3] -> exp [1, sqrt2, sqrt3].
    out_t2 = logprobs_from_logits(logits, labels, temperature=2.0)
    denom = 1.0 + math.sqrt(2.0) + math.sqrt(3.0)
    torch.testing.assert_close(
        out_t2, torch.tensor([[math.log(math.sqrt(3.0) / denom), math.log(1.0 / denom)]]),
        atol=log_softmax_tolerance(logits, temperature=2.0), rtol=0,
    )


def test_logprobs_bf16_is_upcast_to_float32():
    # 0, 1, 2 are exact in bf16, so the answer is exact: log p(2) = 2 - ln(1 + e + e^2).
    logits = torch.tensor([[[0.0, 1.0, 2.0]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[2]]))
    assert out.dtype == torch.float32
    expected = 2.0 - math.log(1.0 + math.e + math.e**2)
    torch.testing.assert_close(out, torch.tensor([[expected]]), atol=log_softmax_tolerance(2.0, 3), rtol=0)


def test_logprobs_matches_reference_log_softmax():
    # Cross-check against torch.log_softmax (an independent implementation).
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=gen)
    labels = torch.randint(0, 7, (3, 4), generator=gen)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels, 0.7), expected,
                               atol=log_softmax_tolerance(logits, temperature=0.7), rtol=0)


def test_entropy_hand_values():
    # Uniform over 3 tokens: H = ln 3.
    # p = [1/6, 1/3, 1/2]: H = (1/6) ln6 + (1/3) ln3 + (1/2) ln2.
    # temperature 0.5 -> p = [1/14, 4/14, 9/14]: H = ln14 - (4 ln4 + 9 ln9) / 14.
    logits = torch.tensor([[[5.0, 5.0, 5.0], [0.0, LN2, LN3]]])
    out = entropy_from_logits(logits)
    assert out.dtype == torch.float32
    h_second = math.log(6) / 6 + LN3 / 3 + LN2 / 2
    torch.testing.assert_close(out, torch.tensor([[LN3, h_second]]), atol=log_softmax_tolerance(logits), rtol=0)

    out_t = entropy_from_logits(torch.tensor([[[0.0, LN2, LN3]]]), temperature=0.5)
    h_t = math.log(14) - (4 * math.log(4) + 9 * math.log(9)) / 14
    torch.testing.assert_close(out_t, torch.tensor([[h_t]]), atol=log_softmax_tolerance(LN3, 3, 0.5), rtol=0)

    # fp16 input is upcast: uniform (5 is exact in fp16) stays ln 3 to float32 rounding.
    out16 = entropy_from_logits(logits[:, :1].to(torch.float16))
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, torch.tensor([[LN3]]), atol=log_softmax_tolerance(5.0, 3), rtol=0)


def test_entropy_with_banned_token_is_finite():
    # A -inf logit has p = 0 and contributes nothing: two equal survivors -> H = ln 2.
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[LN2]]), atol=log_softmax_tolerance(0.0, 3),
                               rtol=0)


def test_logprobs_gradient_is_onehot_minus_softmax():
    # logits [0, ln2, ln3] -> p = [1/6, 1/3, 1/2]; d log p(2) / dz = onehot(2) - p = [-1/6, -1/3, 1/2].
    # Upstream gradient 3 on that position, 0 on the other: the gradient there is all zero.
    logits = torch.tensor([[[0.0, LN2, LN3], [1.0, 2.0, 3.0]]], requires_grad=True)
    out = logprobs_from_logits(logits, torch.tensor([[2, 0]]))
    (out * torch.tensor([[3.0, 0.0]])).sum().backward()
    expected = torch.tensor([[[-3 / 6, -3 / 3, 3 / 2], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(logits.grad, expected, atol=3.0 * log_softmax_tolerance(logits), rtol=0)


def test_logprobs_gradient_matches_autograd_of_log_softmax():
    # Against autograd through torch.log_softmax (an independent implementation), with temperature.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen)
    ours = logits.clone().requires_grad_(True)
    (logprobs_from_logits(ours, labels, 0.7) * weights).sum().backward()
    reference = logits.clone().requires_grad_(True)
    (torch.log_softmax(reference / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * weights).sum().backward()
    upstream = float(weights.abs().max()) / 0.7  # d(z / 0.7)/dz times the weights
    torch.testing.assert_close(ours.grad, reference.grad, atol=upstream * log_softmax_tolerance(logits, temperature=0.7),
                               rtol=0)


def test_logprobs_backward_refuses_a_second_pass_over_one_graph():
    # The backward pass writes the gradient over its saved log-softmax, so a retained graph must
    # not silently give a wrong second gradient.
    import pytest

    logits = torch.randn(2, 3, 7, requires_grad=True)
    out = logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        out.backward()


def test_logprobs_bf16_gradient_keeps_the_logits_dtype():
    logits = torch.tensor([[[0.0, 1.0, 2.0]]], dtype=torch.bfloat16, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[0]])).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), -1)
    expected = (torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) - p).view(1, 1, 3)
    # One rounding of the float32 gradient to bfloat16: at most half an ulp (eps_bf16 / 2 relative);
    # twice that allows for the float32 arithmetic before it.
    atol = torch.finfo(torch.bfloat16).eps * float(expected.abs().max())
    torch.testing.assert_close(logits.grad.double(), expected, atol=atol, rtol=0)


def test_logprobs_and_entropy_equal_the_separate_functions():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 13, generator=gen)
    logits[0, 1, 4] = float("-inf")  # a banned token
    labels = torch.randint(0, 13, (2, 3), generator=gen)
    labels[0, 1] = 5
    logprobs, entropy = logprobs_and_entropy(logits, labels, 0.9)
    torch.testing.assert_close(logprobs, logprobs_from_logits(logits, labels, 0.9), atol=0, rtol=0)
    torch.testing.assert_close(entropy, entropy_from_logits(logits, 0.9), atol=0, rtol=0)
    assert torch.isfinite(entropy).all()


def test_no_grad_blocks_equal_one_whole_pass(monkeypatch):
    # Without gradients the log-softmax runs over blocks of positions; every block size (one
    # position, a size that leaves a remainder, all positions) gives the one-pass values exactly.
    import rlhfkit.rl.logprobs as module

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 17, generator=gen)
    labels = torch.randint(0, 17, (3, 5), generator=gen)
    lsm = torch.log_softmax(logits / 0.7, -1)
    whole = lsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    whole_entropy = -(lsm.exp() * lsm).sum(-1)
    for positions in (1, 4, 15, 100):
        monkeypatch.setattr(module, "NO_GRAD_BLOCK_ELEMENTS", positions * 17)
        with torch.no_grad():
            torch.testing.assert_close(logprobs_from_logits(logits, labels, 0.7), whole, atol=0, rtol=0)
        logprobs, entropy = logprobs_and_entropy(logits, labels, 0.7)
        torch.testing.assert_close(logprobs, whole, atol=0, rtol=0)
        torch.testing.assert_close(entropy, whole_entropy, atol=log_softmax_tolerance(logits, temperature=0.7), rtol=0)


def test_logprobs_with_a_kept_buffer_equal_and_reuse_it_after_each_backward():
    from rlhfkit.cpu.buffers import KeptBuffer
    from rlhfkit.cpu.logprobs import buffered_logprobs_from_logits

    buffer = KeptBuffer(minimum_bytes=0)  # tiny tensors kept too
    generator = torch.Generator().manual_seed(9)
    pointers = []
    for _ in range(2):
        logits = torch.randn(2, 3, 7, generator=generator)
        labels = torch.randint(0, 7, (2, 3), generator=generator)
        weights = torch.randn(2, 3, generator=generator)
        plain, kept = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        (logprobs_from_logits(plain, labels, 0.7) * weights).sum().backward()
        out = buffered_logprobs_from_logits(kept, labels, 0.7, buffer=buffer)
        pointers.append(buffer.buffer.data_ptr())
        assert buffer.buffer.device.type == "cpu"  # the buffer is kept on the CPU only
        atol = log_softmax_tolerance(logits, temperature=0.7)  # the same log-softmax, into another tensor
        torch.testing.assert_close(out, logprobs_from_logits(logits, labels, 0.7), atol=atol, rtol=0)
        (out * weights).sum().backward()
        torch.testing.assert_close(kept.grad, plain.grad, atol=float(weights.abs().max()) / 0.7 * atol, rtol=0)
    assert pointers[0] == pointers[1]  # the first graph was freed by its backward: the same buffer again
