"""What a LoRA reward model was trained on: its base's architecture, sizes and vocabulary, and a
cheap fingerprint of the base weights, recorded beside the adapter when the RM is saved and
compared with the policy's base before the adapter is put on it.

The fingerprint hashes the first row (up to 64 values, as float32) of every tensor of the base's
safetensors files, by name: a few kilobytes read through memory maps however large the model. A
re-save by another transformers version keeps it; another base of the same shape, or the same base
after merging a fine-tune into it, changes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig

from rlhfkit.errors import fail, one_line
from rlhfkit.models.weight_files import model_weight_files, read_json

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "base_model.json"
STRUCTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size")
VALUES_PER_TENSOR = 64


def base_structure(path: str, trust_remote_code: bool = False) -> dict:
    """The architecture, sizes and vocabulary size of the model at `path`, from its config."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # a damaged config.json fails in many ways
        raise fail(f"cannot read the model config of {path}: {one_line(err)}") from err
    text = config.get_text_config()
    return {key: config.model_type if key == "model_type" else getattr(text, key, None) for key in STRUCTURE_KEYS}


def weights_fingerprint(folders: list[str | Path]) -> str:
    """A hash of the first values of every tensor in the model folder `folders[0]` and the adapter
    folders after it (merged into it, in order), by tensor name and shape."""
    digest = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        files = [folder / "adapter_model.safetensors"] if (folder / "adapter_config.json").is_file() \
            else model_weight_files(folder)
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(safe_open(str(file), "pt")) for file in files]
            for name, handle in sorted((name, handle) for handle in handles for name in handle.keys()):
                piece = handle.get_slice(name)
                shape = piece.get_shape()
                first = piece[:1] if shape else handle.get_tensor(name)
                values = first.reshape(-1)[:VALUES_PER_TENSOR].float().contiguous()
                digest.update(f"{name}{list(shape)}".encode())
                digest.update(values.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def write_base_fingerprint(reward_dir: str | Path, base: str, merged_adapters: list[str],
                           trust_remote_code: bool = False) -> None:
    """Record in `reward_dir` what its adapter was trained on: `base` with `merged_adapters` merged in."""
    record = {"base": base, "merged_adapters": merged_adapters, "structure": base_structure(base, trust_remote_code),
              "weights": weights_fingerprint([base, *merged_adapters]) if Path(base).is_dir() else None}
    (Path(reward_dir) / FINGERPRINT_FILE).write_text(json.dumps(record, indent=1) + "\n")


def check_reward_base(reward_dir: str, base: str, trained_on: str | None, trust_remote_code: bool = False) -> None:
    """Refuse a LoRA reward adapter trained on another base than `base`: another architecture, size or
    vocabulary, or (when recorded) other weights.

    Folders saved before rlhfkit recorded `FINGERPRINT_FILE` are compared by the structure of
    `trained_on` (the base peft recorded) alone, with a note.
    """
    path = Path(reward_dir) / FINGERPRINT_FILE
    if path.is_file():
        recorded = read_json(path)
    elif trained_on and Path(trained_on).is_dir():
        logger.warning("%s has no %s (saved before rlhfkit recorded it): comparing its base's architecture and "
                       "sizes only, not its weights", reward_dir, FINGERPRINT_FILE)
        recorded = {"structure": base_structure(trained_on, trust_remote_code), "weights": None}
    else:
        logger.warning("%s has no %s and its base %s is not here: cannot check that it was trained on %s",
                       reward_dir, FINGERPRINT_FILE, trained_on, base)
        return
    advice = f"use reward_model_type: full or retrain the RM on {base}"
    current = base_structure(base, trust_remote_code)
    differ = [key for key in STRUCTURE_KEYS if recorded.get("structure", {}).get(key) != current[key]]
    if differ:
        shown = ", ".join(f"{key} {recorded.get('structure', {}).get(key)} vs {current[key]}" for key in differ)
        raise fail(f"reward adapter {reward_dir} was trained on a different base than model_name_or_path {base} "
                   f"({shown}); {advice}")
    if recorded.get("weights") and Path(base).is_dir() and weights_fingerprint([base]) != recorded["weights"]:
        merged = recorded.get("merged_adapters") or []
        extra = f" with {', '.join(merged)} merged in" if merged else ""
        raise fail(f"reward adapter {reward_dir} was trained on a base{extra} whose weights differ from "
                   f"model_name_or_path {base} (the fingerprint in {path} does not match); {advice}")
