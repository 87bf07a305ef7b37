"""Invariances of PPO's forward passes and update on the tiny model, without running the stage.

Expected values come from plain forward passes of the unpadded sequences through the raw model
(`log_softmax` of its logits, the head's linear map of its hidden states), never from rlhfkit.
The model and head run in float64 (the same algebra in another order: padding, chunking, kept
positions), so values agree to float64 rounding; log-probs and entropies, which rlhfkit computes
in float32 by design, to one float32 log-softmax of the same logits (see conftest).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import (
    PAD_ID,
    TINY_VOCAB,
    TINY_WIDEST,
    OneProcessAccelerator,
    float32_tolerance,
    float64_tolerance,
    gradient_tolerances,
    log_softmax_tolerance,
    pad_prompts_and_responses,
    random_lora,
    random_value_head,
    raw_response_stats,
    statistic_tolerances,
)
from rlhfkit.rl import PPOLoss
import rlhfkit
from rlhfkit.stages.ppo_steps import (
    Rollout,
    evaluate_rollout,
    micro_batch_bounds,
    padding_bounds,
    ppo_update_minibatch,
    response_forward,
)


def _model(model_dir, attn="sdpa", dtype=torch.float64):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn).to(dtype)
    model.eval()
    return model


def _head(hidden: int, dtype=torch.float64, seed: int = 0):
    return random_value_head(hidden, seed, std=0.5, bias=0.1).to(dtype)


def _lora(model, seed: int = 1):
    """A LoRA policy whose adapter is not the identity (B is randomised), so it differs from the base."""
    peft = random_lora(model, seed).to(model.dtype)
    peft.eval()
    return peft


def _logprob_atol(*stats) -> float:
    """float32 log-softmax over the vocabulary of logits as large as the raw passes' (rule 2)."""
    return log_softmax_tolerance(max(s.logit_scale for s in stats), TINY_VOCAB)


def _value_atol(*stats, dtype=torch.float64) -> float:
    """Values in `dtype`: the head's summands as large as the raw passes', over the widest layer
    (rules 2 and 3)."""
    tolerance = float64_tolerance if dtype == torch.float64 else float32_tolerance
    return tolerance(max(s.value_scale for s in stats), TINY_WIDEST)


PROMPTS = [[5, 17, 40, 33, 8, 61], [70, 12], [9, 9, 9, 44, 81, 23, 50, 3, 27], [66, 31, 15, 88]]
RESPONSES = [[21, 34, 2], [45, 46, 47, 48, 49, 50, 51], [90], [13, 57, 24, 2]]


