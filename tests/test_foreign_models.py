"""Reward models from elsewhere: LLaMA-Factory's and TRL's value-head layouts, pickled heads refused
(never unpickled) with a conversion that works, one-label sequence classifiers under their own chat
template, and the value head we save read back the way LLaMA-Factory reads it."""

from __future__ import annotations

import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from conftest import (
    EOS_ID,
    TINY_HIDDEN,
    TINY_WIDEST,
    chat_prompt_ids,
    cpu_config,
    float32_tolerance,
    pad_prompts_and_responses,
    random_lora,
    random_value_head,
    raw_scores,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.tiny import CHATML_TEMPLATE, build_char_tokenizer
from rlhfkit.models.value_head import VALUE_HEAD_FILE, ValueHead
from rlhfkit.rewards.base import ScoringBatch
from rlhfkit.rewards.model import SeparateModelReward, SharedBaseReward
from rlhfkit.stages.ppo_models import build_ppo_models

LF_KEYS = {"v_head.summary.weight", "v_head.summary.bias"}
# A chat template other than the policy's ChatML, in the same vocabulary.
OTHER_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")
CONVERSATIONS = [("write a", "abab"), ("hello there", "xyz"), ("q", "a longer reply")]
CLASSIFIER_HIDDEN, CLASSIFIER_WIDEST = 32, 64


def _head_tensors(seed: int, hidden: int = TINY_HIDDEN) -> dict[str, torch.Tensor]:
    head = random_value_head(hidden, seed, std=1.0, bias=0.25)
    return {f"v_head.{k}": v.detach().clone() for k, v in head.state_dict().items()}


def _write_lf_head(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """value_head.safetensors as LLaMA-Factory's fix_valuehead_checkpoint writes it."""
    save_file(tensors, str(folder / VALUE_HEAD_FILE), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    """Reward models in foreign layouts, written with peft / transformers / safetensors directly."""
    root = tmp_path_factory.mktemp("foreign")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # LLaMA-Factory, LoRA: the adapter and value_head.safetensors with v_head.summary.* keys.
    lf_lora = root / "lf_lora"
    random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 2, ("q_proj", "v_proj")).save_pretrained(lf_lora)
    _write_lf_head(lf_lora, _head_tensors(3))
    tokenizer.save_pretrained(lf_lora)
    # TRL's save_pretrained of a full model (and LLaMA-Factory before fixing a checkpoint): the head's
    # v_head.* tensors inside model.safetensors.
    trl_full = root / "trl_full"
    state = {**base.state_dict(), **_head_tensors(4)}
    base.save_pretrained(trl_full, state_dict=state)
    tokenizer.save_pretrained(trl_full)
    trl_sharded = root / "trl_sharded"  # the same, split into shards with an index
    base.save_pretrained(trl_sharded, state_dict=state, max_shard_size="50KB")
    assert len(list(trl_sharded.glob("model-*.safetensors"))) > 1
    return {"lf_lora": lf_lora, "trl_full": trl_full, "trl_sharded": trl_sharded,
            "heads": {"lf_lora": load_file(str(lf_lora / VALUE_HEAD_FILE)), "trl_full": _head_tensors(4),
                      "trl_sharded": _head_tensors(4)}}


def _classifier(folder: Path, template: str, labels: int = 1) -> Path:
    """A tiny LlamaForSequenceClassification (hidden 32) with the character tokenizer and `template`."""
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=CLASSIFIER_HIDDEN, intermediate_size=CLASSIFIER_WIDEST,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2,
                         num_labels=labels, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(11)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ppo_config(tiny_model_dir, tmp_path, **keys):
    values = dict(stage="ppo", model_name_or_path=str(tiny_model_dir), dataset="unused.jsonl",
                  output_dir=str(tmp_path / "out"), per_device_eval_batch_size=2, finetuning_type="lora")
    return cpu_config({**values, **keys})


def _policy_batch(tokenizer) -> ScoringBatch:
    """ChatML prompts (left-padded) and replies ending in EOS (right-padded), in the policy's tokens."""
    prompts = [chat_prompt_ids(tokenizer, prompt) for prompt, _ in CONVERSATIONS]
    responses = [tokenizer(reply, add_special_tokens=False)["input_ids"] + [EOS_ID] for _, reply in CONVERSATIONS]
    *_, ids, mask = pad_prompts_and_responses(prompts, responses)
    return ScoringBatch(prompts=[p for p, _ in CONVERSATIONS], responses=[r for _, r in CONVERSATIONS],
                        messages=[[{"role": "user", "content": p}] for p, _ in CONVERSATIONS],
                        systems=[None] * len(CONVERSATIONS), sequence_ids=ids, sequence_mask=mask)


def _only_source(config):
    models = build_ppo_models(config, load_tokenizer(config.model), torch.device("cpu"))
    (source, _), = models.rewards
    return models, source


# ------------------------------------------------------------------------------- value heads


@pytest.mark.parametrize("layout", ["lf_lora", "trl_full", "trl_sharded"])
def test_foreign_value_head_layouts_load_exactly(folders, layout):
    head = ValueHead.load(folders[layout], TINY_HIDDEN)
    saved = folders["heads"][layout]
    assert torch.equal(head.summary.weight, saved["v_head.summary.weight"])
    assert torch.equal(head.summary.bias, saved["v_head.summary.bias"])


def test_llamafactory_lora_reward_model_shares_the_base_and_seeds_the_critic(tiny_model_dir, tmp_path, folders):
    config = _ppo_config(tiny_model_dir, tmp_path, reward_model=str(folders["lf_lora"]), reward_model_type="lora")
    models, source = _only_source(config)
    assert isinstance(source, SharedBaseReward)
    saved = folders["heads"]["lf_lora"]
    assert torch.equal(source.value_head.summary.weight, saved["v_head.summary.weight"])
    assert torch.equal(models.value_head.summary.weight, saved["v_head.summary.weight"])  # value_head_init: auto
    tokenizer = load_tokenizer(config.model)
    sequences = [chat_prompt_ids(tokenizer, p) + tokenizer(r, add_special_tokens=False)["input_ids"] + [EOS_ID]
                 for p, r in CONVERSATIONS]
    rm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folders["lf_lora"]).eval()
    expected, magnitudes = raw_scores(rm, source.value_head, sequences)
    scores = source.score(_policy_batch(tokenizer))
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=float32_tolerance(magnitudes, TINY_WIDEST))


