"""Defaults of the keys that depend on the device, filled in where a key is left unset.

| key | CPU | accelerator | why |
|---|---|---|---|
| `per_device_train_batch_size` | 1 | 8 | rows per forward/backward pass; an accelerator runs 8 rows in about the time of one (8 is LLaMA-Factory's and transformers' default) |
| `per_device_eval_batch_size` | 8 | 32 | rows per no-grad pass (evaluation, PPO's evaluate phase, reward scoring): a pure chunk size |
| `logits_chunk_size` | 0 (off) | 1024 | on a CPU the whole-tensor head with kept buffers is faster; on an accelerator the chunks bound memory at no measurable cost |

The micro-batch also sets the batch of an optimizer step (x `gradient_accumulation_steps`) and
PPO's rollout batch, so set it explicitly to get the same run on every device.
`rollout_engine: auto` is `recording` on a CPU and `static` on CUDA (`rollout_engine_for`).
Nothing here imports torch: a config pinned to the CPU is resolved before torch is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhfkit.config.loader import Config

DEVICE_DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 8, "logits_chunk_size": 0},
    "accelerator": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 32, "logits_chunk_size": 1024},
}


def device_kind(device_type: str) -> str:
    """``cpu`` or ``accelerator`` for a torch device type (cuda, mps, xpu, ...)."""
    return "cpu" if device_type == "cpu" else "accelerator"


def apply_device_defaults(config: "Config", device_type: str) -> list[str]:
    """Fill the unset device-dependent keys of `config` for `device_type`; returns the keys filled."""
    from rlhfkit.config.validation import derive_ppo_buffer_size

    filled = []
    for key, value in DEVICE_DEFAULTS[device_kind(device_type)].items():
        if getattr(config.training, key) is None:
            setattr(config.training, key, value)
            filled.append(key)
    derive_ppo_buffer_size(config)
    return filled


def rollout_engine_for(setting: str, device_type: str) -> str:
    """The engine `rollout_engine` names on `device_type`: `auto` is static on CUDA, else recording."""
    if setting != "auto":
        return setting
    return "static" if device_type == "cuda" else "recording"