# ------------------------------------------------------------------------------- left padding


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padding_does_not_change_logprobs_or_values(tiny_model_dir, attn):
    """sdpa in float64; eager in float32, its only path here: in float64 transformers' eager masking of
    padded rows (every key masked) gives NaN, which the next layer's products carry to real tokens."""
    dtype = torch.float64 if attn == "sdpa" else torch.float32
    model = _model(tiny_model_dir, attn, dtype)
    head = _head(model.config.hidden_size, dtype)
    prompt, response = [5, 17, 40, 33, 8, 61, 72], [21, 34, 55, 2]

    def forward(pads: int, attend_to_pads: bool = False):
        ids = torch.tensor([[PAD_ID] * pads + prompt + response])
        mask = torch.tensor([[int(attend_to_pads)] * pads + [1] * (len(prompt) + len(response))])
        with torch.no_grad():
            return response_forward(model, head, ids, mask, torch.tensor([response]), 1.0,
                                    with_values=True, with_entropy=True)

    (lp0, v0, e0), (lp5, v5, e5) = forward(0), forward(5)
    assert lp0.shape == v0.shape == e0.shape == (1, len(response))
    expected = raw_response_stats(model, head, prompt, response, 1.0)
    lp_atol, v_atol = _logprob_atol(expected), _value_atol(expected, dtype=dtype)
    torch.testing.assert_close(lp5, lp0, atol=lp_atol, rtol=0)
    torch.testing.assert_close(v5, v0, atol=v_atol, rtol=0)
    torch.testing.assert_close(e5, e0, atol=lp_atol, rtol=0)
    # ... and both equal the unpadded computation from the raw model.
    torch.testing.assert_close(lp0[0].double(), expected.logprobs, atol=lp_atol, rtol=0)
    torch.testing.assert_close(v0[0].double(), expected.values, atol=v_atol, rtol=0)
    torch.testing.assert_close(e0[0].double(), expected.entropy, atol=lp_atol, rtol=0)
    # Padding that is attended to changes them by far more than those tolerances.
    lp_seen, v_seen, _ = forward(5, attend_to_pads=True)
    assert (lp_seen - lp0).abs().max() > 1e-3 and (v_seen - v0).abs().max() > 1e-3


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
    *_, ids, mask = pad_prompts_and_responses(PROMPTS, RESPONSES, PAD_ID)
    positions = torch.tensor([2, 5, ids.shape[1] - 2]) if keep == "index" else torch.arange(ids.shape[1] - 4, ids.shape[1])
    logits_to_keep = positions if keep == "index" else 4
    runner, runner_head = (ModelWithValueHead(model, head), None) if kind == "with_head" else (model, head)
    with torch.no_grad():
        output, values = forward_with_values(runner, runner_head, ids, mask, logits_to_keep, at_logits=True)
        _, all_values = forward_with_values(runner, runner_head, ids, mask, logits_to_keep)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert values.shape == (len(PROMPTS), len(positions)) == output.logits.shape[:2]
    # The same float64 network through the head on another shape: float64 rounding (see conftest).
    summands = (hidden[:, positions] * head.summary.weight[0]).abs().sum(-1) + head.summary.bias.abs()
    torch.testing.assert_close(values, all_values[:, positions], atol=float64_tolerance(summands, TINY_WIDEST), rtol=0)
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
    # The same head on the same rows of the same tensor: equal to the bit.
    assert torch.equal(values_at_logits(captured, value, torch.zeros(2, 2, 11), index), value(hidden[:, index]))
    assert torch.equal(values_at_logits(captured, value, torch.zeros(2, 3, 11), 3), value(hidden[:, -3:]))
    assert torch.equal(values_at_logits(captured, value, torch.zeros(2, 7, 11), 0), value(hidden))


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
    expected = torch.tensor([float(F.log_softmax(raw[p] / 0.7, -1)[t]) for p, t in zip(positions, response)],
                            dtype=torch.float64)
    scaled_logits = raw[len(prompt) - 1:len(prompt) + len(response) - 1] / 0.7  # (n, v)
    atol = log_softmax_tolerance(scaled_logits)  # one float32 log-softmax of these logits
    torch.testing.assert_close(logprobs[0].double(), expected, atol=atol, rtol=0)
    at_one = torch.tensor([float(F.log_softmax(raw[p], -1)[t]) for p, t in zip(positions, response)],
                          dtype=torch.float64)
    assert (expected - at_one).abs().max() > 1e-3  # the temperature really changes the answer
    scaled = F.log_softmax(scaled_logits, -1)
    torch.testing.assert_close(entropy[0].double(), -(scaled.exp() * scaled).sum(-1), atol=atol, rtol=0)


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
    _, _, response, response_mask, ids, mask = pad_prompts_and_responses(PROMPTS, RESPONSES, PAD_ID)
    one, eight, three = (vars(evaluate_rollout(policy, head, policy, reference_context, ids, mask, response, 1.0,
                                               chunk_size=chunk)) for chunk in (1, 8, 3))  # Evaluation fields
    assert set(one) == {"logprobs", "values", "entropy", "ref_logprobs"}
    # Each row against the raw model on the unpadded sequence.
    rows = [(raw_response_stats(policy, head, prompt, reply, 1.0), raw_response_stats(plain_base, None, prompt, reply,
                                                                                      1.0))
            for prompt, reply in zip(PROMPTS, RESPONSES)]
    lp_atol = _logprob_atol(*(s for row in rows for s in row))
    # evaluate_rollout returns float32: the float64 values rounded once.
    value_atol = float32_tolerance(max(float(policy_row.values.abs().max()) for policy_row, _ in rows))
    atol = {"logprobs": lp_atol, "entropy": lp_atol, "ref_logprobs": lp_atol, "values": value_atol}
    for key in one:
        assert one[key].shape == response.shape, key
        for other in (eight, three):
            torch.testing.assert_close(other[key][response_mask], one[key][response_mask], atol=atol[key], rtol=0,
                                       msg=key)
    for row, (policy_row, reference_row) in enumerate(rows):
        n = len(RESPONSES[row])
        torch.testing.assert_close(one["logprobs"][row, :n].double(), policy_row.logprobs, atol=lp_atol, rtol=0)
        torch.testing.assert_close(one["values"][row, :n].double(), policy_row.values, atol=value_atol, rtol=0)
        torch.testing.assert_close(one["entropy"][row, :n].double(), policy_row.entropy, atol=lp_atol, rtol=0)
        torch.testing.assert_close(one["ref_logprobs"][row, :n].double(), reference_row.logprobs, atol=lp_atol,
                                   rtol=0)
    differs = (one["logprobs"] - one["ref_logprobs"])[response_mask].abs().max()
    if kind == "lora":
        assert differs > 1e-3  # the reference really is the adapter-less base
        # The adapter is active again afterwards: the per-row policy check above ran after evaluate_rollout
        # and matched, and the reference context did not leave any LoRA layer disabled.
        assert policy.active_adapter == "default"
        assert not any(getattr(m, "disable_adapters", False) for m in policy.modules() if hasattr(m, "lora_A"))
    else:
        assert differs <= lp_atol  # the policy is its own reference