def test_trl_full_reward_model_with_the_head_inside_its_weights(tiny_model_dir, tmp_path, folders):
    config = _ppo_config(tiny_model_dir, tmp_path, reward_model=str(folders["trl_full"]), reward_model_type="full")
    _, source = _only_source(config)
    assert isinstance(source, SeparateModelReward) and source.same_tokenizer
    tokenizer = load_tokenizer(config.model)
    sequences = [chat_prompt_ids(tokenizer, p) + tokenizer(r, add_special_tokens=False)["input_ids"] + [EOS_ID]
                 for p, r in CONVERSATIONS]
    # The LM's weights are the tiny model's: its extra v_head.* tensors were read as the head only.
    expected, magnitudes = raw_scores(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                      ValueHead.load(folders["trl_full"]), sequences)
    scores = source.score(_policy_batch(tokenizer))
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=float32_tolerance(magnitudes, TINY_WIDEST))


class _RunsCode:
    """A pickle whose loading creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("name,adapter", [("value_head.bin", False), ("pytorch_model.bin", True)])
def test_pickled_heads_are_refused_without_unpickling(tmp_path, folders, name, adapter):
    folder = tmp_path / "rm"
    folder.mkdir()
    if adapter:  # TRL's LoRA reward model: the adapter plus the head in pytorch_model.bin
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / file).write_bytes((folders["lf_lora"] / file).read_bytes())
    marker = tmp_path / "unpickled"
    (folder / name).write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(RlhfkitError) as info:
        ValueHead.load(folder)
    message = str(info.value)
    assert "\n" not in message and "pickle" in message and str(folder / name) in message
    assert not marker.exists()


def test_conversion_command_of_a_pickled_head_works(tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    saved = _head_tensors(5)
    torch.save(saved, folder / "value_head.bin")  # LLaMA-Factory with save_safetensors: false
    with pytest.raises(RlhfkitError) as info:
        ValueHead.load(folder)
    command = shlex.split(str(info.value).split("safetensors: ", 1)[1])
    assert command[0] == "python"
    subprocess.run([sys.executable, *command[1:]], check=True, timeout=120)
    head = ValueHead.load(folder, TINY_HIDDEN)
    assert torch.equal(head.summary.weight, saved["v_head.summary.weight"])
    assert torch.equal(head.summary.bias, saved["v_head.summary.bias"])


def test_saved_head_reads_back_as_llamafactory_reads_it(tmp_path):
    """LLaMA-Factory loads value_head.safetensors into AutoModelForCausalLMWithValueHead (its head is
    `v_head.summary`, a Linear(hidden, 1)) and, for a LoRA reward model in PPO, indexes
    `v_head.summary.weight` / `v_head.summary.bias` directly."""
    head = random_value_head(TINY_HIDDEN, 6, std=1.0, bias=0.5)
    head.save(tmp_path)
    tensors = load_file(str(tmp_path / VALUE_HEAD_FILE))
    assert set(tensors) == LF_KEYS
    wrapper = nn.Module()
    wrapper.v_head = nn.Module()
    wrapper.v_head.summary = nn.Linear(TINY_HIDDEN, 1)
    wrapper.load_state_dict(tensors, strict=True)
    assert torch.equal(wrapper.v_head.summary.weight, head.summary.weight)
    assert torch.equal(tensors["v_head.summary.bias"], head.summary.bias)


# --------------------------------------------------------------------- sequence classifiers


@torch.no_grad()
def _classifier_scores(folder: Path, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own score of each unpadded sequence, and its summands' magnitude |w . h|."""
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    scores, magnitudes = [], []
    for sequence in sequences:
        out = model(input_ids=torch.tensor([sequence]), output_hidden_states=True)
        scores.append(float(out.logits[0, 0]))
        magnitudes.append(float((out.hidden_states[-1][0, -1] * model.score.weight[0]).abs().sum()))
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(magnitudes, dtype=torch.float64)


