"""`rlhfkit demo --quick`: the whole pipeline (SFT, pairs, RM, PPO, report) on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import requires
from rlhfkit.cli import main
from rlhfkit.demo import pipeline
from rlhfkit.stages import run_stage


# Pinned to the CPU (conftest.py, point 6) with the demo's own option.
ON_CPU = ["--device", "cpu"]


@pytest.mark.slow
@requires("vaderSentiment")  # the gold judge
def test_demo_quick_runs_every_stage_and_writes_the_report(tmp_path: Path, monkeypatch):
    devices = []

    def recording_run_stage(config):
        devices.append(config.model.device)
        return run_stage(config)

    monkeypatch.setattr(pipeline, "run_stage", recording_run_stage)
    code = main(["demo", "--quick", "--output-dir", str(tmp_path), *ON_CPU])
    assert code == 0
    assert devices == ["cpu"] * 3  # --device reaches every stage (sft, rm, ppo)
    report = (tmp_path / "report.md").read_text()
    assert "PPO − SFT gold score" in report and "## Samples" in report
    for stage in ("sft", "rm", "ppo"):
        assert (tmp_path / stage / "adapter_model.safetensors").is_file()
        assert (tmp_path / stage / "demo_stage_done.json").is_file()
    assert (tmp_path / "rm" / "value_head.safetensors").is_file()
    ppo_log = [json.loads(line) for line in (tmp_path / "ppo" / "trainer_log.jsonl").read_text().splitlines()]
    assert {"score/rm", "score/gold", "kl", "reward"} <= set(ppo_log[-1])
    assert (tmp_path / "gold_vs_proxy.png").stat().st_size > 1000
    # RM accuracy comes from pairs on held-out prompts, which the RM never trained on.
    train_prompts = {json.loads(line)["instruction"] for line in (tmp_path / "data" / "pairs.jsonl").open()}
    heldout_prompts = {json.loads(line)["instruction"]
                       for line in (tmp_path / "data" / "pairs_heldout.jsonl").open()}
    assert heldout_prompts and not train_prompts & heldout_prompts
    assert "eval_accuracy" in json.loads((tmp_path / "rm" / "demo_stage_done.json").read_text())
    assert f"accuracy on {len(heldout_prompts)} held-out pairs" in report


@pytest.mark.slow
@requires("vaderSentiment")  # the gold judge
def test_demo_second_run_reuses_every_stage(tmp_path: Path, capfd):
    code = main(["demo", "--quick", "--output-dir", str(tmp_path), *ON_CPU])
    assert code == 0
    done = {stage: (tmp_path / stage / "demo_stage_done.json").read_text() for stage in ("sft", "rm", "ppo")}
    capfd.readouterr()
    code = main(["demo", "--quick", "--output-dir", str(tmp_path), *ON_CPU])
    assert code == 0
    console = "".join(capfd.readouterr())
    for stage in ("sft", "pairs", "rm", "ppo"):
        assert f"== {stage}: reusing" in console, stage
    for stage in ("sft", "rm", "ppo"):
        assert (tmp_path / stage / "demo_stage_done.json").read_text() == done[stage]  # not retrained
