"""`reuse_head_output`: logits in a kept buffer and the head's gradient added in place, equal to nn.Linear."""

import torch
from accelerate import Accelerator
from torch import nn
from transformers import LlamaForCausalLM

from conftest import float64_tolerance, gradient_tolerances, tiny_llama
from rlhfkit.cpu.buffers import KeptBuffer
from rlhfkit.cpu.gradients import allocate_gradients, sparse_embedding_gradients
from rlhfkit.cpu.head import reuse_head_output


def tiny_lm(tied: bool = True, dtype=torch.float32) -> LlamaForCausalLM:
    return tiny_llama(48, seed=5, tied=tied).to(dtype)


def _tolerances(grads: dict[str, torch.Tensor], batches: list[torch.Tensor]) -> tuple[float, float]:
    """Float64 gradients summed over the batches' positions, carried back through the widest layer (32)."""
    return gradient_tolerances(grads, sum(ids.numel() for ids in batches) * 32, float64_tolerance)


def gradients(model: LlamaForCausalLM, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients accumulated over `batches` (response-style: logits at the last 3 positions only)."""
    for ids in batches:
        logits = model(input_ids=ids, logits_to_keep=torch.arange(ids.shape[1] - 4, ids.shape[1] - 1)).logits
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, -3:].unsqueeze(-1))
        logprobs.sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_head_in_place_gradients_equal_nn_linear_tied_and_untied():
    """Float64: the in-place addmm_ and autograd's nn.Linear sum the same products in other orders."""
    data = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 48, (3, 9), generator=data) for _ in range(2)]
    for tied in (True, False):
        plain, reused = tiny_lm(tied, torch.float64), tiny_lm(tied, torch.float64)
        accelerator = Accelerator(cpu=True)
        for model in (plain, reused):
            allocated = allocate_gradients(list(model.parameters()))
            assert allocated
        sparse_embedding_gradients(reused)
        installed = reuse_head_output(reused, accumulate=True, output=KeptBuffer(minimum_bytes=0))
        assert installed
        weight = reused.lm_head.weight
        pointer = weight.grad.data_ptr()
        delivered = []  # what autograd still hands the head's weight: the embedding's sparse rows, or nothing
        weight.register_hook(lambda grad: delivered.append(None if grad is None else grad.is_sparse))
        expected, got = gradients(plain, batches), gradients(reused, batches)
        assert weight.grad.data_ptr() == pointer and weight.grad.abs().sum() > 0  # added into the kept buffer
        assert delivered == [True if tied else None] * len(batches)  # no dense gradient through autograd
        rtol, atol = _tolerances(expected, batches)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def test_gradient_returned_to_autograd_without_accumulate():
    plain, reused = tiny_lm(dtype=torch.float64), tiny_lm(dtype=torch.float64)
    installed = reuse_head_output(reused, accumulate=False, output=KeptBuffer(minimum_bytes=0))
    assert installed
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(3))
    expected, got = gradients(plain, [ids]), gradients(reused, [ids])  # gradients created by autograd
    rtol, atol = _tolerances(expected, [ids])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def test_logits_buffer_is_reused_only_when_nothing_refers_to_it():
    """The buffer is kept on the CPU (other devices' allocators cache blocks themselves): pinned there."""
    model = tiny_lm(dtype=torch.float64)
    output = KeptBuffer(minimum_bytes=0)
    installed = reuse_head_output(model, accumulate=False, output=output)
    assert installed
    ids = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # (b, T, H)
        expected = nn.functional.linear(hidden, model.lm_head.weight)
        # float64 rounding of the head's sums over the hidden size, relative to their summands
        atol = float64_tolerance(hidden.abs() @ model.lm_head.weight.abs().t(), hidden.shape[-1])
        kept = model(input_ids=ids).logits
        assert kept.device.type == "cpu"
        torch.testing.assert_close(kept, expected, atol=atol, rtol=0)
        second = model(input_ids=ids.flip(0)).logits  # `kept` still refers to the buffer: a new one
        assert second.data_ptr() != kept.data_ptr()
        torch.testing.assert_close(kept, expected, atol=atol, rtol=0)  # not overwritten
        first_buffer = second.data_ptr()
        del kept, second
        third = model(input_ids=ids).logits
        assert third.data_ptr() == first_buffer  # free again: reused
        torch.testing.assert_close(third, expected, atol=atol, rtol=0)


def test_heads_outside_the_plain_case_keep_their_forward():
    with_bias = tiny_lm(tied=False)
    with_bias.lm_head = nn.Linear(16, 48, bias=True)
    installed = reuse_head_output(with_bias, accumulate=True)
    assert not installed
    model = tiny_lm()
    installed = reuse_head_output(model, accumulate=False, output=KeptBuffer(minimum_bytes=0))
    assert installed
    installed_again = reuse_head_output(model, accumulate=False)
    assert not installed_again  # installed once
    ids = torch.randint(0, 48, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the plain forward
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16


def test_small_or_non_cpu_requests_are_plain_allocations():
    buffer = KeptBuffer(minimum_bytes=1024)
    small = buffer.take((4, 8), torch.float32, torch.device("cpu"))  # 128 bytes
    assert buffer.buffer is None and small.shape == (4, 8)
    large = buffer.take((16, 16), torch.float32, torch.device("cpu"))  # 1 KB: kept
    assert buffer.buffer is not None and large.data_ptr() == buffer.buffer.data_ptr()
    elsewhere = buffer.take((4, 16), torch.float32, torch.device("meta"))  # off the CPU: a plain allocation
    assert elsewhere.device.type == "meta" and buffer.buffer.data_ptr() == large.data_ptr()
    buffer.release()
    assert buffer.buffer is None
