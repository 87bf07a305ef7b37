"""Two CPU processes over gloo equal one process holding both processes' data.

Each test launches `accelerate launch` (with the configs in examples/accelerate: DDP, and FSDP2,
which rlhfkit runs over gloo on CPU) or `torchrun` with 2 processes, and compares with the same work done in this process with twice the
per-process batch: weights after the updates, logged losses and gradient norms. The data are
chosen so that one step leaves a process with no real sample (it runs a zero-weight one), and
sequences have different lengths (the loss is normalised by counts over all processes).

Every run is pinned to the CPU (``device: cpu``): on a machine with one GPU the two launched
processes would otherwise share it (NCCL refuses), and the one-process run would use other kernels
than the processes it is compared with.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    COMPARABLE_ADAM_EPSILON,
    TINY_HIDDEN,
    adamw_weight_tolerance,
    cpu_config,
    float32_tolerance,
    statistic_tolerances,
    write_cpu_config,
    write_jsonl,
)
from rlhfkit.stages import run_stage
from rlhfkit.tracking.trainer_log import read_trainer_log

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLES = ROOT / "examples" / "accelerate"
TIMEOUT = 240
# Each compared run: 3 steps at learning rate 1e-3 over at most 4 sequences of 48 tokens per step,
# through layers up to 128 wide.
STEPS, LEARNING_RATE, TERMS = 3, 1e-3, 4 * 48 * 128


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(command: list[str]) -> str:
    """Run a 2-process launch to completion; its output, or a failure showing the end of it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _accelerate(config_file: str, *args: str) -> str:
    return _launch([str(BIN / "accelerate"), "launch", "--config_file", str(EXAMPLES / config_file),
                    "--num_processes", "2", "--main_process_port", str(_free_port()),
                    *args])


def _train_two_processes(config_file: str, tmp_path: Path, values: dict) -> None:
    path = write_cpu_config(tmp_path / "two.yaml", values)
    _accelerate(config_file, "-m", "rlhfkit.cli", "train", str(path))


def _assert_same_training(one: Path, two: Path, files: list[str], keys: tuple[str, ...], base: dict | None = None):
    """Same saved tensors and the same logged statistics at every step, to float rounding.

    Gradients are summed in another order over two processes (float32 rounding). The runs train
    with `COMPARABLE_ADAM_EPSILON`, so AdamW's steps carry that rounding into the weights by at most
    `adamw_weight_tolerance` (conftest); with the default adam_epsilon a gradient that cancels to ~0
    would turn it into a step of either sign. Logged losses and norms: float32 rounding of sums over
    a step's positions and layers, relative to their size.
    """
    atol = adamw_weight_tolerance(LEARNING_RATE, STEPS, TERMS)
    moved = 0
    for name in files:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert set(a) == set(b), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=lambda m, key=key: f"{name}:{key}: {m}")
            if base is not None and key in base:
                moved += not torch.equal(a[key], base[key])
    if base is not None:
        assert moved > 0  # the runs changed the weights: not a comparison of two untouched copies
    log_one, log_two = read_trainer_log(one), read_trainer_log(two)
    assert [r["current_steps"] for r in log_one] == [r["current_steps"] for r in log_two]
    for key in keys:
        assert [r[key] for r in log_two] == pytest.approx([r[key] for r in log_one], rel=float32_tolerance(1.0, TERMS),
                                                          abs=0), key


