"""The named PPO benchmark workloads, built once into a folder every side reads.

Each workload folder holds ``model/`` (a Hugging Face folder: fp32 weights plus SmolLM2's
tokenizer), ``prompts.jsonl`` (64 single-turn chat prompts, ``{"instruction": ...}``) and
``workload.json`` (the sizes below, and the reward folders). Ours and the peers' drivers load the
same folder, so the weights, tokenizer, prompts and sizes are identical on every side.

Every side scores with a reward model of the same design as TRL's or LLaMA-Factory's, written
once into ``rewards/`` from the workload's base weights (seeded): one LoRA reward adapter (rank 8,
alpha 16, every linear layer but the head, A and B both random so that it changes the scores) and
one value head (hidden -> 1, random weight, bias 0), each saved in the format its reader loads:

    rewards/lora/               ours-lora (`reward_model_type: lora`): the PEFT adapter files +
                                value_head.safetensors (rlhfkit's keys summary.weight / .bias)
    rewards/lora-llamafactory/  llamafactory-lora: the same adapter files + value_head.safetensors
                                (LLaMA-Factory's keys v_head.summary.weight / .bias)
    rewards/full/               ours-full (`reward_model_type: full`): a copy of the base model
                                folder + rlhfkit's value_head.safetensors
    rewards/full-trl/           trl-full: AutoModelForSequenceClassification (one label) = the base
                                weights + score.weight = the value head's weight

So the LoRA sides score with the same function (base + the adapter, then the head), and so do the
full sides (the base, then the head; TRL's score layer has no bias, the head's bias is 0). Each
full side loads its reward model from its own copy of the weights, as a separate checkpoint.

    W1  random Llama: 4 layers, hidden 256, intermediate 688, 4 heads, tied embeddings,
        SmolLM2's tokenizer (vocabulary 49,152)
    W2  SmolLM2-135M-Instruct

Both: 64 prompts, rollout batch 16 (one mini-batch), responses of exactly 32 tokens, 4 PPO
epochs, fp32. Full fine-tuning, or LoRA rank 8 on every linear layer but the head.

Runs in our venv (W2's weights come from `rlhfkit.demo.smollm2`, the value head's format from
`rlhfkit.models.value_head`); the peers' drivers only read the folder. Usage:
``python benchmarks/workloads.py W1`` prints the folder, building what is missing.
"""

from __future__ import annotations

import json
import shutil
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
# Each side's reward model folder, under the workload folder (see the module docstring).
REWARD_FOLDERS = {"ours-lora": "rewards/lora", "llamafactory-lora": "rewards/lora-llamafactory",
                  "ours-full": "rewards/full", "trl-full": "rewards/full-trl"}
# Standard deviation of the reward adapter's B matrices (PEFT starts them at zero, which would
# leave the adapter without effect): a change of a few percent of the base weights.
REWARD_LORA_B_STD = 0.02


def prompts() -> list[str]:
    """The 64 prompts, 8 tasks x 8 subjects, in a fixed order."""
    return [task.format(subject) for task in TASKS for subject in SUBJECTS][: SIZES["prompts"]]


def build(name: str) -> Path:
    """Build (once) and return the folder of workload `name`, with its reward models."""
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    folder = CACHE / name
    if not (folder / "workload.json").is_file():
        _build_base(name, folder)
    info = json.loads((folder / "workload.json").read_text())
    if "reward_models" not in info or not (folder / "rewards").is_dir():
        info["reward_models"] = _build_rewards(folder, Path(info["model"]))
        (folder / "workload.json").write_text(json.dumps(info, indent=1) + "\n")
    return folder


def _build_base(name: str, folder: Path) -> None:
    """The model folder, the prompts and workload.json."""
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


def _build_rewards(folder: Path, model_dir: Path) -> dict[str, str]:
    """Write the four reward folders (module docstring) from `model_dir`; return {side: folder}.

    Written into ``rewards.partial/`` and renamed to ``rewards/`` when complete. Deterministic: the
    adapter's A matrices come from PEFT's initialisation after ``torch.manual_seed(seed)``, its B
    matrices and the head's weight from a generator seeded with `seed`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.value_head import VALUE_HEAD_FILE, ValueHead

    partial, done = folder / "rewards.partial", folder / "rewards"
    shutil.rmtree(partial, ignore_errors=True)
    subfolder = {side: partial / Path(path).name for side, path in REWARD_FOLDERS.items()}
    weights_file = model_dir / "model.safetensors"
    if not weights_file.is_file():
        raise SystemExit(f"{weights_file} not found: the reward folders expect one unsharded weights file")

    # The value head: (hidden -> 1), weight ~ N(0, 1/hidden) so scores are of order 1, bias 0.
    seeded = torch.Generator().manual_seed(SIZES["seed"])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hidden = base.config.hidden_size
    head = ValueHead(hidden)  # zero-initialised; the weight is set below
    with torch.no_grad():
        head.summary.weight.copy_(torch.randn(1, hidden, generator=seeded) / hidden ** 0.5)

    # The LoRA reward adapter: LLaMA-Factory's policy adapter's rank, alpha and targets.
    torch.manual_seed(SIZES["seed"])
    lora = LoraConfig(r=SIZES["lora_rank"], lora_alpha=SIZES["lora_alpha"], target_modules="all-linear",
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    adapted = get_peft_model(base, lora)
    with torch.no_grad():
        for parameter_name, parameter in adapted.named_parameters():
            if "lora_B" in parameter_name:
                torch.nn.init.normal_(parameter, std=REWARD_LORA_B_STD, generator=seeded)
    adapted.save_pretrained(subfolder["ours-lora"])
    (subfolder["ours-lora"] / "README.md").unlink(missing_ok=True)  # PEFT's model card
    adapter_config = json.loads((subfolder["ours-lora"] / "adapter_config.json").read_text())
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # PEFT writes a set's order
    (subfolder["ours-lora"] / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    head.save(subfolder["ours-lora"])
    shutil.copytree(subfolder["ours-lora"], subfolder["llamafactory-lora"])
    save_file({"v_head.summary.weight": head.summary.weight.detach().clone(),
               "v_head.summary.bias": head.summary.bias.detach().clone()},
              str(subfolder["llamafactory-lora"] / VALUE_HEAD_FILE))

    # The full reward model: a copy of the base folder (its own file, as TRL's separate checkpoint).
    shutil.copytree(model_dir, subfolder["ours-full"])
    head.save(subfolder["ours-full"])
    # TRL's: the same weights as a sequence classifier whose score layer is the head's weight.
    trl = subfolder["trl-full"]
    shutil.copytree(model_dir, trl, ignore=shutil.ignore_patterns("model.safetensors", "generation_config.json"))
    state = {key: value for key, value in load_file(str(weights_file)).items() if not key.startswith("lm_head.")}
    state["score.weight"] = head.summary.weight.detach().clone()
    save_file(state, str(trl / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((trl / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (trl / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    partial.rename(done)
    return {side: str(folder / path) for side, path in REWARD_FOLDERS.items()}


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
