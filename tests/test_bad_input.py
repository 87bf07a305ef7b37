"""The bad-input matrix: each case exits 2 with one `error:` line naming the fault, no traceback,
and nothing written to (or removed from) output_dir."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_HIDDEN, write_cpu_config, write_dataset_info, write_jsonl
from rlhfkit.cli import main
from rlhfkit.models.tiny import build_char_tokenizer

SFT_ROWS = [{"instruction": f"say {w}", "output": w * 3} for w in "abcd"]


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
        save_file({"summary.weight": torch.zeros(1, TINY_HIDDEN), "summary.bias": torch.zeros(1)},
                  str(folder / "value_head.safetensors"))
    tokenizer = build_char_tokenizer()
    if extra_token:
        tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(folder)
    return folder


def _run_and_check(capsys, config: Path, fragment: str, output_dir: Path) -> None:
    """`rlhfkit train config` exits 2 with exactly one `error:` line holding `fragment`, no traceback,
    and leaves `output_dir` as it was."""
    before = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else None
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    after = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else None
    assert after == before, "output_dir changed"


# Each case: a function of (tmp_path, model_dir) writing what it needs and returning the config keys to
# change, and a fragment of the expected error message. Fragments come from the message text, never
# from a file name the message also shows (nor from the case id, which is in tmp_path).


def _bad_json_line(tmp_path, model_dir):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    return {"dataset": str(bad_line)}


def _missing_column(tmp_path, model_dir):
    folder = tmp_path / "info"
    write_jsonl(folder / "rows.jsonl", [{"question": "a", "output": "b"}])
    write_dataset_info(folder, {"qa": {"file_name": "rows.jsonl", "columns": {"prompt": "instruction"}}})
    return {"dataset": "qa", "dataset_dir": str(folder)}


def _ppo(tmp_path, **keys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "hi"}] * 8)
    return {"stage": "ppo", "finetuning_type": "lora", "dataset": str(prompts), **keys}


def _long_prompts(tmp_path, **keys):
    long_prompts = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "x" * 400}] * 8)
    return _ppo(tmp_path, reward_model="m:f", reward_model_type="function", dataset=str(long_prompts), cutoff_len=64,
                **keys)


def _damaged_model(tmp_path: Path, model_dir: Path, name: str, content: bytes, remove: str | None = None) -> dict:
    """A copy of the tiny model with file `name` holding `content` (and `remove` deleted)."""
    folder = tmp_path / "damaged-model"
    shutil.copytree(model_dir, folder)
    if remove:
        (folder / remove).unlink()
    (folder / name).write_bytes(content)
    return {"model_name_or_path": str(folder)}


def _half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _more_layers(model_dir: Path) -> bytes:
    config = json.loads((model_dir / "config.json").read_text())
    return json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}).encode()


def _adapter(tmp_path: Path, model_dir: Path) -> Path:
    """A LoRA adapter folder for the tiny model, as peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    return folder


def _damaged_adapter(tmp_path: Path, model_dir: Path, name: str, content: bytes) -> dict:
    folder = _adapter(tmp_path, model_dir)
    if name != "adapter_model.safetensors":
        (folder / "adapter_model.safetensors").unlink()
    (folder / name).write_bytes(content if content else _half(folder / name))
    return {"finetuning_type": "lora", "adapter_name_or_path": str(folder)}


