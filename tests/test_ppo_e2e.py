"""End-to-end PPO runs of the `ppo` stage on the tiny character-level Llama.

A rule reward (share of letters a-m in the response) is learnable in a dozen PPO steps; reward
models come from real `sft` / `rm` stage runs built once per module.
"""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import EPS32, REWARD_FUNCTIONS, chat_prompt_ids, cpu_config, untrained_kl_tolerance, write_jsonl
from rlhfkit.config import PPOArguments, TrainingArguments
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.value_head import VALUE_HEAD_FILE
from rlhfkit.stages import run_stage
from rlhfkit.tracking.trainer_log import read_trainer_log

STAT_KEYS = ("reward", "kl", "kl_k3", "kl_coef", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac",
             "approx_kl", "explained_variance", "response_length", "ended_with_eos", "time/rollout", "time/score",
             "time/evaluate", "time/update", "tokens_per_second", "lr", "loss")

# The shared reward functions (`letters`: the share of a-m, learnable in a dozen steps) and ones
# that misbehave.
REWARD_CODE = REWARD_FUNCTIONS + """
import math

def constant(prompts, responses):
    return [5.0] * len(responses)

def raises(prompts, responses):
    raise ValueError("the reward service is down")

def raises_multiline(prompts, responses):
    raise ValueError("first line\\nsecond line")

def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)

def nan(prompts, responses):
    return [0.5] * (len(responses) - 1) + [math.nan]

def words(prompts, responses):
    return ["high"] * len(responses)
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    """Prompt file, reward functions, and an SFT adapter plus LoRA and full RMs from real stage runs."""
    root = tmp_path_factory.mktemp("ppo_assets")
    prompts = write_jsonl(root / "prompts.jsonl", [{"instruction": f"write {w}{i}"} for w in "abcdefgh"
                                                   for i in range(4)])
    (root / "rew.py").write_text(REWARD_CODE)
    base = {"model_name_or_path": str(tiny_model_dir), "logging_steps": 5}
    sft_data = write_jsonl(root / "sft.jsonl", [{"instruction": f"write {w}", "output": w * 3} for w in "abcdefgh"])
    run_stage(cpu_config({**base, "stage": "sft", "finetuning_type": "lora", "dataset": str(sft_data),
                            "output_dir": str(root / "sft"), "learning_rate": 3e-2,
                            "per_device_train_batch_size": 8, "max_steps": 10}))
    rng = random.Random(0)

    def word(alphabet):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8)))

    pairs = write_jsonl(root / "pairs.jsonl", [{"instruction": f"write {rng.choice('abcdefgh')}",
                                                "chosen": word("abcdefghijklm"), "rejected": word("nopqrstuvwxyz")}
                                               for _ in range(64)])
    for kind, lr in (("lora", 1e-2), ("full", 1e-3)):
        run_stage(cpu_config({**base, "stage": "rm", "finetuning_type": kind, "dataset": str(pairs),
                                "output_dir": str(root / f"rm_{kind}"), "learning_rate": lr,
                                "per_device_train_batch_size": 16, "max_steps": 8}))
    return {"root": root, "prompts": prompts, "rew": root / "rew.py", "sft": root / "sft",
            "rm_lora": root / "rm_lora", "rm_full": root / "rm_full"}


def _ppo(model_dir, assets, output_dir, **keys):
    values = dict(stage="ppo", model_name_or_path=str(model_dir), dataset=str(assets["prompts"]),
                  output_dir=str(output_dir), finetuning_type="lora", learning_rate=1e-2,
                  per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=2, logging_steps=1,
                  max_new_tokens=8, top_k=0, top_p=1.0, temperature=1.0, kl_coef=0.01)
    if "reward_models" not in keys and "reward_model" not in keys:
        values.update(reward_model=f"{assets['rew']}:letters", reward_model_type="function")
    values.update(keys)
    return run_stage(cpu_config(values))


# ------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("finetuning_type,learning_rate,steps", [("lora", 1e-2, 12), ("full", 3e-3, 15)])
def test_function_reward_rises(tiny_model_dir, assets, tmp_path, finetuning_type, learning_rate, steps):
    out = tmp_path / "out"
    final = _ppo(tiny_model_dir, assets, out, finetuning_type=finetuning_type, learning_rate=learning_rate,
                 max_steps=steps)
    log = read_trainer_log(out)
    assert [r["current_steps"] for r in log] == list(range(1, steps + 1))
    for record in log:
        missing = [key for key in STAT_KEYS if not isinstance(record.get(key), (int, float))]
        assert not missing, f"step {record['current_steps']}: missing {missing}"
        assert 0.0 <= record["reward"] <= 1.0
        assert record["reward"] == record["score/function"]  # one source of weight 1: the same number
        assert 1.0 <= record["response_length"] <= 8.0
        assert 0.0 <= record["ended_with_eos"] <= 1.0
    rewards = [r["reward"] for r in log]
    assert sum(rewards[-3:]) / 3 >= rewards[0] + 0.3, rewards
    # Before the first update the policy is the reference: no KL beyond float32 rounding.
    kl_atol = untrained_kl_tolerance(tiny_model_dir, 8)
    assert abs(log[0]["kl"]) <= kl_atol and abs(log[0]["kl_k3"]) <= kl_atol
    assert log[-1]["kl"] > 0.1
    assert final["reward"] == log[-1]["reward"]
    assert (out / VALUE_HEAD_FILE).is_file()
    if finetuning_type == "full":
        assert (out / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(out)
        assert not any("summary" in k for k in load_file(str(out / "model.safetensors")))
    else:
        assert (out / "adapter_model.safetensors").is_file()
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    # The saved policy samples the learned behaviour: mostly letters a-m.
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    ids = torch.tensor([chat_prompt_ids(tokenizer, "write c1")] * 16)
    with torch.no_grad():
        sampled = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 max_new_tokens=8, pad_token_id=0, eos_token_id=2)
    texts = tokenizer.batch_decode(sampled[:, ids.shape[1]:], skip_special_tokens=True)
    share = sum(sum(c in "abcdefghijklm" for c in t) / max(len(t), 1) for t in texts) / len(texts)
    assert share >= rewards[0] + 0.2, (share, texts)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_gradient_checkpointing_does_not_change_the_run(tiny_model_dir, assets, tmp_path, finetuning_type):
    runs = {}
    for checkpointing in (False, True):
        out = tmp_path / f"gc{int(checkpointing)}"
        _ppo(tiny_model_dir, assets, out, finetuning_type=finetuning_type, gradient_checkpointing=checkpointing,
             per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2 if finetuning_type == "lora" else 1e-3)
        runs[checkpointing] = read_trainer_log(out)
    # Recomputing a block's forward pass in the backward runs the same kernels on the same inputs (on
    # the CPU, which the run is pinned to): every logged number is equal to the bit.
    for key in ("reward", "kl", "loss", "policy_loss", "value_loss", "grad_norm", "response_length"):
        plain = [r[key] for r in runs[False]]
        assert [r[key] for r in runs[True]] == plain, key
    assert runs[False][-1]["kl"] > 0  # the policy moved, so the comparison covers updates


# ------------------------------------------------------------------------------ reward models


def test_lora_reward_model_with_sft_adapter(tiny_model_dir, assets, tmp_path):
    out = tmp_path / "out"
    _ppo(tiny_model_dir, assets, out, reward_model=str(assets["rm_lora"]), reward_model_type="lora",
         adapter_name_or_path=str(assets["sft"]), max_steps=3, per_device_train_batch_size=4)
    log = read_trainer_log(out)
    assert len(log) == 3 and all("score/lora" in r for r in log)
    # The reference is the frozen SFT adapter, which the policy starts from: no KL before the first update.
    assert abs(log[0]["kl"]) <= untrained_kl_tolerance(tiny_model_dir, 8)
    assert log[-1]["kl"] != 0.0
    assert (out / VALUE_HEAD_FILE).is_file()
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    # Only the policy adapter is saved, not the frozen reference or reward adapters.
    assert not (out / "reward").exists() and not (out / "reference").exists()
    sft = load_file(str(assets["sft"] / "adapter_model.safetensors"))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == set(sft)
    assert any(not torch.allclose(saved[k], sft[k]) for k in sft), "the policy adapter did not train"
    # It reloads on the base and generates.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([chat_prompt_ids(tokenizer, "write a")])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=4, pad_token_id=0, eos_token_id=2)
    assert generated.shape[1] > ids.shape[1]


@pytest.mark.parametrize("init", ["auto", "zero"])
def test_value_head_initialised_from_lora_reward_model(tiny_model_dir, assets, tmp_path, init):
    out = tmp_path / "out"
    learning_rate = 1e-9
    _ppo(tiny_model_dir, assets, out, reward_model=str(assets["rm_lora"]), reward_model_type="lora",
         adapter_name_or_path=str(assets["sft"]), max_steps=1, learning_rate=learning_rate, value_head_init=init)
    rm_head = load_file(str(assets["rm_lora"] / VALUE_HEAD_FILE))
    head = load_file(str(out / VALUE_HEAD_FILE))
    assert set(head) == set(rm_head)
    assert rm_head["v_head.summary.weight"].abs().max() > 1e-3  # a trained, non-zero head
    for name, tensor in rm_head.items():
        expected = tensor if init == "auto" else torch.zeros_like(tensor)
        # One PPO step is ppo_epochs AdamW steps (one mini-batch each), each moving a weight by at most
        # lr (1 - beta1) / sqrt(1 - beta2) (Kingma & Ba, section 2.1); the saved float32 value is then
        # rounded (half an ulp).
        t = TrainingArguments()
        step_bound = learning_rate * (1 - t.adam_beta1) / math.sqrt(1 - t.adam_beta2)
        atol = PPOArguments().ppo_epochs * step_bound + EPS32 * float(expected.abs().max())
        torch.testing.assert_close(head[name], expected, atol=atol, rtol=0, msg=name)


def test_full_reward_model(tiny_model_dir, assets, tmp_path):
    out = tmp_path / "out"
    final = _ppo(tiny_model_dir, assets, out, reward_model=str(assets["rm_full"]), reward_model_type="full",
                 max_steps=2)
    log = read_trainer_log(out)
    assert len(log) == 2 and all("score/full" in r and r["reward"] == r["score/full"] for r in log)
    assert "reward" in final and (out / VALUE_HEAD_FILE).is_file() and (out / "adapter_model.safetensors").is_file()


def test_several_reward_sources_weighted(tiny_model_dir, assets, tmp_path):
    out = tmp_path / "out"
    rew = assets["rew"]
    _ppo(tiny_model_dir, assets, out, max_steps=3,
         reward_models=[{"path": f"{rew}:letters", "type": "function", "weight": 1.0, "name": "a"},
                        {"path": f"{rew}:constant", "type": "function", "weight": 0.0, "name": "b"}])
    log = read_trainer_log(out)
    assert len(log) == 3
    for record in log:
        assert record["score/b"] == 5.0 and record["score_std/b"] == 0.0  # exact in binary floating point
        assert record["reward"] == record["score/a"]  # 1.0 * a + 0.0 * 5.0 is a, to the bit
    # The same run with only source a (same seed) is the same computation: the same trajectory.
    single = tmp_path / "single"
    _ppo(tiny_model_dir, assets, single, max_steps=3)
    assert [r["reward"] for r in read_trainer_log(single)] == [r["reward"] for r in log]


# ------------------------------------------------------------------------------ bad input


def _assert_fails_cleanly(out, pattern, run):
    with pytest.raises(RlhfkitError) as info:
        run()
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(pattern, message), message
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    return message


def test_no_reward_model_is_refused(tiny_model_dir, assets, tmp_path):
    out = tmp_path / "out"
    _assert_fails_cleanly(out, "reward_model", lambda: run_stage(cpu_config(dict(
        stage="ppo", model_name_or_path=str(tiny_model_dir), dataset=str(assets["prompts"]),
        output_dir=str(out)))))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_reward_folder_without_value_head(tiny_model_dir, assets, tmp_path, kind):
    out = tmp_path / "out"
    folder = assets["sft"] if kind == "lora" else tiny_model_dir
    _assert_fails_cleanly(out, re.escape(VALUE_HEAD_FILE), lambda: _ppo(
        tiny_model_dir, assets, out, reward_model=str(folder), reward_model_type=kind))


@pytest.mark.parametrize("function,pattern", [
    ("raises", "raised ValueError: the reward service is down"),
    ("raises_multiline", "raised ValueError: first line second line"),
    ("too_few", "returned 15 scores for 16 responses"),
    ("nan", "non-finite score"),
    ("words", "non-numeric"),
])
def test_bad_reward_function(tiny_model_dir, assets, tmp_path, function, pattern):
    out = tmp_path / "out"
    message = _assert_fails_cleanly(out, pattern, lambda: _ppo(
        tiny_model_dir, assets, out, reward_model=f"{assets['rew']}:{function}", reward_model_type="function"))
    # The source is named as configured: a lone reward_model is named by its type.
    assert "'function'" in message


def test_dataset_smaller_than_rollout_batch(tiny_model_dir, assets, tmp_path):
    out = tmp_path / "out"
    small = write_jsonl(tmp_path / "few.jsonl", [{"instruction": f"write {w}"} for w in "abcd"])
    _assert_fails_cleanly(out, "4 prompts, fewer than one rollout batch \\(16", lambda: _ppo(
        tiny_model_dir, assets, out, dataset=str(small)))
