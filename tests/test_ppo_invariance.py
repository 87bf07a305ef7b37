"""Invariances of PPO's forward passes and update on the tiny model, without running the stage.

Expected values come from plain forward passes of the unpadded sequences through the raw model
(`log_softmax` of its logits, the head's linear map of its hidden states), never from rlhfkit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rlhfkit.models.value_head import ValueHead
from rlhfkit.rl import PPOLoss
from rlhfkit.stages.ppo_steps import Rollout, evaluate_rollout, ppo_update_minibatch, response_forward

PAD = 0




def _model(model_dir, attn="sdpa"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    model.eval()
    return model


def _head(hidden: int, seed: int = 0) -> ValueHead:
    torch.manual_seed(seed)
    head = ValueHead(hidden, zero_init=False)
    with torch.no_grad():
        head.summary.weight.normal_(std=0.5)
        head.summary.bias.fill_(0.1)
    return head


def _lora(model, seed: int = 1):
    """A LoRA policy whose adapter is not the identity (B is randomised), so it differs from the base."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    peft = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    peft.eval()
    return peft


def _batch(prompts: list[list[int]], responses: list[list[int]]):
    """Left-padded prompts and right-padded responses, as the rollout builds them."""
    width_p = max(map(len, prompts))
    width_r = max(map(len, responses))
    query = torch.full((len(prompts), width_p), PAD)
    query_mask = torch.zeros_like(query)
    response = torch.full((len(responses), width_r), PAD)
    response_mask = torch.zeros_like(response, dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        query[row, width_p - len(p):] = torch.tensor(p)
        query_mask[row, width_p - len(p):] = 1
        response[row, :len(r)] = torch.tensor(r)
        response_mask[row, :len(r)] = True
    ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask.long()], dim=1)
    return query, query_mask, response, response_mask, ids, mask


def _reference_row(model, head, prompt, response, temperature):
    """Log-probs, values and entropies of one unpadded prompt + response from the raw model."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    logits = out.logits[0, positions].double() / temperature
    logp = F.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    hidden = out.hidden_states[-1][0, positions].double()
    values = None
    if head is not None:
        values = hidden @ head.summary.weight[0].double() + head.summary.bias[0].double()
    return logprobs.float(), None if values is None else values.float(), entropy.float()


PROMPTS = [[5, 17, 40, 33, 8, 61], [70, 12], [9, 9, 9, 44, 81, 23, 50, 3, 27], [66, 31, 15, 88]]
RESPONSES = [[21, 34, 2], [45, 46, 47, 48, 49, 50, 51], [90], [13, 57, 24, 2]]


# ------------------------------------------------------------------------------- left padding


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padding_does_not_change_logprobs_or_values(tiny_model_dir, attn):
    model = _model(tiny_model_dir, attn)
    head = _head(model.config.hidden_size)
    prompt, response = [5, 17, 40, 33, 8, 61, 72], [21, 34, 55, 2]
    results = []
    for pads in (0, 5):
        ids = torch.tensor([[PAD] * pads + prompt + response])
        mask = torch.tensor([[0] * pads + [1] * (len(prompt) + len(response))])
        with torch.no_grad():
            results.append(response_forward(model, head, ids, mask, torch.tensor([response]), 1.0,
                                            with_values=True, with_entropy=True))
    (lp0, v0, e0), (lp5, v5, e5) = results
    assert lp0.shape == v0.shape == e0.shape == (1, len(response))
    torch.testing.assert_close(lp5, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(v5, v0, atol=1e-5, rtol=0)
    torch.testing.assert_close(e5, e0, atol=1e-5, rtol=0)
    # ... and both equal the unpadded computation from the raw model.
    expected_lp, expected_v, expected_e = _reference_row(model, head, prompt, response, 1.0)
    torch.testing.assert_close(lp0[0], expected_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(v0[0], expected_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(e0[0], expected_e, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ values at the logits


@pytest.mark.parametrize("kind", ["plain", "lora", "with_head"])
@pytest.mark.parametrize("keep", ["index", "last"])
def test_values_read_from_the_head_input_equal_the_last_hidden_states(tiny_model_dir, kind, keep):
    """Values at the positions with logits, read from the LM head's input, equal the value head applied
    to transformers' own last hidden states there; the capturing hook is gone afterwards."""
    from rlhfkit.models.forward import forward_with_values
    from rlhfkit.models.value_head import ModelWithValueHead

    model = _model(tiny_model_dir)
    if kind == "lora":
        model = _lora(model)
    head = _head(model.config.hidden_size)
    *_, ids, mask = _batch(PROMPTS, RESPONSES)
    positions = torch.tensor([2, 5, ids.shape[1] - 2]) if keep == "index" else torch.arange(ids.shape[1] - 4, ids.shape[1])
    logits_to_keep = positions if keep == "index" else 4
    runner, runner_head = (ModelWithValueHead(model, head), None) if kind == "with_head" else (model, head)
    with torch.no_grad():
        output, values = forward_with_values(runner, runner_head, ids, mask, logits_to_keep, at_logits=True)
        _, all_values = forward_with_values(runner, runner_head, ids, mask, logits_to_keep)
    assert values.shape == (len(PROMPTS), len(positions)) == output.logits.shape[:2]
    torch.testing.assert_close(values, all_values[:, positions], atol=1e-6, rtol=0)
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_values_follow_the_kept_positions_when_the_head_sees_every_position():
    """A model that runs its head on all positions and slices the logits afterwards."""
    from rlhfkit.models.forward import HeadInput, values_at_logits

    hidden = torch.randn(2, 7, 3)
    captured = HeadInput()
    captured.hidden = hidden
    head = torch.nn.Linear(3, 1)
    value = lambda h: head(h).squeeze(-1)  # noqa: E731
    index = torch.tensor([1, 4])
    torch.testing.assert_close(values_at_logits(captured, value, torch.zeros(2, 2, 11), index), value(hidden[:, index]))
    torch.testing.assert_close(values_at_logits(captured, value, torch.zeros(2, 3, 11), 3), value(hidden[:, -3:]))
    torch.testing.assert_close(values_at_logits(captured, value, torch.zeros(2, 7, 11), 0), value(hidden))


