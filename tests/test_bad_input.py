"""The bad-input matrix: each case exits 2 with one `error:` line naming the fault, no traceback,
and nothing written to (or removed from) output_dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlhfkit.cli import main
from rlhfkit.models.tiny import build_char_tokenizer

SFT_ROWS = [{"instruction": f"say {w}", "output": w * 3} for w in "abcd"]


def _config(tmp_path: Path, **values) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


@pytest.fixture
def base(tmp_path: Path, tiny_model_dir: Path, jsonl) -> dict:
    data = jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    return dict(stage="sft", model_name_or_path=str(tiny_model_dir), dataset=str(data),
                output_dir=str(tmp_path / "out"), finetuning_type="full", max_steps=1)


def _fake_reward_dir(tmp_path: Path, model_dir: Path, with_head: bool, extra_token: bool) -> Path:
    """An RM folder that fails its checks before any weight is read."""
    folder = tmp_path / "rm"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_dir),
                                                            "peft_type": "LORA"}))
    if with_head:
        save_file({"summary.weight": torch.zeros(1, 64), "summary.bias": torch.zeros(1)},
                  str(folder / "value_head.safetensors"))
    tokenizer = build_char_tokenizer()
    if extra_token:
        tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(folder)
    return folder


def _run_and_check(capsys, config: Path, fragment: str, output_dir: Path) -> None:
    before = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else None
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    after = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else None
    assert after == before, "output_dir changed"


def test_matrix(tmp_path: Path, tiny_model_dir: Path, base: dict, jsonl, capsys):
    out = Path(base["output_dir"])
    cases = []
    cases.append(({"dataset": str(tmp_path / "nope.jsonl")}, "nope.jsonl"))
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    cases.append(({"dataset": str(bad_line)}, "line 2"))
    missing_column = tmp_path / "info"
    missing_column.mkdir()
    (missing_column / "rows.jsonl").write_text(json.dumps({"question": "a", "output": "b"}) + "\n")
    (missing_column / "dataset_info.json").write_text(json.dumps({"qa": {"file_name": "rows.jsonl",
                                                                          "columns": {"prompt": "instruction"}}}))
    cases.append(({"dataset": "qa", "dataset_dir": str(missing_column)}, "instruction"))
    cases.append(({"dataset": str(jsonl(tmp_path / "empty_prompt.jsonl", [{"instruction": " ", "output": "x"}]))},
                  "empty"))
    cases.append(({"dataset": str(jsonl(tmp_path / "none.jsonl", []))}, "no"))
    cases.append(({"learnig_rate": 0.1}, "did you mean 'learning_rate'"))
    cases.append(({"max_steps": "many"}, "'max_steps' must be an integer"))
    cases.append(({"learning_rate": -1e-4}, "learning_rate must be > 0"))
    cases.append(({"model_name_or_path": str(tmp_path / "no-model")}, "does not exist"))
    cases.append(({"output_dir": str(tmp_path / "sft.jsonl" / "out")}, "which is a file"))
    cases.append(({"output_dir": "/sys/rlhfkit-out"}, "not writable"))
    ppo = dict(stage="ppo", finetuning_type="lora", dataset=str(jsonl(tmp_path / "p.jsonl", [{"instruction": "hi"}] * 8)))
    cases.append((dict(ppo, reward_model="r", per_device_train_batch_size=3, rollout_batch_size=8),
                  "rollout_batch_size 8 is not a positive multiple"))
    no_head = _fake_reward_dir(tmp_path / "a", tiny_model_dir, with_head=False, extra_token=False)
    cases.append((dict(ppo, reward_model=str(no_head)), "value_head.safetensors not found"))
    other_tokenizer = _fake_reward_dir(tmp_path / "b", tiny_model_dir, with_head=True, extra_token=True)
    cases.append((dict(ppo, reward_model=str(other_tokenizer)), "different tokenizer"))
    long_prompts = jsonl(tmp_path / "long.jsonl", [{"instruction": "x" * 400}] * 8)
    cases.append((dict(ppo, reward_model="m:f", reward_model_type="function", dataset=str(long_prompts),
                       cutoff_len=64, overlong_prompts="error"), "cutoff_len"))
    cases.append((dict(ppo, reward_model="m:f", reward_model_type="function", dataset=str(long_prompts),
                       cutoff_len=64), "were dropped"))
    for change, fragment in cases:
        _run_and_check(capsys, _config(tmp_path, **{**base, **change}), fragment, out)


def test_non_empty_output_dir_is_kept(tmp_path: Path, base: dict, capsys):
    out = Path(base["output_dir"])
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    _run_and_check(capsys, _config(tmp_path, **base), "not empty", out)
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"
