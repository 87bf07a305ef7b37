"""NaN/Inf guards: a non-finite reward or loss skips that update (logged, counted); max_bad_steps
skipped in a row stop the run with a clear message and nothing saved; weights whose outputs are
not finite are never written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import rlhfkit.stages.ppo as ppo_stage
import rlhfkit.stages.sft as sft_stage
from conftest import OneProcessAccelerator, cpu_config, write_cpu_config
from rlhfkit.cli import main
from rlhfkit.errors import RlhfkitError
from rlhfkit.stages import run_stage
from rlhfkit.training.control import NonFiniteGuard
from rlhfkit.training.probe import check_outputs_finite


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


def test_guard_counts_skips_in_a_row_until_an_update_is_applied():
    guard = NonFiniteGuard(max_bad_steps=2)
    verdicts = [guard.ok(1.0), guard.ok(float("inf")), guard.ok(0.5)]
    assert verdicts == [True, False, True]
    assert (guard.consecutive, guard.total) == (1, 1)  # a finite value alone ends nothing
    guard.applied()
    assert (guard.consecutive, guard.total) == (0, 1)
    assert not guard.ok(float("nan"))
    with pytest.raises(RlhfkitError, match="max_bad_steps=2"):
        guard.ok(float("nan"))


def test_finite_rewards_do_not_reset_the_count_of_skipped_updates():
    """Each PPO step checks its rewards (finite) before its updates (skipped): the skips still add up."""
    guard = NonFiniteGuard(max_bad_steps=3)
    for step in (1, 2):
        assert guard.ok(4.0, what="rewards", step=step)
        assert not guard.ok(float("nan"), what="loss", step=step)
    assert (guard.consecutive, guard.total) == (2, 2)
    assert guard.ok(4.0, what="rewards", step=3)
    with pytest.raises(RlhfkitError, match="3 consecutive updates had non-finite loss"):
        guard.ok(float("nan"), what="loss", step=3)


def _train_and_read_error(capsys, config: Path) -> tuple[int, str, list[int]]:
    """Exit status, the one `error:` line, and the "N in a row" counts the run logged."""
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return code, errors[0], [int(n) for n in re.findall(r"update skipped \((\d+) in a row\)", err)]


def test_exploding_learning_rate_stops_the_run_without_saving(tmp_path, ppo_values, capsys):
    """learning_rate 1e30 without clipping: the first update leaves weights around 1e30 (finite) and
    every logit NaN, so each later update is skipped whatever the (finite) rewards were. With 4 PPO
    epochs per step, the 6 skips in a row span steps 1 and 2; the run stops there, exit 2, no model."""
    values = dict(ppo_values, learning_rate=1e30, max_grad_norm=0, max_bad_steps=6)
    code, error, in_a_row = _train_and_read_error(capsys, write_cpu_config(tmp_path / "c.yaml", values))
    assert code == 2
    assert "6 consecutive updates had non-finite loss" in error
    assert in_a_row == [1, 2, 3, 4, 5, 6]
    records = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records] == [3]  # step 1: one update applied, three skipped
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("save_steps, refused", [(0, "not writing the trained model"),
                                                 (1, "not writing checkpoint-1")])
def test_weights_with_non_finite_logits_are_never_written(tmp_path, ppo_values, capsys, save_steps, refused):
    """Fewer skips than max_bad_steps, but the weights give NaN logits: the probe refuses the final
    model (and, when one is due first, the checkpoint)."""
    values = dict(ppo_values, learning_rate=1e30, max_grad_norm=0, max_bad_steps=100, max_steps=2,
                  save_steps=save_steps)
    code, error, _ = _train_and_read_error(capsys, write_cpu_config(tmp_path / "c.yaml", values))
    assert code == 2 and refused in error and "non-finite logits" in error
    out = tmp_path / "out"
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_stop_keeps_and_names_the_last_checkpoint(tmp_path, ppo_values, monkeypatch):
    _nan_scores_on(monkeypatch, {3, 4})
    with pytest.raises(RlhfkitError) as info:
        run_stage(cpu_config(dict(ppo_values, save_steps=1)))
    out = tmp_path / "out"
    assert "2 consecutive updates had non-finite rewards" in str(info.value)
    assert f"resume from the last checkpoint, {out / 'checkpoint-3'}" in str(info.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_the_probe_leaves_the_random_streams_alone():
    """A checkpoint's probe pass must not move the run's random numbers (dropout draws from them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.5)).train()
    before = torch.get_rng_state()
    check_outputs_finite(OneProcessAccelerator(), model, torch.tensor([[5, 6, 7, 8]]), "a checkpoint")
    assert torch.equal(torch.get_rng_state(), before)
