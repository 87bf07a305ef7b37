"""The pieces that make several processes behave like one, checked on one process.

The multi-process equivalences themselves are in test_distributed.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from conftest import OneProcessAccelerator, float64_tolerance, log_softmax_tolerance, random_lora
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.value_head import ModelWithValueHead, ValueHead
from rlhfkit.rewards.model import active_adapter
from rlhfkit.rl import masked_whiten
from rlhfkit.rollout import check_generation_supported, full_weights_for_generation
from rlhfkit.stages.ppo_steps import response_forward
from rlhfkit.training.batches import rank_share, step_batches
from rlhfkit.training.distributed import global_masked_whiten, global_sums, micro_batch_context


# ------------------------------------------------------------------------------- data shares


def test_rank_share_splits_a_step_and_pads_short_shares():
    # 5 samples over 2 processes: 3 and 2, the second padded with the step's first sample.
    assert rank_share([7, 3, 9, 1, 4], 0, 2) == ([7, 9, 4], 3)
    assert rank_share([7, 3, 9, 1, 4], 1, 2) == ([3, 1, 7], 2)
    # 1 sample over 2 processes: the second holds only padding.
    assert rank_share([6], 1, 2) == ([6], 0)
    # Even split and one process: no padding.
    assert rank_share([1, 2, 3, 4], 1, 2) == ([2, 4], 2)
    assert rank_share([1, 2, 3], 0, 1) == ([1, 2, 3], 3)
    # Every sample is real in exactly one share.
    indices = list(range(11))
    shares = [rank_share(indices, rank, 4) for rank in range(4)]
    assert sorted(i for share, real in shares for i in share[:real]) == indices
    assert {len(share) for share, _ in shares} == {3}


def test_step_batches_fill_last_tops_up_from_the_same_epoch():
    plain = list(zip(range(3), step_batches(10, 4, seed=1)))
    filled = list(zip(range(3), step_batches(10, 4, seed=1, fill_last=True)))
    assert [len(b.indices) for _, b in plain] == [4, 4, 2]
    assert [len(b.indices) for _, b in filled] == [4, 4, 4]
    order = plain[0][1].indices + plain[1][1].indices + plain[2][1].indices
    assert sorted(order) == list(range(10))
    assert filled[2][1].indices == plain[2][1].indices + order[:2]
    assert [b.indices for _, b in filled[:2]] == [b.indices for _, b in plain[:2]]


# -------------------------------------------------------------------------- global statistics


def test_global_sums_and_whitening_on_one_process_match_the_definitions():
    accelerator = OneProcessAccelerator()
    assert global_sums(accelerator, 2, torch.tensor(3.5), 0.25) == [2.0, 3.5, 0.25]
    values = torch.tensor([[1.0, 2.0, 6.0, 9.0], [3.0, -1.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # Masked elements 1, 2, 6, 3, -1: mean 2.2, unbiased variance (1.44+0.04+14.44+0.64+10.24)/4 = 6.7.
    expected = (values - 2.2) / (6.7 + 1e-8) ** 0.5 * mask
    atol = float64_tolerance(values, 5)  # float64 sums of the 5 masked elements
    whitened = global_masked_whiten(accelerator, values, mask)
    torch.testing.assert_close(whitened, expected, atol=atol, rtol=0)
    torch.testing.assert_close(whitened, masked_whiten(values, mask), atol=atol, rtol=0)
    kept = global_masked_whiten(accelerator, values, mask, keep_mean=True)
    torch.testing.assert_close(kept, (expected + 2.2) * mask, atol=atol, rtol=0)


# ------------------------------------------------------------------------- adapter switching


def _two_adapter_model(model_dir):
    """A float64 peft model with a trainable `default` adapter and a frozen `reward` one, both non-zero."""
    torch.manual_seed(0)
    model = random_lora(AutoModelForCausalLM.from_pretrained(model_dir), 0, ("q_proj", "v_proj"))
    model.add_adapter("reward", LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.reward" in name:
                param.normal_(std=0.3)
    model.base_model.set_adapter("default")  # `default` trainable, `reward` frozen
    for name, param in model.named_parameters():
        param.requires_grad_(".default." in name)
    return model.double().eval()


def test_active_adapter_routes_like_peft_and_leaves_requires_grad_alone(tiny_model_dir):
    model = _two_adapter_model(tiny_model_dir)
    ids = torch.tensor([[5, 17, 40, 33, 8, 61, 72, 21]])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    policy = logits()
    atol = float64_tolerance(policy, model.config.hidden_size)  # the same float64 forward, rerouted
    with model.disable_adapter():
        base = logits()
    model.base_model.set_adapter("reward")
    reward = logits()
    model.base_model.set_adapter("default")
    for name, param in model.named_parameters():  # peft's set_adapter changed requires_grad; restore it
        param.requires_grad_(name in trainable)
    assert (policy - base).abs().max() > 1e-3 and (reward - base).abs().max() > 1e-3

    for name, expected in ((None, base), ("reward", reward)):
        with active_adapter(model, name):
            torch.testing.assert_close(logits(), expected, atol=atol, rtol=0)
            assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
        torch.testing.assert_close(logits(), policy, atol=atol, rtol=0)
        assert model.active_adapter == "default"
    with pytest.raises(RuntimeError):  # restored on errors too
        with active_adapter(model, "reward"):
            raise RuntimeError("boom")
    torch.testing.assert_close(logits(), policy, atol=atol, rtol=0)


# --------------------------------------------------------------------- the policy + head module


def test_model_with_value_head_gives_what_the_separate_head_gives(tiny_model_dir):
    """Float64 model and head: the same algebra on both routes, so values agree to float64 rounding and
    rlhfkit's float32 log-probs and entropies to one float32 log-softmax of these logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double().eval()
    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size, zero_init=False).double()
    combined = ModelWithValueHead(model, head)
    ids = torch.tensor([[0, 0, 5, 17, 40, 33, 8, 61], [9, 9, 44, 81, 23, 50, 3, 27]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    response = ids[:, -3:]
    with torch.no_grad():
        separate = response_forward(model, head, ids, mask, response, 0.8, with_values=True, with_entropy=True)
        inside = response_forward(combined, None, ids, mask, response, 0.8, with_values=True, with_entropy=True)
        lm_only = response_forward(combined, None, ids, mask, response, 0.8, with_values=False)
        raw = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    lp_atol = log_softmax_tolerance(raw.logits, temperature=0.8)
    hidden = raw.hidden_states[-1]
    value_atol = float64_tolerance((hidden * head.summary.weight[0]).abs().sum(-1) + head.summary.bias.abs(),
                                   model.config.intermediate_size)
    for a, b, atol in zip(separate, inside, (lp_atol, value_atol, lp_atol)):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)
    torch.testing.assert_close(lm_only[0], separate[0], atol=lp_atol, rtol=0)
    assert lm_only[1] is None
    assert combined._no_split_modules == model._no_split_modules


def test_generation_weights_on_one_process_are_the_model_itself():
    model = torch.nn.Linear(2, 2)
    with full_weights_for_generation(OneProcessAccelerator(), model) as unwrapped:
        assert unwrapped is model


# ------------------------------------------------------- paths that need GPUs or DeepSpeed to run


def test_deepspeed_gets_its_accumulation_boundary_from_the_last_micro_batch():
    flags = []
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  gradient_state=SimpleNamespace(_set_sync_gradients=flags.append))
    for last in (False, False, True):
        with micro_batch_context(accelerator, None, last):
            flags.append(f"backward last={last}")
    # Inside each micro-batch the flag is the boundary; afterwards it is back to True.
    assert flags == [False, "backward last=False", True, False, "backward last=False", True,
                     True, "backward last=True", True]


def test_ppo_refuses_fsdp1_with_a_one_line_message():
    def accelerator(version):
        return SimpleNamespace(distributed_type=DistributedType.FSDP,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))

    with pytest.raises(RlhfkitError, match="fsdp_version: 2") as error:
        check_generation_supported(accelerator(1))
    assert "\n" not in str(error.value)
    check_generation_supported(accelerator(2))
    check_generation_supported(OneProcessAccelerator())
