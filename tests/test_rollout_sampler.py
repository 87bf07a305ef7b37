"""The recording decode loop against the exact computation and against `model.generate`.

PPO takes the policy's old log-probs, values and entropies from the sampling passes
(`logprobs_from_rollout`); here they are checked against plain full forward passes of the
unpadded sequences through the raw model (`log_softmax` of its logits, the head's linear map of
its hidden states), and the loop's greedy tokens against `model.generate`'s.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    EOS_ID,
    TINY_VOCAB,
    float32_tolerance,
    float64_tolerance,
    log_softmax_tolerance,
    raw_response_stats,
)
from rlhfkit.config import GenerationArguments
from rlhfkit.models.value_head import ValueHead
from rlhfkit.rollout import HFGenerator
from rlhfkit.cpu.sampling import sample_from_probs


def _prompts(tokenizer):
    texts = ["hello there", "a", "write abc please", "xyz"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)  # left padding
    return batch["input_ids"], batch["attention_mask"]


def _setup(model_dir, lora=False, dtype=torch.float32):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(3)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    model.to(dtype).eval()
    torch.manual_seed(1)
    head = ValueHead(model.config.hidden_size, zero_init=False).to(dtype)
    return tokenizer, model, head


def _exact(model, head, prompt_ids, prompt_mask, response_ids, response_mask, temperature):
    """Float64 log-probs, values and entropies of each row's real tokens from one plain forward pass, and
    the largest |logit / temperature| among them."""
    logprobs = torch.zeros(response_ids.shape, dtype=torch.float64)
    values, entropy = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    logit_scale = 0.0
    for row in range(response_ids.shape[0]):
        prompt = prompt_ids[row][prompt_mask[row].bool()].tolist()
        response = response_ids[row][response_mask[row]].tolist()
        stats = raw_response_stats(model, head, prompt, response, temperature)
        count = len(response)
        logprobs[row, :count], values[row, :count], entropy[row, :count] = stats.logprobs, stats.values, stats.entropy
        logit_scale = max(logit_scale, stats.logit_scale)
    return logprobs, values, entropy, logit_scale


@pytest.mark.parametrize("lora", [False, True])
def test_recorded_logprobs_values_entropy_equal_a_full_forward_pass(tiny_model_dir, lora):
    """In float64 (the decoding loop's KV cache and the full pass sum in other orders): the recorded
    float32 log-probs and entropies are one float32 log-softmax of the same logits, the recorded values
    the float64 values rounded once to float32."""
    tokenizer, model, head = _setup(tiny_model_dir, lora, torch.float64)
    args = GenerationArguments(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=12)
    generator = HFGenerator(tokenizer, args, [EOS_ID])
    prompt_ids, prompt_mask = _prompts(tokenizer)
    torch.manual_seed(0)
    batch = generator.generate(model, prompt_ids, prompt_mask, record=True, value_head=head)
    assert batch.logprobs.shape == batch.values.shape == batch.entropy.shape == batch.response_ids.shape
    logprobs, values, entropy, logit_scale = _exact(model, head, prompt_ids, prompt_mask, batch.response_ids,
                                                    batch.response_mask, temperature=0.7)
    mask = batch.response_mask
    assert mask.sum() > 10
    lp_atol = log_softmax_tolerance(logit_scale, TINY_VOCAB)
    # Log-probs are of the raw logits at the temperature (top-k/top-p only choose the tokens).
    torch.testing.assert_close(batch.logprobs[mask].double(), logprobs[mask], atol=lp_atol, rtol=0)
    torch.testing.assert_close(batch.values[mask].double(), values[mask], atol=float32_tolerance(values[mask]), rtol=0)
    torch.testing.assert_close(batch.entropy[mask].double(), entropy[mask], atol=lp_atol, rtol=0)


def test_greedy_tokens_equal_generate(tiny_model_dir):
    tokenizer, model, head = _setup(tiny_model_dir)
    args = GenerationArguments(do_sample=False, max_new_tokens=10, repetition_penalty=1.3)
    generator = HFGenerator(tokenizer, args, [EOS_ID])
    prompt_ids, prompt_mask = _prompts(tokenizer)
    ours = generator.generate(model, prompt_ids, prompt_mask, record=True, value_head=head)
    theirs = generator.generate(model, prompt_ids, prompt_mask)
    assert torch.equal(ours.response_ids, theirs.response_ids)
    assert torch.equal(ours.response_mask, theirs.response_mask)
    assert torch.equal(ours.ended_with_stop, theirs.ended_with_stop)


def test_min_new_tokens_keeps_stop_tokens_out(tiny_model_dir):
    tokenizer, model, _ = _setup(tiny_model_dir)
    # Make EOS the likeliest token everywhere: without min_new_tokens every row would stop at once.
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] = model.lm_head.weight.abs().max() * 10
        model.model.embed_tokens.weight[EOS_ID] = model.lm_head.weight[EOS_ID]
    args = GenerationArguments(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6,
                               min_new_tokens=6)
    prompt_ids, prompt_mask = _prompts(tokenizer)
    for record in (True, False):
        batch = HFGenerator(tokenizer, args, [EOS_ID]).generate(model, prompt_ids, prompt_mask, record=record)
        assert batch.response_mask.all() and batch.response_ids.shape == (4, 6)
        assert not (batch.response_ids == EOS_ID).any()


def test_inverse_cdf_sampling_frequencies():
    # Row 0: p = [0.1, 0, 0.6, 0.3]; row 1 unnormalised [2, 2, 0, 4] -> [0.25, 0.25, 0, 0.5].
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [2.0, 2.0, 0.0, 4.0]])
    draws = 40000
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 4)
    for _ in range(draws // 1000):
        picked = torch.stack([sample_from_probs(probs, generator) for _ in range(1000)])  # (1000, 2)
        counts += torch.nn.functional.one_hot(picked, 4).sum(0).float()  # (2, 4)
    frequencies = counts / draws
    expected = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.0, 0.5]])
    # Binomial standard deviation at most sqrt(0.25 / 40000) = 0.0025; allow 4 of them.
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
    assert counts[0, 1] == 0 and counts[1, 2] == 0


def test_fast_path_samples_generate_distribution():
    # Temperature and minimum length only: our sampling probabilities, normalised, equal the
    # softmax of transformers' processed scores (the distribution `generate` samples from).
    from transformers.generation import LogitsProcessorList, MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper

    from rlhfkit.rollout.sampler import SamplingSettings, logits_processors, recorded_distribution

    settings = SamplingSettings(max_new_tokens=8, stop_token_ids=[2, 5], pad_token_id=0, temperature=0.7,
                                min_new_tokens=3)
    assert logits_processors(settings, prompt_length=4) is None
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    stop_ids = torch.tensor([2, 5])
    hf = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(4, 3, [2, 5]), TemperatureLogitsWarper(0.7)])
    atol = float64_tolerance(logits / 0.7, logits.shape[-1])  # float64: a softmax of these logits
    for generated, ban in ((1, True), (3, False)):
        sequence = torch.zeros(3, 4 + generated, dtype=torch.long)
        expected = torch.softmax(hf(sequence, logits.clone()), -1)
        _, _, sampling = recorded_distribution(logits, 0.7, stop_ids, ban_stops=ban)
        torch.testing.assert_close(sampling / sampling.sum(-1, keepdim=True), expected, atol=atol, rtol=0)
        assert (expected[:, [2, 5]] == 0).all() == ban  # the minimum length really bans the stop tokens


def test_banned_stop_tokens_leave_the_others_renormalised_even_when_they_held_all_the_mass():
    """Row 0 an ordinary row (stop probabilities zeroed, the rest as they were);
    row 1 a stop token 2000 nats above the rest, whose other probabilities underflow in exp(lsm):
    the sampling row is then the softmax over the others (uniform here), not all zeros."""
    from rlhfkit.rollout.sampler import recorded_distribution

    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0], [0.0, 0.0, 0.0, 2000.0]], dtype=torch.float32)
    stop_ids = torch.tensor([3])
    lsm, probs, sampling = recorded_distribution(logits, 1.0, stop_ids, ban_stops=True)
    expected_row0 = torch.softmax(logits[0].double(), -1)
    expected_row0[3] = 0.0
    # a float32 log-softmax's absolute error is the probabilities' relative error
    torch.testing.assert_close(sampling[0].double(), expected_row0, rtol=log_softmax_tolerance(logits[0]), atol=0)
    assert probs[1, :3].sum() == 0  # underflowed: zeroing the stop token would leave nothing
    torch.testing.assert_close(sampling[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]), rtol=0,
                               atol=float32_tolerance(1.0, 4))
    _, plain, unbanned = recorded_distribution(logits, 1.0, stop_ids, ban_stops=False)
    assert unbanned is plain  # nothing banned: the recorded probabilities themselves
