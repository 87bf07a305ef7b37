"""LLaMA-Factory's example configs run here with only the model and sizes changed.

The YAML files below are written in the form of LLaMA-Factory's `examples/` (every key, section
comment and folder they have), run in-process through `rlhfkit.cli.main` from a working directory
laid out as LLaMA-Factory's: `data/dataset_info.json` with its entries for identity,
alpaca_en_demo and dpo_en_demo (rows of our own in each demo file's format),
`examples/deepspeed/ds_z3_config.json`, and outputs under `saves/`.

Mirrored, by LLaMA-Factory's file names:

* train_lora/qwen3_lora_sft.yaml, train_lora/qwen3_lora_reward.yaml: unchanged but for
  `model_name_or_path` (the tiny test model). bf16 is on as there; on a CPU it is accelerate's
  bfloat16 autocast.
* train_lora/llama3_lora_ppo.yaml, LLaMA-Factory's last PPO example (removed from its examples in
  December 2025; its `stage: ppo` remains): `reward_model` points at the reward example's output
  folder, and `max_new_tokens` is 16 instead of 512 (a size). It keeps `template: llama3`: the tiny
  character tokenizer has no `<|start_header_id|>` / `<|eot_id|>` tokens, so those markers are
  encoded as characters (with a Llama 3 tokenizer they are single tokens; the run warns); replies
  still stop at the tokenizer's EOS.
* merge_lora/qwen3_lora_sft.yaml with `rlhfkit export`; inference/qwen3_lora_sft.yaml and
  inference/qwen3_full_sft.yaml (its model the merged folder) with `rlhfkit chat`, both with
  `max_new_tokens: 8` added (a size; the default is 1024, as in LLaMA-Factory).
* train_full/qwen3_full_sft.yaml and train_lora/qwen3_lora_sft_ds3.yaml (`deepspeed:
  examples/deepspeed/ds_z3_config.json`): one line saying to install deepspeed and how to launch,
  where deepspeed is not installed; train_lora/qwen3_lora_dpo.yaml: one line naming the stage.

The demo sets are small (8 SFT rows, 4 pairs), so LLaMA-Factory's own sizes (batch 1 x accumulation
8, 3 epochs, cutoff_len 2048, max_samples 1000) already give 3 short steps per stage.

Then a switching user's keys and mistakes: LLaMA-Factory-only keys say why they are refused (or are
accepted where they change nothing for a text model), and a `lora_target` naming no module is one line.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import float32_tolerance
from rlhfkit.cli import main
from rlhfkit.tracking.trainer_log import read_trainer_log

# LLaMA-Factory's entries in data/dataset_info.json, as it writes them.
DATASET_INFO = {
    "identity": {"file_name": "identity.json"},
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
}

IDENTITY = [{"instruction": q, "input": "", "output": "Hello! I am {{name}}, an assistant by {{author}}."}
            for q in ("hi", "hello", "Who are you?", "What is your name?")]
ALPACA = [
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a primary color.", "input": "", "output": "Blue."},
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
    {"instruction": "Answer with yes or no: is ice cold?", "input": "", "output": "Yes."},
]
DPO = [{"conversations": [{"from": "human", "value": question}],
        "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}
       for question, chosen, rejected in [("Is the sky blue?", "Yes, on a clear day.", "no"),
                                          ("Name a fruit.", "An apple.", "rock"),
                                          ("Say hello.", "Hello there!", "..."),
                                          ("Count to three.", "1, 2, 3.", "7")]]

# A DeepSpeed ZeRO-3 config of the kind LLaMA-Factory ships ("auto" sizes filled in by the trainer).
DS_Z3 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                          "stage3_gather_16bit_weights_on_model_save": True},
}

TRAIN = """\
### output
output_dir: {output_dir}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: {accumulation}
learning_rate: {learning_rate}
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: {dataset}
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""


def lora_example(model: Path, stage: str, dataset: str, output_dir: str, learning_rate: str = "1.0e-4",
                 method: str = "", accumulation: int = 8) -> str:
    """A train_lora/qwen3_lora_*.yaml of LLaMA-Factory's."""
    return f"""\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: {stage}
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
{method}
### dataset
dataset: {dataset}
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

""" + TRAIN.format(output_dir=output_dir, accumulation=accumulation, learning_rate=learning_rate, dataset=dataset)


