"""NaN/Inf guards: a non-finite reward or loss skips that update (logged, counted); max_bad_steps
consecutive ones stop the run with a clear message and nothing saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rlhfkit.stages.ppo as ppo_stage
import rlhfkit.stages.sft as sft_stage
from conftest import cpu_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.stages import run_stage
from rlhfkit.training.control import NonFiniteGuard


@pytest.fixture
def ppo_values(tmp_path: Path, tiny_model_dir: Path, jsonl, reward_functions) -> dict:
    return dict(stage="ppo", model_name_or_path=str(tiny_model_dir), finetuning_type="lora",
                dataset=str(jsonl(tmp_path / "p.jsonl", [{"instruction": f"hi {i}"} for i in range(8)])),
                reward_model=f"{reward_functions}:length", reward_model_type="function", per_device_train_batch_size=4,
                max_steps=4, logging_steps=1, max_new_tokens=4, output_dir=str(tmp_path / "out"), max_bad_steps=2)


def _nan_scores_on(monkeypatch, bad_calls: set[int]) -> None:
    original = ppo_stage.score_batch
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        scores, stats = original(*args, **kwargs)
        return (torch.full_like(scores, float("nan")) if calls["n"] in bad_calls else scores), stats

    monkeypatch.setattr(ppo_stage, "score_batch", patched)


def test_nan_reward_skips_that_update_only(tmp_path, ppo_values, monkeypatch):
    _nan_scores_on(monkeypatch, {2})
    final = run_stage(cpu_config(ppo_values))
    records = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records] == [0, 1, 1, 1]
    assert final["skipped_updates"] == 1
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_consecutive_nan_rewards_stop_the_run(tmp_path, ppo_values, monkeypatch):
    _nan_scores_on(monkeypatch, {1, 2, 3, 4})
    with pytest.raises(RlhfkitError, match="2 consecutive updates had non-finite rewards"):
        run_stage(cpu_config(ppo_values))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_nan_sft_loss_leaves_weights_untouched(tmp_path, tiny_model_dir, jsonl, monkeypatch):
    original = sft_stage.token_nll_sum
    monkeypatch.setattr(sft_stage, "token_nll_sum", lambda model, batch, *chunk: (
        original(model, batch, *chunk)[0] * float("nan"), original(model, batch, *chunk)[1]))
    values = dict(stage="sft", model_name_or_path=str(tiny_model_dir), finetuning_type="full", max_steps=1,
                  dataset=str(jsonl(tmp_path / "s.jsonl", [{"instruction": "a", "output": "b"}])),
                  output_dir=str(tmp_path / "out"), max_bad_steps=3, learning_rate=0.1)
    run_stage(cpu_config(values))
    from safetensors.torch import load_file

    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_guard_counts_and_resets():
    guard = NonFiniteGuard(max_bad_steps=2)
    verdicts = [guard.ok(1.0), guard.ok(float("inf")), guard.ok(0.5)]
    assert verdicts == [True, False, True]
    assert (guard.consecutive, guard.total) == (0, 1)
    verdict = guard.ok(float("nan"))
    assert not verdict
    with pytest.raises(RlhfkitError, match="max_bad_steps=2"):
        guard.ok(float("nan"))
