"""The LoRA reward model's base check: the architecture, sizes and vocabulary of the base, and a
fingerprint of its weights recorded when the RM was saved; never the text of config.json."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import TINY_HIDDEN, cpu_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.fingerprint import FINGERPRINT_FILE, write_base_fingerprint
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.tiny import build_tiny_model
from rlhfkit.models.value_head import ValueHead
from rlhfkit.stages.ppo_models import check_lora_reward


@pytest.fixture
def reward_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A LoRA reward folder (adapter and value head) on the tiny model, with the base recorded as the RM stage does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "rm"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    ValueHead(TINY_HIDDEN).save(folder)
    write_base_fingerprint(folder, str(tiny_model_dir), [])
    return folder


def _check(reward: Path, base: Path) -> None:
    """PPO's check of a LoRA reward folder against model_name_or_path `base`."""
    config = cpu_config(dict(stage="ppo", model_name_or_path=str(base), dataset="d", output_dir="o",
                             reward_model=str(reward)))
    check_lora_reward(str(reward), config, load_tokenizer(config.model))


def _resaved_by_an_older_transformers(model_dir: Path, folder: Path) -> Path:
    """The same weights and shape, written as transformers 4.x writes them: another config.json text
    (version, `torch_dtype`, `rope_theta` instead of `rope_parameters`) and another tensor order and
    metadata in the safetensors file."""
    shutil.copytree(model_dir, folder)
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(transformers_version="4.46.3", torch_dtype=config.pop("dtype"), rope_theta=rope["rope_theta"],
                  rope_scaling=None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = load_file(str(model_dir / "model.safetensors"))
    save_file(dict(reversed(list(tensors.items()))), str(folder / "model.safetensors"),
              metadata={"format": "pt", "written_by": "an older transformers"})
    return folder


def test_the_same_base_resaved_by_another_transformers_version_is_accepted(tmp_path, tiny_model_dir, reward_dir):
    resaved = _resaved_by_an_older_transformers(tiny_model_dir, tmp_path / "resaved")
    assert (resaved / "config.json").read_text() != (tiny_model_dir / "config.json").read_text()
    _check(reward_dir, resaved)


def test_a_base_with_the_same_config_but_other_weights_is_refused(tmp_path, tiny_model_dir, reward_dir):
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert json.loads((other / "config.json").read_text()) == json.loads((tiny_model_dir / "config.json").read_text())
    with pytest.raises(RlhfkitError) as info:
        _check(reward_dir, other)
    assert "whose weights differ from model_name_or_path" in str(info.value)
    assert "reward_model_type: full" in str(info.value) and "\n" not in str(info.value)


def test_a_base_of_another_size_is_refused(tmp_path, reward_dir):
    narrow = build_tiny_model(tmp_path / "narrow", hidden_size=32)
    with pytest.raises(RlhfkitError, match="a different base than model_name_or_path .*hidden_size 64 vs 32"):
        _check(reward_dir, narrow)


def test_a_folder_saved_before_the_fingerprint_is_compared_by_structure(tmp_path, tiny_model_dir, reward_dir,
                                                                          caplog):
    (reward_dir / FINGERPRINT_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        _check(reward_dir, _resaved_by_an_older_transformers(tiny_model_dir, tmp_path / "resaved"))
        _check(reward_dir, build_tiny_model(tmp_path / "other", seed=1))  # weights cannot be compared: accepted
    assert "comparing its base's architecture and sizes only" in caplog.text
    with pytest.raises(RlhfkitError, match="hidden_size 64 vs 32"):
        _check(reward_dir, build_tiny_model(tmp_path / "narrow", hidden_size=32))