def full_sft_example(model: Path) -> str:
    """train_full/qwen3_full_sft.yaml."""
    return f"""\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
deepspeed: examples/deepspeed/ds_z3_config.json  # choices: [ds_z0_config.json, ds_z2_config.json, ds_z3_config.json]

### dataset
dataset: identity,alpaca_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

""" + TRAIN.format(output_dir="saves/qwen3-4b/full/sft", accumulation=2, learning_rate="1.0e-5",
                   dataset="alpaca_en_demo")


def ppo_example(model: Path, reward_model: str) -> str:
    """train_lora/llama3_lora_ppo.yaml (LLaMA-Factory's last PPO example), max_new_tokens 16 (was 512)."""
    return f"""\
### model
model_name_or_path: {model}
reward_model: {reward_model}
trust_remote_code: true

### method
stage: ppo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/ppo
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### generate
max_new_tokens: 16
top_k: 0
top_p: 0.9
"""


def merge_example(model: Path, adapter: str, export_dir: str) -> str:
    """merge_lora/qwen3_lora_sft.yaml."""
    return f"""\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: {model}
adapter_name_or_path: {adapter}
template: qwen3_nothink
trust_remote_code: true

### export
export_dir: {export_dir}
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""


def inference_example(model: Path | str, adapter: str | None = None) -> str:
    """inference/qwen3_lora_sft.yaml (with an adapter) or inference/qwen3_full_sft.yaml, max_new_tokens 8."""
    adapter_line = f"adapter_name_or_path: {adapter}\n" if adapter else ""
    return f"""\
model_name_or_path: {model}
{adapter_line}template: qwen3_nothink
infer_backend: huggingface  # choices: [huggingface, vllm, sglang, ktransformers]
trust_remote_code: true
max_new_tokens: 8
"""


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch) -> Path:
    """A working directory laid out as LLaMA-Factory's: data/, examples/deepspeed/, saves/ to come."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2))
    for name, rows in (("identity", IDENTITY), ("alpaca_en_demo", ALPACA), ("dpo_en_demo", DPO)):
        (tmp_path / "data" / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "examples" / "deepspeed").mkdir(parents=True)
    (tmp_path / "examples" / "deepspeed" / "ds_z3_config.json").write_text(json.dumps(DS_Z3, indent=2))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_example(name: str, text: str) -> str:
    path = Path("examples") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def chat_reply(config: str, monkeypatch, capsys, message: str = "hi") -> str:
    """The assistant's reply to `message` from `rlhfkit chat CONFIG`, fed on stdin."""
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{message}\n/exit\n"))
    assert main(["chat", config, "--device", "cpu"]) == 0
    output = capsys.readouterr().out
    assert "Assistant: " in output, output
    return output.split("Assistant: ", 1)[1].split("\nUser: ", 1)[0]


