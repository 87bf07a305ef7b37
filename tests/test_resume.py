"""Kill-and-resume: a run killed mid-way (SIGKILL or SIGTERM) and resumed ends exactly like an
uninterrupted one (weights and logged losses), for SFT, RM and PPO.

Runs are pinned to the CPU (``device: cpu``): the comparison is to the bit, which another device's
non-deterministic kernels (atomic adds in attention and embedding backward passes) would break.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cpu_config, write_cpu_config

STEPS = 8


def _stage_values(stage: str, tmp_path: Path, model_dir: Path, jsonl) -> dict:
    common = dict(model_name_or_path=str(model_dir), finetuning_type="lora", max_steps=STEPS, save_steps=2,
                  logging_steps=1, learning_rate=1e-2, lora_dropout=0.1, seed=3)
    if stage == "sft":
        rows = [{"instruction": f"say {w} " * 8, "output": (w * 30)} for w in "abcdefghijklmnop"]
        return dict(common, stage="sft", dataset=str(jsonl(tmp_path / "sft.jsonl", rows)),
                    per_device_train_batch_size=4, gradient_accumulation_steps=2)
    if stage == "rm":
        rows = [{"instruction": f"q{i} " * 10, "chosen": "aeiou" * 6, "rejected": "xyzw" * 8} for i in range(32)]
        return dict(common, stage="rm", dataset=str(jsonl(tmp_path / "pairs.jsonl", rows)),
                    per_device_train_batch_size=4, gradient_accumulation_steps=2)
    reward = tmp_path / "slow_reward.py"
    reward.write_text("import time\n\ndef reward(prompts, responses):\n    time.sleep(0.3)\n"
                      "    return [sum(c in 'abc' for c in r) / max(len(r), 1) for r in responses]\n")
    rows = [{"instruction": f"write {i}"} for i in range(16)]
    return dict(common, stage="ppo", dataset=str(jsonl(tmp_path / "prompts.jsonl", rows)),
                reward_model=f"{reward}:reward", reward_model_type="function", per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_new_tokens=6, top_k=0, top_p=1.0, temperature=1.0,
                ppo_epochs=2, adaptive_kl=True, ppo_score_norm=True)


def _start(config: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "train", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    return [(r["current_steps"], r["loss"]) for r in records]


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(output_dir / "adapter_model.safetensors"))
    if (output_dir / "value_head.safetensors").is_file():
        tensors.update({f"vh.{k}": v for k, v in load_file(str(output_dir / "value_head.safetensors")).items()})
    return tensors


def _interrupt_when_checkpointed(process: subprocess.Popen, output_dir: Path, sig: int) -> None:
    deadline = time.time() + 240
    while not (output_dir / "checkpoint-2" / "trainer_state.json").is_file():
        running = process.poll() is None
        assert running, f"run ended before its first checkpoint: {process.stderr.read()}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(sig)
    process.wait(timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("stage, sig, expected_code", [
    ("sft", signal.SIGKILL, -signal.SIGKILL),
    ("rm", signal.SIGKILL, -signal.SIGKILL),
    ("ppo", signal.SIGKILL, -signal.SIGKILL),
    ("ppo", signal.SIGTERM, 143),
])
def test_interrupted_run_resumes_to_identical_result(stage, sig, expected_code, tmp_path, tiny_model_dir, jsonl):
    values = _stage_values(stage, tmp_path, tiny_model_dir, jsonl)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = _start(write_cpu_config(tmp_path / "a.yaml", dict(values, output_dir=str(straight_dir))))
    code = straight.wait(timeout=300)
    assert code == 0, straight.stderr.read()

    config = write_cpu_config(tmp_path / "b.yaml", dict(values, output_dir=str(resumed_dir)))
    killed = _start(config)
    _interrupt_when_checkpointed(killed, resumed_dir, sig)
    assert killed.returncode == expected_code, killed.stderr.read()
    assert not (resumed_dir / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    assert not list(resumed_dir.glob(".tmp-checkpoint-*")) or sig == signal.SIGKILL

    resumed = _start(config, "resume_from_checkpoint=true")
    code = resumed.wait(timeout=300)
    stderr = resumed.stderr.read()
    assert code == 0, stderr
    assert "resumed from" in stderr
    assert _losses(resumed_dir) == _losses(straight_dir)
    expected, actual = _weights(straight_dir), _weights(resumed_dir)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_save_total_limit_keeps_the_newest_whole_checkpoints(tmp_path, tiny_model_dir, jsonl):
    from rlhfkit.checkpoint import list_checkpoints
    from rlhfkit.stages import run_stage

    values = _stage_values("sft", tmp_path, tiny_model_dir, jsonl)
    run_stage(cpu_config(dict(values, output_dir=str(tmp_path / "out"), save_total_limit=2)))
    names = [p.name for p in list_checkpoints(tmp_path / "out")]
    assert names == ["checkpoint-4", "checkpoint-6"]
    for name in names:
        files = {p.name for p in (tmp_path / "out" / name).iterdir()}
        assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pt",
                "adapter_model.safetensors", "trainable_state.safetensors"} <= files
    assert not list((tmp_path / "out").glob(".tmp-*"))