@pytest.mark.parametrize("template,re_rendered", [(CHATML_TEMPLATE, False), (OTHER_TEMPLATE, True)])
def test_sequence_classifier_scores_its_own_rendering(tiny_model_dir, tmp_path, template, re_rendered):
    """The classifier's score at the last token of the conversation as its own chat template renders it
    (the policy's ids as they are when that rendering is the policy's)."""
    folder = _classifier(tmp_path / "classifier", template)
    config = _ppo_config(tiny_model_dir, tmp_path, reward_model=str(folder), reward_model_type="full")
    models, source = _only_source(config)
    assert isinstance(source, SeparateModelReward) and source.same_tokenizer == (not re_rendered)
    tokenizer = load_tokenizer(config.model)
    scores = source.score(_policy_batch(tokenizer))
    rm_tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = [rm_tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                                 tokenize=False) for p, r in CONVERSATIONS]
    own = [text[:text.rindex("<|im_end|>") + len("<|im_end|>")] for text in rendered]  # up to the reply's end
    expected, magnitudes = _classifier_scores(folder, [rm_tokenizer(t, add_special_tokens=False)["input_ids"]
                                                       for t in own])
    atol = float32_tolerance(magnitudes, CLASSIFIER_WIDEST)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=atol)
    if re_rendered:  # the policy's ChatML rendering would have scored otherwise
        chatml = [chat_prompt_ids(tokenizer, p) + tokenizer(r, add_special_tokens=False)["input_ids"] + [EOS_ID]
                  for p, r in CONVERSATIONS]
        assert float((_classifier_scores(folder, chatml)[0] - expected).abs().max()) > 100 * atol
    # A head of another hidden size than the policy's cannot seed the critic.
    assert float(models.value_head.summary.weight.abs().max()) == 0.0


def test_classifier_with_two_labels_is_refused(tiny_model_dir, tmp_path):
    folder = _classifier(tmp_path / "two_labels", CHATML_TEMPLATE, labels=2)
    config = _ppo_config(tiny_model_dir, tmp_path, reward_model=str(folder), reward_model_type="full")
    with pytest.raises(RlhfkitError) as info:
        _only_source(config)
    assert "2 labels" in str(info.value) and "num_labels: 1" in str(info.value) and "\n" not in str(info.value)
