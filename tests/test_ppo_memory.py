"""PPO's update engages gradient checkpointing (checkpointed layers, fewer saved activations), and every adapter PPO loads runs without dropout."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from conftest import saved_for_backward

import rlhfkit.stages.ppo as ppo_stage
from rlhfkit.config import build_config
from rlhfkit.stages import run_stage
from rlhfkit.stages.ppo_models import build_ppo_models

REWARD = "def letters(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


@pytest.fixture
def ppo_keys(tmp_path, tiny_model_dir, jsonl):
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {w}"} for w in "abcd"])
    (tmp_path / "rewards.py").write_text(REWARD)
    return {"stage": "ppo", "model_name_or_path": str(tiny_model_dir), "dataset": str(prompts),
            "finetuning_type": "lora", "reward_model_type": "function",
            "reward_model": f"{tmp_path / 'rewards.py'}:letters", "per_device_train_batch_size": 4,
            "ppo_epochs": 1, "max_new_tokens": 6, "max_steps": 1, "save_steps": 0, "device": "cpu"}


def _update_profile(keys: dict, monkeypatch) -> tuple[int, int]:
    """(checkpointed calls of the first decoder layer, bytes saved for backward) over the whole run."""
    checkpointed = [0]
    build = ppo_stage.build_ppo_models

    def counted_build(*args, **kwargs):
        models = build(*args, **kwargs)
        layer = next(m for m in models.policy.modules() if type(m).__name__ == "LlamaDecoderLayer")
        if layer.gradient_checkpointing:
            checkpoint = layer._gradient_checkpointing_func  # what transformers' layer calls to checkpoint itself

            def counted(*args, **kwargs):
                checkpointed[0] += 1
                return checkpoint(*args, **kwargs)

            layer._gradient_checkpointing_func = counted
        return models

    monkeypatch.setattr(ppo_stage, "build_ppo_models", counted_build)
    with saved_for_backward() as saved:
        run_stage(build_config(keys))
    return checkpointed[0], saved[0]


def test_gradient_checkpointing_engages_in_the_update_and_saves_less(ppo_keys, tmp_path, monkeypatch):
    plain_calls, plain_saved = _update_profile({**ppo_keys, "output_dir": str(tmp_path / "plain"),
                                                "gradient_checkpointing": False}, monkeypatch)
    monkeypatch.undo()
    calls, saved = _update_profile({**ppo_keys, "output_dir": str(tmp_path / "checkpointed"),
                                    "gradient_checkpointing": True}, monkeypatch)
    assert plain_calls == 0
    assert calls == 1  # the one update pass ran the layer checkpointed
    # Activations saved for the backward pass (the update's, the only pass with gradients): a 2-layer
    # model keeps only each layer's input instead of every intermediate.
    assert saved < 0.5 * plain_saved, (saved, plain_saved)


def test_no_adapter_keeps_dropout(ppo_keys, tmp_path, tiny_model_dir, jsonl):
    """The reference (the SFT adapter) and a LoRA reward model were trained with dropout; PPO loads both
    after the policy and runs every one of them without it."""
    sft = tmp_path / "sft"
    data = jsonl(tmp_path / "sft.jsonl", [{"instruction": f"say {w}", "output": w * 3} for w in "abcd"])
    pairs = jsonl(tmp_path / "pairs.jsonl", [{"instruction": f"say {w}", "chosen": w * 3, "rejected": "z"}
                                             for w in "abcd"])
    common = {"model_name_or_path": str(tiny_model_dir), "finetuning_type": "lora", "lora_dropout": 0.3,
              "max_steps": 1, "save_steps": 0, "device": "cpu"}
    run_stage(build_config({**common, "stage": "sft", "dataset": str(data), "output_dir": str(sft)}))
    run_stage(build_config({**common, "stage": "rm", "dataset": str(pairs), "output_dir": str(tmp_path / "rm")}))
    assert json.loads((tmp_path / "rm" / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    config = build_config({**ppo_keys, "adapter_name_or_path": str(sft), "reward_model": str(tmp_path / "rm"),
                           "reward_model_type": "lora", "lora_dropout": 0.3, "output_dir": str(tmp_path / "out")})
    from rlhfkit.models.loading import load_tokenizer

    models = build_ppo_models(config, load_tokenizer(config.model), torch.device("cpu"))
    assert {"reference", "reward"} <= set(models.policy.peft_config)
    dropouts = [m for m in models.policy.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