# -------------------------------------------------------------------------------- temperature


def test_response_forward_uses_temperature_scaled_logprobs(tiny_model_dir):
    model = _model(tiny_model_dir)
    head = _head(model.config.hidden_size)
    prompt, response = [11, 42, 7, 19, 30], [64, 3, 77, 2]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs, values, entropy = response_forward(model, head, ids, torch.ones_like(ids), torch.tensor([response]),
                                                     0.7, with_values=True, with_entropy=True)
        raw = model(input_ids=ids, use_cache=False).logits[0].double()  # (T, v)
    positions = range(len(prompt) - 1, len(prompt) + len(response) - 1)
    expected = torch.tensor([float(F.log_softmax(raw[p] / 0.7, -1)[t]) for p, t in zip(positions, response)])
    torch.testing.assert_close(logprobs[0], expected.float(), atol=1e-5, rtol=0)
    at_one = torch.tensor([float(F.log_softmax(raw[p], -1)[t]) for p, t in zip(positions, response)])
    assert (expected - at_one).abs().max() > 1e-3  # the temperature really changes the answer
    scaled = F.log_softmax(raw[len(prompt) - 1:len(prompt) + len(response) - 1] / 0.7, -1)
    torch.testing.assert_close(entropy[0], (-(scaled.exp() * scaled).sum(-1)).float(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- chunked rollout


@pytest.mark.parametrize("kind", ["same_model", "lora"])
def test_chunked_rollout_evaluation_equals_unchunked(tiny_model_dir, kind):
    base = _model(tiny_model_dir)
    hidden = base.config.hidden_size
    head = _head(hidden)
    if kind == "lora":
        plain_base = _model(tiny_model_dir)  # an untouched copy: the expected reference
        policy = _lora(base)

        def reference_context():
            return policy.disable_adapter()
    else:
        plain_base = policy = base
        reference_context = contextlib.nullcontext
    _, _, response, response_mask, ids, mask = _batch(PROMPTS, RESPONSES)
    one = evaluate_rollout(policy, head, policy, reference_context, ids, mask, response, 1.0, chunk_size=1)
    eight = evaluate_rollout(policy, head, policy, reference_context, ids, mask, response, 1.0, chunk_size=8)
    three = evaluate_rollout(policy, head, policy, reference_context, ids, mask, response, 1.0, chunk_size=3)
    assert set(one) == {"logprobs", "values", "entropy", "ref_logprobs"}
    for key in one:
        assert one[key].shape == response.shape, key
        for other in (eight, three):
            torch.testing.assert_close(other[key][response_mask], one[key][response_mask], atol=1e-5, rtol=0,
                                       msg=key)
    # Each row against the raw model on the unpadded sequence.
    for row, (prompt, reply) in enumerate(zip(PROMPTS, RESPONSES)):
        n = len(reply)
        with torch.no_grad():
            lp, values, entropy = _reference_row(policy, head, prompt, reply, 1.0)
            ref_lp, _, _ = _reference_row(plain_base, None, prompt, reply, 1.0)
        torch.testing.assert_close(one["logprobs"][row, :n], lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(one["values"][row, :n], values, atol=1e-5, rtol=0)
        torch.testing.assert_close(one["entropy"][row, :n], entropy, atol=1e-5, rtol=0)
        torch.testing.assert_close(one["ref_logprobs"][row, :n], ref_lp, atol=1e-5, rtol=0)
    differs = (one["logprobs"] - one["ref_logprobs"])[response_mask].abs().max()
    if kind == "lora":
        assert differs > 1e-3  # the reference really is the adapter-less base
        # The adapter is active again afterwards: the per-row policy check above ran after evaluate_rollout
        # and matched, and the reference context did not leave any LoRA layer disabled.
        assert policy.active_adapter == "default"
        assert not any(getattr(m, "disable_adapters", False) for m in policy.modules() if hasattr(m, "lora_A"))
    else:
        assert differs < 1e-6


# --------------------------------------------------------------------- accumulation in update


class StandInAccelerator:
    """The parts of accelerate.Accelerator that ppo_update_minibatch uses, on one process."""

    device = torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def _fixed_rollout(policy, head, seed: int = 0, dtype=torch.float32) -> Rollout:
    query, query_mask, response, response_mask, ids, mask = _batch(PROMPTS, RESPONSES)
    with torch.no_grad():
        logprobs, values, _ = response_forward(policy, head, ids, mask, response, 0.9)
    generator = torch.Generator().manual_seed(seed)
    float_mask = response_mask.to(dtype)
    shape = response.shape

    def noise(*size):
        return torch.randn(*size, generator=generator).to(dtype)

    # Old log-probs a little off the current ones, so some ratios leave the clip range.
    old_logprobs = (logprobs + 0.3 * noise(shape)) * float_mask
    old_values = (values + 0.3 * noise(shape)) * float_mask
    advantages = noise(shape) * float_mask
    returns = noise(shape) * float_mask
    return Rollout(query, query_mask, response, response_mask, noise(len(PROMPTS)),
                   old_logprobs, torch.zeros(shape, dtype=dtype), old_values, advantages, returns)


def _update_grads(policy, head, rollout, micro, accelerator):
    params = [(f"policy.{n}", p) for n, p in policy.named_parameters() if p.requires_grad]
    params += [(f"head.{n}", p) for n, p in head.named_parameters()]
    for _, p in params:
        p.grad = None
    loss_fn = PPOLoss(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.01)
    stats = ppo_update_minibatch(accelerator, policy, head, loss_fn, rollout, micro, 0.9, 1)
    grads = {name: p.grad.detach().clone() for name, p in params if p.grad is not None}
    assert len(grads) == len(params)
    return stats, grads


@pytest.mark.parametrize("policy_kind", ["full", "lora"])
@pytest.mark.parametrize("accelerator_kind", ["stand_in", "accelerate"])
def test_micro_batches_accumulate_to_one_large_batch(tiny_model_dir, policy_kind, accelerator_kind):
    """Float64, so the only differences left are rounding (micro-batches are sorted by length and
    trimmed of shared padding, which changes the kernels' reduction order, not the result)."""
    model = _model(tiny_model_dir).double()
    policy = _lora(model).double() if policy_kind == "lora" else model
    if policy_kind == "lora":
        for name, param in policy.named_parameters():
            param.requires_grad_("lora_" in name)
    policy.train()  # as in the stage loop; the tiny model has no dropout
    head = _head(model.config.hidden_size).double()
    rollout = _fixed_rollout(policy, head, dtype=torch.float64)
    if accelerator_kind == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    else:
        accelerator = StandInAccelerator()
    large_stats, large = _update_grads(policy, head, rollout, 4, accelerator)
    small_stats, small = _update_grads(policy, head, rollout, 1, accelerator)
    mixed_stats, mixed = _update_grads(policy, head, rollout, 3, accelerator)  # micro-batches of 3 and 1
    assert large_stats["policy_clipfrac"] > 0  # the clipped branch is exercised
    total = 0.0
    for name, grad in large.items():
        scale = float(grad.abs().max())
        total += scale
        for other in (small, mixed):
            torch.testing.assert_close(other[name], grad, rtol=1e-9, atol=1e-11 * max(scale, 1e-6), msg=name)
    assert total > 0
    assert set(small_stats) == set(large_stats)
    for key, value in large_stats.items():
        assert small_stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key  # log-probs are float32
        assert mixed_stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key  # log-probs are float32


def test_trimmed_rollout_drops_only_columns_padded_in_every_row():
    query, query_mask, response, response_mask, _, _ = _batch(PROMPTS, RESPONSES)  # prompts 6, 2, 9, 4
    values = torch.arange(response.numel(), dtype=torch.float32).reshape(response.shape)
    rollout = Rollout(query, query_mask, response, response_mask, torch.arange(4.0), values, values, values,
                      values, values)
    part = rollout.select(torch.tensor([1, 3])).trimmed()  # prompts of 2 and 4, responses of 7 and 4 tokens
    assert part.query_ids.shape == (2, 4) and part.response_ids.shape == (2, 7)
    assert part.query_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert part.query_ids[1].tolist() == PROMPTS[3] and part.query_ids[0, 2:].tolist() == PROMPTS[1]
    assert part.response_ids[0].tolist() == RESPONSES[1]
    assert torch.equal(part.advantages, values[[1, 3], :7]) and torch.equal(part.scores, torch.tensor([1.0, 3.0]))
    single = rollout.select(torch.tensor([2])).trimmed()  # the longest prompt, a one-token response
    assert single.query_ids.shape == (1, 9) and single.response_ids.shape == (1, 1)


# ------------------------------------------------------------------------------- torch_compile


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_update_and_eager_decoding(tiny_model_dir):
    """`torch_compile` changes kernels, not results: the update's gradients (micro-batches of 3 and 1,
    so two batch shapes go through the compiled blocks), the no-grad log-probs and the sampled tokens
    equal those of the same weights run eagerly."""
    from torch._dynamo.utils import counters
    from transformers import AutoTokenizer

    from rlhfkit.config import GenerationArguments
    from rlhfkit.models.compile import compile_blocks
    from rlhfkit.rollout.generation import HFGenerator

    counters.clear()
    policies = []
    for _ in range(2):
        policy = _lora(_model(tiny_model_dir))
        for name, param in policy.named_parameters():
            param.requires_grad_("lora_" in name)
        policy.train()
        policies.append(policy)
    eager, compiled = policies
    compiled.load_state_dict(eager.state_dict())  # the same adapter (LoRA A is drawn at random)
    assert compile_blocks(compiled) == compiled.config.num_hidden_layers
    head = _head(eager.config.hidden_size)
    rollout = _fixed_rollout(eager, head)
    ids, mask = rollout.sequences()
    with torch.no_grad():
        expected = response_forward(eager, head, ids, mask, rollout.response_ids, 0.9, with_entropy=True)
        got = response_forward(compiled, head, ids, mask, rollout.response_ids, 0.9, with_entropy=True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=0)
    eager_stats, eager_grads = _update_grads(eager, head, rollout, 3, StandInAccelerator())
    compiled_stats, compiled_grads = _update_grads(compiled, head, rollout, 3, StandInAccelerator())
    assert eager_stats["policy_clipfrac"] > 0
    assert counters["stats"]["unique_graphs"] > 0  # the compiled code ran
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per block: values come
    # from the head's input, not from transformers' per-layer output hooks
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)
    for key, value in eager_stats.items():
        assert compiled_stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    generator = HFGenerator(tokenizer, GenerationArguments(max_new_tokens=6, do_sample=False), [tokenizer.eos_token_id])
    query, query_mask = rollout.query_ids, rollout.query_mask
    tokens = [generator.generate(model, query, query_mask, record=record).response_ids
              for model in (eager, compiled) for record in (True, False)]
    assert all(torch.equal(t, tokens[0]) for t in tokens[1:])


@pytest.mark.slow
def test_a_compile_memory_budget_saves_fewer_activations_for_the_same_gradients(tiny_model_dir):
    """`torch_compile_memory_budget` below 1 makes the compiled blocks save less for the backward
    pass (they recompute cheap operations) and leaves the gradients as they were."""
    import torch._functorch.config

    from rlhfkit.models.compile import compile_blocks

    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(5))
    saved, grads = {}, {}
    # compile_blocks sets the process-wide budget; `patch` puts it back afterwards
    with torch._functorch.config.patch(activation_memory_budget=torch._functorch.config.activation_memory_budget):
        for budget in (1.0, 0.2):
            torch._dynamo.reset()  # each budget compiles afresh (the setting is read at compilation)
            torch.manual_seed(0)  # the same LoRA A
            policy = _lora(_model(tiny_model_dir))
            for name, param in policy.named_parameters():
                param.requires_grad_("lora_" in name)
            compile_blocks(policy, memory_budget=budget)
            for _ in range(2):  # the first pass compiles; measure the second
                total = 0

                def pack(tensor):
                    nonlocal total
                    total += tensor.numel() * tensor.element_size()
                    return tensor

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    loss = policy(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
                policy.zero_grad(set_to_none=True)
                loss.backward()
            saved[budget] = total
            grads[budget] = {name: param.grad.clone() for name, param in policy.named_parameters()
                             if param.grad is not None}
    torch._dynamo.reset()
    assert saved[0.2] < 0.9 * saved[1.0], saved
    assert grads[1.0].keys() == grads[0.2].keys() and grads[1.0]
    for name, grad in grads[1.0].items():
        torch.testing.assert_close(grads[0.2][name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)
