"""The command line: exit status 2 with one clear line for bad input, nothing written; a real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_cpu_config


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def sft_setup(tmp_path: Path, tiny_model_dir: Path, jsonl):
    data = jsonl(tmp_path / "sft.jsonl", [{"instruction": f"say {w}", "output": w * 3} for w in "abcd"])
    values = dict(stage="sft", model_name_or_path=str(tiny_model_dir), dataset=str(data),
                  output_dir=str(tmp_path / "out"), finetuning_type="full", max_steps=2, logging_steps=1,
                  per_device_train_batch_size=2, learning_rate=1e-3)
    return tmp_path, values


def assert_clean_failure(result: subprocess.CompletedProcess, fragment: str, output_dir: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.parametrize("change, fragment", [
    ({"learning_rat": 0.1}, "did you mean 'learning_rate'"),
    ({"learning_rate": -0.1}, "learning_rate must be > 0"),
    ({"dataset": "missing.jsonl"}, "missing.jsonl"),
    ({"model_name_or_path": "/nonexistent/model"}, "/nonexistent/model does not exist"),
    ({"template": "nosuchtemplate"}, "nosuchtemplate"),
])
def test_bad_input_exits_2_with_one_line(sft_setup, change, fragment):
    tmp_path, values = sft_setup
    config = write_cpu_config(tmp_path / "c.yaml", {**values, **change})
    assert_clean_failure(run_cli("train", str(config), cwd=tmp_path), fragment, Path(values["output_dir"]))


def test_malformed_json_line_is_named(sft_setup):
    tmp_path, values = sft_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    config = write_cpu_config(tmp_path / "c.yaml", {**values, "dataset": str(bad)})
    assert_clean_failure(run_cli("train", str(config), cwd=tmp_path), "line 2", Path(values["output_dir"]))


def test_non_empty_output_dir_is_refused_and_kept(sft_setup):
    tmp_path, values = sft_setup
    out = Path(values["output_dir"])
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli("train", str(write_cpu_config(tmp_path / "c.yaml", values)), cwd=tmp_path)
    assert result.returncode == 2 and "overwrite_output_dir" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_train_with_override_runs_and_logs(sft_setup):
    tmp_path, values = sft_setup
    config = write_cpu_config(tmp_path / "c.yaml", values)
    result = run_cli("train", str(config), "max_steps=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (Path(values["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in records] == [1, 2, 3]
    for key in ("current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time", "remaining_time"):
        assert key in records[-1]
    assert (Path(values["output_dir"]) / "model.safetensors").is_file()
