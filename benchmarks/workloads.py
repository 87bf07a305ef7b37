"""The named PPO benchmark workloads, built once into a folder every side reads.

Each workload folder holds ``model/`` (a Hugging Face folder: fp32 weights plus SmolLM2's
tokenizer), ``prompts.jsonl`` (64 single-turn chat prompts, ``{"instruction": ...}``) and
``workload.json`` (the sizes below). Ours and the peers' drivers load the same folder, so the
weights, tokenizer, prompts and sizes are identical on every side.

    W1  random Llama: 4 layers, hidden 256, intermediate 688, 4 heads, tied embeddings,
        SmolLM2's tokenizer (vocabulary 49,152)
    W2  SmolLM2-135M-Instruct

Both: 64 prompts, rollout batch 16 (one mini-batch, one micro-batch), responses of exactly 32
tokens, 4 PPO epochs, fp32. Full fine-tuning, or LoRA rank 8 on every linear layer but the head.

Runs in our venv (W2's weights come from `rlhfkit.demo.smollm2`); the peers' drivers only read
the folder. Usage: ``python benchmarks/workloads.py W1`` prints the folder, building it if needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
SIZES = {
    "prompts": 64,
    "rollout_batch": 16,
    "response_tokens": 32,
    "ppo_epochs": 4,
    "lora_rank": 8,
    "lora_alpha": 16,
    "learning_rate": 1e-5,
    "temperature": 1.0,
    "seed": 0,
}
W1_LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
TASKS = [
    "Write one sentence about {}.",
    "Give me a short fact about {}.",
    "Describe {} to a child in simple words.",
    "What is the most surprising thing about {}?",
    "Write a two-line poem about {}.",
    "Explain why {} matters, briefly.",
    "List three words that remind you of {}.",
    "Tell a very short story that involves {}.",
]
SUBJECTS = ["the ocean", "volcanoes", "honey bees", "the moon", "trains", "coffee", "winter", "libraries"]
WORKLOADS = ("W1", "W2")


def prompts() -> list[str]:
    """The 64 prompts, 8 tasks x 8 subjects, in a fixed order."""
    return [task.format(subject) for task in TASKS for subject in SUBJECTS][: SIZES["prompts"]]


def build(name: str) -> Path:
    """Build (once) and return the folder of workload `name`."""
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    folder = CACHE / name
    if (folder / "workload.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from rlhfkit.demo.smollm2 import materialize_smollm2

    smollm2 = Path(materialize_smollm2())
    model_dir = folder / "model"
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    if name == "W1":
        torch.manual_seed(SIZES["seed"])
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **W1_LLAMA)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _readable_by_transformers_4(model_dir)
    rows = [{"instruction": text} for text in prompts()]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    info = {"name": name, "model": str(model_dir), "prompts_file": str(folder / "prompts.jsonl"), **SIZES,
            "parameters": sum(p.numel() for p in model.parameters())}
    (folder / "workload.json").write_text(json.dumps(info, indent=1) + "\n")
    return folder


def _readable_by_transformers_4(model_dir: Path) -> None:
    """Keys the peers' transformers 4.5x read: `rope_theta` (5.x nests it), a tokenizer class it knows."""
    config_file, tokenizer_file = model_dir / "config.json", model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    config["torch_dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_config = json.loads(tokenizer_file.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def load(name: str) -> dict:
    """The workload's description (``workload.json``), building the folder if needed."""
    return json.loads((build(name) / "workload.json").read_text())


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "W1"))