# --------------------------------------------------------------------- accumulation in update


def _fixed_rollout(policy, head, seed: int = 0, dtype=torch.float32) -> Rollout:
    query, query_mask, response, response_mask, ids, mask = pad_prompts_and_responses(PROMPTS, RESPONSES, PAD_ID)
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


def _gradient_tolerances(grads: dict[str, torch.Tensor], positions: int) -> tuple[float, float]:
    """The log-probs go through rlhfkit's float32 log-softmax (by design, also for a float64 model), so
    the update's gradients are exact only to float32 rounding, over positions x `TINY_WIDEST` terms."""
    return gradient_tolerances(grads, positions * TINY_WIDEST, float32_tolerance)


@pytest.mark.parametrize("policy_kind", ["full", "lora"])
@pytest.mark.parametrize("accelerator_kind", ["stand_in", "accelerate"])
def test_micro_batches_accumulate_to_one_large_batch(tiny_model_dir, policy_kind, accelerator_kind):
    """Float64, so the only differences left are rounding (micro-batches are sorted by length and
    trimmed of shared padding, which changes the kernels' reduction order, not the result)."""
    model = _model(tiny_model_dir)
    policy = _lora(model) if policy_kind == "lora" else model
    if policy_kind == "lora":
        for name, param in policy.named_parameters():
            param.requires_grad_("lora_" in name)
    policy.train()  # as in the stage loop; the tiny model has no dropout
    head = _head(model.config.hidden_size)
    rollout = _fixed_rollout(policy, head, dtype=torch.float64)
    if accelerator_kind == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    else:
        accelerator = OneProcessAccelerator()
    large_stats, large = _update_grads(policy, head, rollout, 4, accelerator)
    small_stats, small = _update_grads(policy, head, rollout, 1, accelerator)
    mixed_stats, mixed = _update_grads(policy, head, rollout, 3, accelerator)  # micro-batches of 3 and 1
    assert large_stats["policy_clipfrac"] > 0  # the clipped branch is exercised
    positions = rollout.sequences()[0].numel()
    grad_rtol, grad_atol = _gradient_tolerances(large, positions)
    stat_rel, stat_abs = statistic_tolerances(large_stats, positions)  # token-weighted means of float32 terms
    total = 0.0
    for name, grad in large.items():
        total += float(grad.abs().max())
        for other in (small, mixed):
            torch.testing.assert_close(other[name], grad, rtol=grad_rtol, atol=grad_atol, msg=name)
    assert total > 0
    assert set(small_stats) == set(large_stats)
    for key, value in large_stats.items():
        assert small_stats[key] == pytest.approx(value, rel=stat_rel, abs=stat_abs), key
        assert mixed_stats[key] == pytest.approx(value, rel=stat_rel, abs=stat_abs), key