def _reward_with_damaged_head(tmp_path: Path, model_dir: Path) -> dict:
    folder = _adapter(tmp_path, model_dir)
    (folder / "value_head.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    return _ppo(tmp_path, reward_model=str(folder))


MATRIX = [
    pytest.param(lambda tmp, model: {"dataset": str(tmp / "nope.jsonl")}, "nope.jsonl", id="missing-dataset-file"),
    pytest.param(_bad_json_line, "line 2", id="malformed-json-line"),
    pytest.param(_missing_column, "instruction", id="missing-column"),
    pytest.param(lambda tmp, model: {"dataset": str(write_jsonl(tmp / "blank.jsonl", [{"instruction": " ",
                                                                                        "output": "x"}]))},
                 "empty prompt", id="blank-prompt"),
    pytest.param(lambda tmp, model: {"dataset": str(write_jsonl(tmp / "rows.jsonl", []))}, "has no rows",
                 id="no-usable-rows"),
    pytest.param(lambda tmp, model: {"learnig_rate": 0.1}, "did you mean 'learning_rate'", id="misspelt-key"),
    pytest.param(lambda tmp, model: {"max_steps": "many"}, "'max_steps' must be an integer", id="not-an-integer"),
    pytest.param(lambda tmp, model: {"learning_rate": -1e-4}, "learning_rate must be > 0", id="negative-lr"),
    pytest.param(lambda tmp, model: {"model_name_or_path": str(tmp / "no-model")}, "does not exist",
                 id="missing-model"),
    pytest.param(lambda tmp, model: {"output_dir": str(tmp / "sft.jsonl" / "out")}, "which is a file",
                 id="output-inside-a-file"),
    pytest.param(lambda tmp, model: {"output_dir": "/sys/rlhfkit-out"}, "not writable", id="unwritable-output"),
    pytest.param(lambda tmp, model: _ppo(tmp, reward_model="r", per_device_train_batch_size=3, rollout_batch_size=8),
                 "rollout_batch_size 8 is not a positive multiple", id="rollout-batch-not-a-multiple"),
    pytest.param(lambda tmp, model: _ppo(tmp, reward_model=str(_fake_reward_dir(tmp / "a", model, with_head=False,
                                                                                extra_token=False))),
                 "value_head.safetensors not found", id="reward-folder-without-head"),
    pytest.param(lambda tmp, model: _ppo(tmp, reward_model=str(_fake_reward_dir(tmp / "b", model, with_head=True,
                                                                                extra_token=True))),
                 "different tokenizer", id="reward-with-another-tokenizer"),
    pytest.param(lambda tmp, model: _long_prompts(tmp, overlong_prompts="error"), "cutoff_len",
                 id="overlong-prompt-refused"),
    pytest.param(lambda tmp, model: _long_prompts(tmp), "were dropped", id="every-prompt-dropped"),
    pytest.param(lambda tmp, model: _damaged_model(tmp, model, "model.safetensors", _half(model / "model.safetensors")),
                 "model.safetensors is damaged", id="truncated-base-weights"),
    pytest.param(lambda tmp, model: _damaged_model(tmp, model, "model.safetensors", b"not weights at all" * 50),
                 "model.safetensors is damaged", id="garbage-base-weights"),
    pytest.param(lambda tmp, model: _damaged_model(tmp, model, "config.json", b'{"model_type": "llama",'),
                 "config.json is not valid JSON", id="broken-config-json"),
    pytest.param(lambda tmp, model: _damaged_model(tmp, model, "config.json", _more_layers(model)),
                 "do not fit its config.json", id="config-with-more-layers-than-weights"),
    pytest.param(lambda tmp, model: _damaged_model(tmp, model, "model.safetensors.index.json",
                                                   b'{"weight_map": {"lm_head.weight": "model-00002.safetensors"}}',
                                                   remove="model.safetensors"),
                 "model-00002.safetensors not found", id="missing-shard"),
    pytest.param(lambda tmp, model: _damaged_model(tmp, model, "tokenizer.json", b'{"version": "1.0"}'),
                 "cannot load a tokenizer", id="broken-tokenizer"),
    pytest.param(lambda tmp, model: _damaged_adapter(tmp, model, "adapter_model.safetensors", b""),
                 "adapter_model.safetensors is damaged", id="truncated-adapter-weights"),
    pytest.param(lambda tmp, model: _reward_with_damaged_head(tmp, model), "value_head.safetensors is damaged",
                 id="garbage-value-head"),
]


@pytest.mark.parametrize("make_change, fragment", MATRIX)
def test_matrix(tmp_path: Path, tiny_model_dir: Path, base: dict, capsys, make_change, fragment):
    change = make_change(tmp_path, tiny_model_dir)
    _run_and_check(capsys, write_cpu_config(tmp_path / "config.yaml", {**base, **change}), fragment,
                   Path(base["output_dir"]))


def test_non_empty_output_dir_is_kept(tmp_path: Path, base: dict, capsys):
    out = Path(base["output_dir"])
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    _run_and_check(capsys, write_cpu_config(tmp_path / "config.yaml", base), "not empty", out)
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"


class _Payload:
    """Unpickling this makes the folder `marker`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("target", ["model", "adapter"])
def test_pickled_weights_are_refused_unread(tmp_path: Path, tiny_model_dir: Path, base: dict, capsys, target):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    change = (_damaged_model(tmp_path, tiny_model_dir, "pytorch_model.bin", payload, remove="model.safetensors")
              if target == "model" else _damaged_adapter(tmp_path, tiny_model_dir, "adapter_model.bin", payload))
    _run_and_check(capsys, write_cpu_config(tmp_path / "config.yaml", {**base, **change}),
                   "holds pickled weights, which rlhfkit never loads", Path(base["output_dir"]))
    assert not marker.exists()