# ---------------------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("launch_config", ["ddp.yml", "fsdp.yml"])
def test_sft_two_processes_equal_one_with_twice_the_batch(tiny_model_dir, tmp_path, launch_config):
    # 9 replies of 1 to 17 characters, 4 per step: the third step has 1 sample, so the second
    # process holds only padding there.
    rows = [{"instruction": f"say {i}", "output": "abcdefghijklmnopq"[: 1 + 2 * i]} for i in range(9)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    common = dict(stage="sft", model_name_or_path=str(tiny_model_dir), dataset=str(data), finetuning_type="full",
                  learning_rate=LEARNING_RATE, lr_scheduler_type="constant", max_steps=STEPS, logging_steps=1,
                  save_steps=0, gradient_accumulation_steps=2, adam_epsilon=COMPARABLE_ADAM_EPSILON)
    run_stage(cpu_config(dict(common, output_dir=str(tmp_path / "one"), per_device_train_batch_size=2)))
    _train_two_processes(launch_config, tmp_path, dict(common, output_dir=str(tmp_path / "two"),
                                                       per_device_train_batch_size=1))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    _assert_same_training(tmp_path / "one", tmp_path / "two", ["model.safetensors"], ("loss", "grad_norm"), base)


# ----------------------------------------------------------------------------------------- RM


@pytest.mark.parametrize("launch_config", ["ddp.yml", "fsdp.yml"])
def test_rm_two_processes_equal_one_with_twice_the_batch(tiny_model_dir, tmp_path, launch_config):
    rng = random.Random(0)

    def word(alphabet):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 12)))

    rows = [{"instruction": f"q{i}", "chosen": word("abcdefghijklm"), "rejected": word("nopqrstuvwxyz")}
            for i in range(9)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    common = dict(stage="rm", model_name_or_path=str(tiny_model_dir), dataset=str(data), finetuning_type="lora",
                  learning_rate=LEARNING_RATE, lr_scheduler_type="constant", max_steps=STEPS, logging_steps=1,
                  save_steps=0, adam_epsilon=COMPARABLE_ADAM_EPSILON)
    run_stage(cpu_config(dict(common, output_dir=str(tmp_path / "one"), per_device_train_batch_size=4)))
    _train_two_processes(launch_config, tmp_path, dict(common, output_dir=str(tmp_path / "two"),
                                                       per_device_train_batch_size=2))
    _assert_same_training(tmp_path / "one", tmp_path / "two", ["adapter_model.safetensors", "value_head.safetensors"],
                          ("loss", "accuracy", "margin", "grad_norm"))


# ---------------------------------------------------------------------------- one PPO update


def _ppo_update_driver():
    spec = importlib.util.spec_from_file_location("ppo_update", ROOT / "tests" / "distributed" / "ppo_update.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_one_ppo_update_two_processes_equals_one(tiny_model_dir, tmp_path, kind):
    _ppo_update_driver().main(str(tiny_model_dir), str(tmp_path / "one.pt"), kind)
    _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
             str(ROOT / "tests" / "distributed" / "ppo_update.py"), str(tiny_model_dir), str(tmp_path / "two.pt"), kind])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["stats"]["policy_clipfrac"] > 0  # the clipped branch is exercised
    assert set(two["stats"]) == set(one["stats"])
    # float32 sums over the rollout's positions (8 rows of at most 8 + 7 tokens) through layers up to
    # 128 wide, summed in another order over two processes.
    terms = 8 * 15 * 128
    rel, abs_ = statistic_tolerances(one["stats"], terms)
    for key, value in one["stats"].items():
        assert two["stats"][key] == pytest.approx(value, rel=rel, abs=abs_), key
    # One SGD step (lr 0.1) of gradients clipped to norm 1: every element is below min(grad_norm, 1),
    # and the step carries the gradients' rounding times the learning rate into the weights.
    atol = 0.1 * float32_tolerance(min(one["stats"]["grad_norm"], 1.0), terms)
    assert set(two["weights"]) == set(one["weights"])
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------------------------- FSDP PPO


def test_fsdp_ppo_run_saves_a_model_that_reloads_generates_and_resumes(tiny_model_dir, tmp_path, reward_functions):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {w}{i}"} for w in "abcdefgh"
                                                       for i in range(2)])
    out = tmp_path / "out"
    values = dict(
        stage="ppo", model_name_or_path=str(tiny_model_dir), dataset=str(prompts), output_dir=str(out),
        finetuning_type="lora", reward_model=f"{reward_functions}:letters", reward_model_type="function",
        per_device_train_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2, max_steps=2, save_steps=1,
        logging_steps=1, learning_rate=1e-2, max_new_tokens=6, top_k=0, temperature=1.0)
    _train_two_processes("fsdp.yml", tmp_path, values)
    log = read_trainer_log(out)
    assert [r["current_steps"] for r in log] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 and r["response_length"] >= 1 for r in log)
    # A checkpoint under FSDP: the gathered model files and the sharded training state.
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-1" / "sharded_state").is_dir()
    # The saved adapter holds full (gathered) weights that moved from LoRA's zero start.
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in key and float(value.abs().max()) > 0 for key, value in adapter.items())
    head = load_file(str(out / "value_head.safetensors"))
    weight = head["v_head.summary.weight"]  # LLaMA-Factory's key name
    assert weight.shape == (1, TINY_HIDDEN) and float(weight.abs().max()) > 0
    # Reload with plain peft and generate.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("<|im_start|>user\nwrite a0<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
    assert generated.shape[1] > ids.shape[1]
    # Resuming from the sharded checkpoint of step 1 ends exactly where the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    _train_two_processes("fsdp.yml", tmp_path, dict(values, output_dir=str(resumed), resume_from_checkpoint=True))
    # The resumed run replays the same computation (same data, RNG states, reduction order): equal to
    # the bit, as a resumed one-process run is (test_resume.py).
    assert [r["loss"] for r in read_trainer_log(resumed)] == [r["loss"] for r in log][1:]
    again = load_file(str(resumed / "adapter_model.safetensors"))
    for key, value in adapter.items():
        assert torch.equal(again[key], value), key