def test_trimmed_rollout_drops_only_columns_padded_in_every_row():
    query, query_mask, response, response_mask, _, _ = pad_prompts_and_responses(PROMPTS, RESPONSES, PAD_ID)  # prompts 6, 2, 9, 4
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
        policy = _lora(_model(tiny_model_dir, dtype=torch.float32))
        for name, param in policy.named_parameters():
            param.requires_grad_("lora_" in name)
        policy.train()
        policies.append(policy)
    eager, compiled = policies
    compiled.load_state_dict(eager.state_dict())  # the same adapter (LoRA A is drawn at random)
    compiled_blocks = compile_blocks(compiled)
    assert compiled_blocks == compiled.config.num_hidden_layers
    head = _head(eager.config.hidden_size, dtype=torch.float32)
    rollout = _fixed_rollout(eager, head)
    ids, mask = rollout.sequences()
    with torch.no_grad():
        expected = response_forward(eager, head, ids, mask, rollout.response_ids, 0.9, with_entropy=True)
        got = response_forward(compiled, head, ids, mask, rollout.response_ids, 0.9, with_entropy=True)
        raw = eager(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # Other float32 kernels: a log-softmax over the vocabulary of these logits (log-probs, entropy),
    # the head's sum over the hidden size of these summands (values).
    hidden = raw.hidden_states[-1]
    value_summands = (hidden * head.summary.weight[0]).abs().sum(-1) + head.summary.bias.abs()
    lp_atol = log_softmax_tolerance(raw.logits, temperature=0.9)
    for e, g, atol in zip(expected, got, (lp_atol, float32_tolerance(value_summands, TINY_WIDEST), lp_atol)):
        torch.testing.assert_close(g, e, atol=atol, rtol=0)
    eager_stats, eager_grads = _update_grads(eager, head, rollout, 3, OneProcessAccelerator())
    compiled_stats, compiled_grads = _update_grads(compiled, head, rollout, 3, OneProcessAccelerator())
    assert eager_stats["policy_clipfrac"] > 0
    assert counters["stats"]["unique_graphs"] > 0  # the compiled code ran
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per block: values come
    # from the head's input, not from transformers' per-layer output hooks
    grad_rtol, grad_atol = _gradient_tolerances(eager_grads, ids.numel())
    stat_rel, stat_abs = statistic_tolerances(eager_stats, ids.numel())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=grad_rtol, atol=grad_atol, msg=name)
    for key, value in eager_stats.items():
        assert compiled_stats[key] == pytest.approx(value, rel=stat_rel, abs=stat_abs), key
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
            policy = _lora(_model(tiny_model_dir, dtype=torch.float32))
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
    rtol, atol = _gradient_tolerances(grads[1.0], ids.numel())
    for name, grad in grads[1.0].items():
        torch.testing.assert_close(grads[0.2][name], grad, rtol=rtol, atol=atol, msg=name)


# --------------------------------------------------------------------- host reads in the update


def test_micro_batch_bounds_equal_each_micro_batchs_padding_bounds():
    """Ragged left-padded prompts and right-padded responses, rows without any real prompt or response
    token included: the bounds read at once equal `padding_bounds` of each run of rows."""
    generator = torch.Generator().manual_seed(0)
    rows, width, response_width = 11, 7, 6
    prompt_lengths = torch.randint(0, width + 1, (rows,), generator=generator)
    response_lengths = torch.randint(0, response_width + 1, (rows,), generator=generator)
    query_mask = (torch.arange(width) >= width - prompt_lengths[:, None]).long()  # left padding
    response_mask = torch.arange(response_width) < response_lengths[:, None]  # right padding
    query_mask[3:6], response_mask[3:6] = 0, False  # a run of rows with nothing real
    for size in (1, 2, 3, 4, 11, 16):
        expected = [padding_bounds(query_mask[b:b + size], response_mask[b:b + size]) for b in range(0, rows, size)]
        assert micro_batch_bounds(query_mask, response_mask, size) == expected, size


@contextlib.contextmanager
def host_reads_by_rlhfkit():
    """Counts the tensor reads by the host (bool/float/int/index conversions, item, tolist) that rlhfkit's
    own code makes inside: on an accelerator each waits for the device's queued work."""
    package = str(Path(rlhfkit.__file__).parent)
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(original):
        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                count[0] += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        yield count
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@pytest.mark.parametrize("policy_kind", ["full", "lora"])
def test_the_update_reads_the_device_per_mini_batch_not_per_micro_batch(tiny_model_dir, policy_kind):
    """One mini-batch of 4 rows in 4 micro-batches or in 1: the host reads the device as often, so it
    queues each micro-batch's passes while the device still runs the previous one's."""
    model = _model(tiny_model_dir)
    policy = _lora(model) if policy_kind == "lora" else model
    head = _head(model.config.hidden_size)
    rollout = _fixed_rollout(policy, head, dtype=torch.float64)
    loss_fn = PPOLoss(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.01)
    reads = {}
    for micro in (4, 1):
        with host_reads_by_rlhfkit() as count:
            ppo_update_minibatch(OneProcessAccelerator(), policy, head, loss_fn, rollout, micro, 0.9, 1)
        reads[micro] = count[0]
    assert reads[1] == reads[4] > 0, reads


def test_the_evaluate_phase_reads_the_device_once_for_all_its_chunks(tiny_model_dir):
    """Old log-probs, values and reference log-probs in chunks of 1 or of 4 rows: as many host reads."""
    model = _model(tiny_model_dir)
    head = _head(model.config.hidden_size)
    _, _, response, _, ids, mask = pad_prompts_and_responses(PROMPTS, RESPONSES, PAD_ID)
    reads = {}
    for chunk in (4, 1):
        with host_reads_by_rlhfkit() as count:
            evaluate_rollout(model, head, model, contextlib.nullcontext, ids, mask, response, 1.0, chunk_size=chunk)
        reads[chunk] = count[0]
    assert reads[1] == reads[4] > 0, reads