# The files stay as LLaMA-Factory ships them; the runs are pinned to the CPU on the command line
# (conftest.py, point 6), as a user would pin a run with an override.
ON_CPU = ["device=cpu"]

ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_sft_reward_ppo_merge_and_chat(workspace, tiny_model_dir, monkeypatch, capsys):
    model = tiny_model_dir
    # 1. LoRA SFT on identity + alpaca_en_demo
    sft = write_example("train_lora/qwen3_lora_sft.yaml",
                        lora_example(model, "sft", "identity,alpaca_en_demo", "saves/qwen3-4b/lora/sft"))
    assert main(["train", sft, *ON_CPU]) == 0, capsys.readouterr().err
    sft_dir = Path("saves/qwen3-4b/lora/sft")
    log = read_trainer_log(sft_dir)
    # 8 rows, 1 x 8 per step: one step per epoch, as transformers' Trainer counts for LLaMA-Factory
    assert log[-1]["total_steps"] == 3 and log[-1]["epoch"] == 3.0
    targets = json.loads((sft_dir / "adapter_config.json").read_text())["target_modules"]  # lora_target: all
    assert {name.rsplit(".", 1)[-1] for name in targets} == ALL_LINEAR and len(targets) == 2 * len(ALL_LINEAR)
    lora = load_file(sft_dir / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in lora.items())
    assert (sft_dir / "training_loss.png").is_file()  # plot_loss
    # 2. LoRA reward model on dpo_en_demo
    reward = write_example("train_lora/qwen3_lora_reward.yaml",
                           lora_example(model, "rm", "dpo_en_demo", "saves/qwen3-4b/lora/reward"))
    assert main(["train", reward, *ON_CPU]) == 0, capsys.readouterr().err
    reward_dir = Path("saves/qwen3-4b/lora/reward")
    assert set(load_file(reward_dir / "value_head.safetensors")) == {"v_head.summary.weight", "v_head.summary.bias"}
    assert read_trainer_log(reward_dir)[-1]["total_steps"] == 3
    capsys.readouterr()
    # 3. LoRA PPO against that reward model
    ppo = write_example("train_lora/llama3_lora_ppo.yaml", ppo_example(model, str(reward_dir)))
    assert main(["train", ppo, *ON_CPU]) == 0
    assert "value head initialised from the reward model's head" in capsys.readouterr().err
    ppo_dir = Path("saves/llama3-8b/lora/ppo")
    ppo_log = read_trainer_log(ppo_dir)
    assert ppo_log[-1]["total_steps"] == 3 and "reward" in ppo_log[-1]
    assert (ppo_dir / "adapter_model.safetensors").is_file()
    # 4. merge the SFT adapter: each target weight is W + (alpha / r) B A
    merge = write_example("merge_lora/qwen3_lora_sft.yaml",
                          merge_example(model, str(sft_dir), "saves/qwen3_sft_merged"))
    assert main(["export", merge]) == 0, capsys.readouterr().err
    merged = load_file("saves/qwen3_sft_merged/model.safetensors")
    base = load_file(model / "model.safetensors")
    adapter_config = json.loads((sft_dir / "adapter_config.json").read_text())
    scaling = adapter_config["lora_alpha"] / adapter_config["r"]
    name = "model.layers.0.self_attn.q_proj.weight"
    a = lora[f"base_model.model.{name.replace('.weight', '.lora_A.weight')}"]
    b = lora[f"base_model.model.{name.replace('.weight', '.lora_B.weight')}"]
    expected = base[name] + scaling * b @ a
    assert not torch.equal(merged[name], base[name])
    torch.testing.assert_close(merged[name], expected, rtol=0,
                               atol=float32_tolerance(base[name].abs().max() + scaling * (b.abs() @ a.abs()).max(),
                                                      terms=adapter_config["r"]))
    # 5. chat through the adapter and through the merged model: the same weights, the same reply
    capsys.readouterr()
    with_adapter = chat_reply(write_example("inference/qwen3_lora_sft.yaml", inference_example(model, str(sft_dir))),
                              monkeypatch, capsys)
    with_merged = chat_reply(write_example("inference/qwen3_full_sft.yaml",
                                           inference_example("saves/qwen3_sft_merged")), monkeypatch, capsys)
    assert with_adapter == with_merged and with_adapter


