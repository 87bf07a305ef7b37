"""Each stage on the tiny model with `report_to: tensorboard` and `plot_loss: true`: the event files
(read back with TensorBoard's own reader), samples.jsonl and the PNG curves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import (
    EPS32,
    PNG_MAGIC,
    cpu_config,
    pseudo_terminal,
    read_events,
    read_terminal,
    untrained_kl_tolerance,
    write_cpu_config,
    write_jsonl,
)
from rlhfkit.stages import run_stage
from rlhfkit.tracking.samples import read_samples
from rlhfkit.tracking.trainer_log import read_trainer_log


def _events(output_dir):
    return read_events(output_dir / "runs")


def _pngs(output_dir) -> set[str]:
    names = set()
    for path in output_dir.glob("training_*.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC
        names.add(path.name)
    return names


def test_ppo_writes_events_samples_and_plots(tiny_model_dir, tmp_path, reward_functions):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {i}"} for i in range(8)])
    out = tmp_path / "ppo"
    run_stage(cpu_config(dict(
        stage="ppo", model_name_or_path=str(tiny_model_dir), dataset=str(prompts), output_dir=str(out),
        finetuning_type="lora", learning_rate=1e-2, per_device_train_batch_size=4, max_steps=3, logging_steps=2,
        ppo_epochs=1, max_new_tokens=6, top_k=0, top_p=1.0, temperature=1.0, save_steps=0,
        reward_models=[{"path": f"{reward_functions}:length", "type": "function", "weight": 0.5, "name": "len"},
                       {"path": f"{reward_functions}:prompt_number", "type": "function", "weight": 2.0,
                        "name": "digit"}],
        report_to="tensorboard", plot_loss=True)))
    logged_steps = [r["current_steps"] for r in read_trainer_log(out)]
    assert logged_steps == [1, 2, 3]  # step 1, every logging_steps, and the last
    # samples.jsonl: every sample of each logged step, raw score per source, the score PPO used, KL.
    samples = read_samples(out)
    assert [row["step"] for row in samples] == [1] * 4 + [2] * 4 + [3] * 4
    for row in samples:
        assert row["prompt"].startswith("write ")
        assert row["scores"] == {"len": float(len(row["response"])), "digit": float(row["prompt"][-1])}
        assert row["reward"] == 0.5 * len(row["response"]) + 2.0 * float(row["prompt"][-1])  # exact: halves
    kl_atol = untrained_kl_tolerance(tiny_model_dir, 6)
    assert all(abs(row["kl"]) <= kl_atol for row in samples if row["step"] == 1)  # the policy is the reference
    assert any(abs(row["kl"]) > 100 * kl_atol for row in samples if row["step"] == 3)
    # TensorBoard: every statistic as a scalar at the logged steps; the sample table as text.
    events = _events(out)
    scalars = set(events.Tags()["scalars"])
    for key in ("loss", "reward", "kl", "score/len", "score/digit", "policy_loss", "value_loss", "response_length",
                "kl_coef", "lr", "time/rollout", "seconds_per_step"):
        assert f"train/{key}" in scalars, key
    assert [e.step for e in events.Scalars("train/reward")] == [1, 2, 3]
    logged = read_trainer_log(out)
    # TensorBoard keeps float32: one rounding, at most half an ulp of each value.
    assert [e.value for e in events.Scalars("train/kl")] == pytest.approx([r["kl"] for r in logged], rel=EPS32, abs=0)
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2, 3]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| prompt | response | score/len | score/digit | reward | kl |"
    assert len(table.splitlines()) == 2 + 4
    # Plots: loss, reward, KL, policy/value loss and response length.
    assert _pngs(out) == {f"training_{k}.png" for k in ("loss", "reward", "kl", "policy_loss", "value_loss",
                                                         "response_length")}


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_write_events_and_plots(tiny_model_dir, tmp_path, stage):
    if stage == "sft":
        data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"say {w}", "output": w * 3} for w in "abcdefgh"])
    else:
        data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"say {w}", "chosen": w * 3, "rejected": "zz"}
                                                  for w in "abcdefgh"])
    out = tmp_path / stage
    run_stage(cpu_config(dict(
        stage=stage, model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(out),
        finetuning_type="full", learning_rate=1e-3, per_device_train_batch_size=2, max_steps=4, logging_steps=1,
        val_size=2, eval_steps=2, save_steps=0, report_to="tensorboard", plot_loss=True)))
    events = _events(out)
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/epoch", "eval/loss"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2]
    assert not events.Tags()["tensors"]  # no samples outside PPO
    assert not (out / "samples.jsonl").exists()
    expected = {"training_loss.png", "training_eval_loss.png"}
    if stage == "rm":
        assert {"train/accuracy", "eval/accuracy"} <= scalars
        expected |= {"training_accuracy.png", "training_eval_accuracy.png"}
    assert _pngs(out) == expected


def _sft_config(tmp_path, tiny_model_dir) -> str:
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"say {w}", "output": w * 3} for w in "abcd"])
    return str(write_cpu_config(tmp_path / "sft.yaml", dict(
        stage="sft", model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "out"),
        finetuning_type="full", max_steps=3, logging_steps=2, per_device_train_batch_size=2, save_steps=0)))


def test_console_without_a_terminal_has_lines_and_no_bar(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "train", _sft_config(tmp_path, tiny_model_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/3", "[2/3", "[3/3"]  # step 1, every 2, the last
    assert all(" loss=" in line and " s/step, " in line and " left" in line for line in lines)
    assert "step/s" not in result.stderr and "s/step]" not in result.stderr and "%|" not in result.stderr


def test_progress_bar_on_a_terminal(tiny_model_dir, tmp_path):
    command = [sys.executable, "-m", "rlhfkit.cli", "train", _sft_config(tmp_path, tiny_model_dir)]
    with pseudo_terminal(command, interactive=False) as (process, terminal):
        text = read_terminal(terminal, process=process, timeout=300)
        code = process.wait(timeout=120)
        assert code == 0
    assert "3/3 [" in text and "%|" in text  # the bar: steps done, percentage
    assert "step/s]" in text or "s/step]" in text  # rate
    assert "[2/3] loss=" in text  # the concise line still appears, above the bar
