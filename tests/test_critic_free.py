"""The critic-free estimators on the `ppo` loop: groups of num_generations responses, no value head,
KL as a loss term, filtered groups; GRPO learns a rule reward on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cpu_config
from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.value_head import VALUE_HEAD_FILE
from rlhfkit.rl import PPOLoss
from rlhfkit.stages import run_stage
from rlhfkit.stages.ppo_advantages import estimate_advantages, informative_groups
from rlhfkit.stages.ppo_steps import Evaluation, group_rows
from rlhfkit.tracking.trainer_log import read_trainer_log

REWARD = """
def letters(prompts, responses):
    return [sum(c in 'abcdefghijklm' for c in r) / max(len(r), 1) for r in responses]
"""


def test_group_rows_keeps_each_prompts_responses_together():
    rows = group_rows(torch.tensor([2, 0]), 3)
    assert rows.tolist() == [6, 7, 8, 0, 1, 2]
    assert group_rows(torch.tensor([4, 1, 3]), 1).tolist() == [4, 1, 3]  # one response per prompt: unchanged


def test_informative_groups_are_those_with_unequal_scores():
    scores = torch.tensor([1.0, 1.0, 0.0, 0.5, 2.0, 2.0], dtype=torch.float64)
    assert informative_groups(scores, 2).tolist() == [False, True, False]


def _evaluation(logprobs, ref_logprobs):
    zeros = torch.zeros_like(logprobs)
    return Evaluation(logprobs=logprobs, values=None, entropy=zeros, ref_logprobs=ref_logprobs)


def _ppo_arguments(**keys):
    base = {"stage": "ppo", "model_name_or_path": "m", "dataset": "d", "output_dir": "o", "reward_model": "r:f",
            "reward_model_type": "function"}
    return build_config({**base, **keys}).ppo


def test_grpo_folds_the_kl_into_each_responses_score():
    """kl_in_reward: score - beta x sum_t KL_t, then the group baseline (hand-computed, float64)."""
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -7.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.5], [-1.0, 0.0]], dtype=torch.float64)  # k1 = [0.5, 0.5], [0, (padding)]
    scores = torch.tensor([3.0, 1.0], dtype=torch.float64)
    p = _ppo_arguments(advantage_estimator="dr_grpo", num_generations=2, kl_in_reward=True)
    rewards, advantages, returns, kl = estimate_advantages(p, scores, _evaluation(logprobs, ref), mask, 0.5)
    # response scores: 3 - 0.5 x 1.0 = 2.5 and 1 - 0 = 1; group mean 1.75
    expected = torch.tensor([[0.75, 0.75], [-0.75, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, 2.75], [1.0, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert returns is None
    p = _ppo_arguments(advantage_estimator="dr_grpo", num_generations=2, kl_in_reward=False)
    _, advantages, _, _ = estimate_advantages(p, scores, _evaluation(logprobs, ref), mask, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_loss_without_a_critic_has_no_value_term_and_adds_the_kl_term():
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss_fn = PPOLoss(0.2, kl_loss_coef=0.5, kl_estimator="k1")
    loss, stats = loss_fn(logprobs, old, advantages, None, None, None, mask, ref_logprobs=ref)
    # ratio 1: policy term -1 per token; k1 = lp - ref = [0, -1], mean -0.5: loss = -1 + 0.5 x -0.5
    assert float(loss.detach()) == pytest.approx(-1.25, abs=1e-12)
    assert "value_loss" not in stats and "value_clipfrac" not in stats
    assert float(stats["kl_loss"]) == pytest.approx(-0.5, abs=1e-12)


@pytest.fixture
def grpo_keys(tmp_path, tiny_model_dir, jsonl):
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {w}{i}"} for w in "abcdefgh" for i in range(4)])
    (tmp_path / "rewards.py").write_text(REWARD)
    return {"stage": "ppo", "model_name_or_path": str(tiny_model_dir), "dataset": str(prompts),
            "finetuning_type": "lora", "lora_rank": 8, "reward_model_type": "function",
            "reward_model": f"{tmp_path / 'rewards.py'}:letters", "advantage_estimator": "grpo", "num_generations": 4,
            "kl_in_reward": False, "kl_loss_coef": 0.01, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1, "ppo_buffer_size": 2, "ppo_epochs": 2, "learning_rate": 3e-2,
            "max_new_tokens": 8, "logging_steps": 1, "save_steps": 0, "seed": 0}


@pytest.mark.slow
def test_grpo_raises_a_rule_reward_without_a_critic(grpo_keys, tmp_path):
    out = tmp_path / "grpo"
    run_stage(cpu_config({**grpo_keys, "max_steps": 12, "output_dir": str(out)}))
    log = read_trainer_log(out)
    first, last = log[0]["reward"], sum(r["reward"] for r in log[-3:]) / 3
    assert last > first + 0.3, [r["reward"] for r in log]
    assert not (out / VALUE_HEAD_FILE).exists()  # nothing of the critic is saved ...
    assert all("value_loss" not in r and "explained_variance" not in r for r in log)  # ... or logged
    assert all("kl_loss" in r for r in log)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["step"] == 1]) == 8 * 4  # 8 prompts x 4 responses per step


def test_filter_groups_logs_the_groups_it_drops(grpo_keys, tmp_path):
    (tmp_path / "constant.py").write_text("def same(prompts, responses):\n    return [1.0] * len(responses)\n")
    out = tmp_path / "filtered"
    run_stage(cpu_config({**grpo_keys, "max_steps": 1, "filter_groups": True, "output_dir": str(out),
                            "reward_model": f"{tmp_path / 'constant.py'}:same"}))
    (record,) = read_trainer_log(out)
    assert record["filtered_groups"] == 8  # every group's scores are equal: nothing to learn from
    assert "policy_loss" not in record  # so no update ran


def test_group_estimators_need_two_responses_per_prompt(grpo_keys, tmp_path):
    with pytest.raises(RlhfkitError, match="num_generations to 2 or more"):
        build_config({**grpo_keys, "num_generations": 1, "output_dir": str(tmp_path / "x")})
