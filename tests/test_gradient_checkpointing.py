"""`gradient_checkpointing: true` engages in the SFT and RM stages: every decoder layer runs its forward
twice per training pass (once more in the backward pass), and the backward pass keeps less.

(PPO's update: tests/test_ppo_memory.py.)
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from conftest import cpu_config, saved_for_backward
from rlhfkit.stages import run_stage


def _profile(values: dict, monkeypatch) -> tuple[int, int]:
    """(forward calls of the decoder layers' MLPs with gradients on, bytes saved for the backward pass) over
    one run. (The MLP inside the layer, not the layer itself, whose `forward` transformers wraps to checkpoint.)"""
    calls = [0]
    forward = LlamaMLP.forward

    def counted(self, *args, **kwargs):
        if torch.is_grad_enabled():  # the training passes, not evaluation
            calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    with saved_for_backward() as saved:
        run_stage(cpu_config(values))
    monkeypatch.undo()
    return calls[0], saved[0]


@pytest.mark.parametrize("stage,finetuning", [("sft", "lora"), ("rm", "full")])
def test_checkpointed_layers_run_twice_and_save_less(stage, finetuning, tmp_path, tiny_model_dir, jsonl, monkeypatch):
    if stage == "sft":
        rows = [{"instruction": f"say {w}", "output": w * 8} for w in "abcd"]
    else:
        rows = [{"instruction": f"say {w}", "chosen": w * 8, "rejected": "z" * 5} for w in "abcd"]
    data = jsonl(tmp_path / "data.jsonl", rows)
    values = {"stage": stage, "model_name_or_path": str(tiny_model_dir), "dataset": str(data),
              "finetuning_type": finetuning, "per_device_train_batch_size": 4, "max_steps": 1, "save_steps": 0}
    plain_calls, plain_saved = _profile({**values, "output_dir": str(tmp_path / "plain")}, monkeypatch)
    calls, saved = _profile({**values, "output_dir": str(tmp_path / "checkpointed"), "gradient_checkpointing": True},
                            monkeypatch)
    layers = 2  # the tiny model's decoder layers, one pass each
    assert plain_calls == layers
    assert calls == 2 * layers  # each layer's forward again in the backward pass
    assert saved < 0.5 * plain_saved, (saved, plain_saved)  # only each layer's input is kept