@pytest.mark.parametrize("example", ["train_full/qwen3_full_sft.yaml", "train_lora/qwen3_lora_sft_ds3.yaml"])
def test_deepspeed_examples_say_what_to_install_and_how_to_launch(workspace, tiny_model_dir, capsys, example):
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed: the run then needs a launcher and an accelerator instead")
    if example.startswith("train_full"):
        text = full_sft_example(tiny_model_dir)
    else:
        text = lora_example(tiny_model_dir, "sft", "identity,alpaca_en_demo", "saves/qwen3-4b/lora/sft",
                            method="deepspeed: examples/deepspeed/ds_z3_config.json  # choices: [ds_z0_config.json, "
                                   "ds_z2_config.json, ds_z3_config.json]\n", accumulation=2)
    assert main(["train", write_example(example, text)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "pip install deepspeed" in error and "accelerate launch" in error
    assert not Path("saves").exists()


def test_dpo_example_names_its_stage(workspace, tiny_model_dir, capsys):
    dpo = lora_example(tiny_model_dir, "dpo", "dpo_en_demo", "saves/qwen3-4b/lora/dpo", learning_rate="5.0e-6",
                       method="pref_beta: 0.1\npref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]\n")
    assert main(["train", write_example("train_lora/qwen3_lora_dpo.yaml", dpo)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "stage 'dpo' is not supported" in error and "pref_beta" not in error
    assert not Path("saves").exists()


# ------------------------------------------------- a switching user's keys and mistakes


@pytest.mark.parametrize("key, value, reason", [
    ("tool_format", "qwen", "tokenizer's own chat template"),
    ("num_beams", 4, "beam search is not implemented"),
    ("length_penalty", 0.5, "beam search"),
    ("reward_model_adapters", "saves/rm2", "merge the adapters into the reward model first"),
    ("ms_hub_token", "x", "ModelScope"),
    ("adapter_folder", "adapters", "subfolder"),
    ("add_tokens", "<x>", "tokenizer folder"),
    ("export_quantization_bit", 4, "GPTQ export is not implemented"),
    ("quantization_device_map", "auto", "its own device"),
    ("mix_strategy", "interleave_under", "concatenated"),
    ("ignore_pad_token_for_loss", False, "padding never counts"),
    ("train_from_scratch", True, "model's weights"),
])
def test_llamafactory_only_keys_say_why_they_are_refused(key, value, reason):
    """LLaMA-Factory keys we do not support: one line with the reason, not 'unknown key; did you mean ...'."""
    from rlhfkit.config import build_config
    from rlhfkit.errors import RlhfkitError

    with pytest.raises(RlhfkitError) as err:
        build_config({"model_name_or_path": "m", "output_dir": "o", "dataset": "d", key: value})
    message = str(err.value)
    assert "\n" not in message and f"{key}: {value!r} is not supported" in message and reason in message


@pytest.mark.parametrize("key, value", [("freeze_vision_tower", True), ("image_max_pixels", 589824),
                                        ("video_fps", 2.0), ("max_length", 1024), ("preprocessing_batch_size", 1000),
                                        ("use_kv_cache", True), ("logging_strategy", "steps")])
def test_keys_without_effect_on_text_models_are_accepted(key, value):
    """Keys LLaMA-Factory's web UI or generation settings write that change nothing for a text model here."""
    from rlhfkit.config import build_config

    config = build_config({"model_name_or_path": "m", "output_dir": "o", "dataset": "d", key: value})
    assert key in config.ignored_keys


@pytest.fixture(scope="module")
def tiny_causal_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("lora_target, fragment", [
    ("c_attn", "no module named 'c_attn' in the model; its linear layers are down_proj, gate_proj, k_proj"),
    ("q_proj v_proj", "no module named 'q_proj v_proj' in the model (separate names with commas)"),
])
def test_lora_target_naming_no_module_is_one_line(tiny_causal_lm, lora_target, fragment):
    """peft raises with a traceback when no target matches; the run stops naming the model's linear layers."""
    from rlhfkit.config import FinetuningArguments
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.models.adapters import setup_finetuning

    with pytest.raises(RlhfkitError, match=r"^lora_target: ") as err:
        setup_finetuning(tiny_causal_lm(), FinetuningArguments(lora_target=lora_target), [])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_lora_target_partly_missing_is_a_warning_and_trains_the_rest(tiny_causal_lm, caplog):
    """As peft (and so LLaMA-Factory) does, a name that matches nothing is skipped, but said."""
    from rlhfkit.config import FinetuningArguments
    from rlhfkit.models.adapters import setup_finetuning

    with caplog.at_level("WARNING"):
        model = setup_finetuning(tiny_causal_lm(), FinetuningArguments(lora_target="q_proj,c_attn"), [])
    assert "lora_target: no module named 'c_attn' in the model; skipped" in caplog.text
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj"}


def test_template_whose_turn_marker_is_not_a_token_warns(caplog):
    """llama3 on a tokenizer without <|eot_id|> (LLaMA-Factory would add the token): said, not silent."""
    from rlhfkit.config import DataArguments
    from rlhfkit.data import template_for
    from rlhfkit.models.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    with caplog.at_level("WARNING"):
        template_for(DataArguments(template="qwen3_nothink"), tokenizer)  # <|im_end|> is a token
        assert not caplog.records
        template_for(DataArguments(template="llama3"), tokenizer)
    assert "template llama3 ends turns with '<|eot_id|>', which is not one token of this tokenizer" in caplog.text
