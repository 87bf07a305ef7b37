"""PPO's models: policy + value head, reference, reward sources, sharing one base where possible.

With LoRA, one base serves all: the policy is adapter `default` (resumed from the SFT adapter when
one is given), the reference is adapter `reference` (a frozen copy of that SFT adapter) or the base
with adapters disabled, and a LoRA reward model is adapter `reward` plus its value head. Full
fine-tuning holds a frozen copy for the reference, and a separate model for the reward.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import Config
from rlhfkit.config.validation import check_reward_models
from rlhfkit.data import get_template, template_for
from rlhfkit.errors import RlhfkitError, fail
from rlhfkit.models.adapters import (
    adapter_base_path,
    apply_frozen_adapters,
    check_adapter_dir,
    load_frozen_adapter,
    setup_finetuning,
    split_paths,
)
from rlhfkit.models.classifier import classifier_labels, load_reward_classifier
from rlhfkit.models.compile import compile_blocks
from rlhfkit.models.fingerprint import check_reward_base
from rlhfkit.models.forward import backbone_scores
from rlhfkit.models.loading import (
    disable_dropout,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
)
from rlhfkit.models.value_head import ValueHead, has_value_head
from rlhfkit.rewards.api import ApiReward
from rlhfkit.rewards.function import FunctionReward
from rlhfkit.rewards.model import REWARD_ADAPTER, SeparateModelReward, SharedBaseReward, active_adapter

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"


@dataclass
class RewardSpec:
    """One reward source as configured."""

    path: str
    type: str
    weight: float = 1.0
    name: str = ""


@dataclass
class PPOModels:
    """Everything PPO runs: the trainable policy and head, the reference and the reward sources."""

    policy: Any
    value_head: ValueHead | None
    """The critic; None for the critic-free estimators."""
    reference: Any
    reference_adapter: str | None
    """Adapter that makes `reference` the reference: `reference`, None (adapters disabled) or "" (own model)."""
    rewards: list[tuple[Any, float]] = field(default_factory=list)

    def reference_context(self):
        """Context in which `reference` computes reference log-probs."""
        if self.reference_adapter == "":
            return contextlib.nullcontext()
        return active_adapter(self.reference, self.reference_adapter)


def reward_specs(config: Config) -> list[RewardSpec]:
    """The configured reward sources, from reward_model or the reward_models list."""
    p = config.ppo
    if not p.reward_models:
        return [RewardSpec(p.reward_model, p.reward_model_type, 1.0, p.reward_model_type)]
    check_reward_models(config.source, p.reward_models)
    specs = []
    for index, entry in enumerate(p.reward_models):
        kind = entry.get("type", "lora")
        specs.append(RewardSpec(str(entry["path"]), kind, float(entry.get("weight", 1.0)),
                                str(entry.get("name", f"{kind}{index}"))))
    return specs


def _same_vocab(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def check_lora_reward(path: str, config: Config, tokenizer) -> None:
    """A LoRA RM must be an adapter with a value head, trained on the policy's base and tokenizer."""
    check_adapter_dir(path)
    if not has_value_head(path):
        raise fail(f"{Path(path) / 'value_head.safetensors'} not found: {path} is not a reward model "
                   "(train one with stage: rm)")
    base = config.model.model_name_or_path
    check_reward_base(path, base, adapter_base_path(path), config.model.trust_remote_code)
    if (Path(path) / "tokenizer_config.json").is_file():
        rm_tokenizer = load_tokenizer(config.model, path)
        if not _same_vocab(rm_tokenizer, tokenizer):
            raise fail(f"reward adapter {path} has a different tokenizer than {base}; a lora RM must share "
                       "the policy's tokenizer (use reward_model_type: full for another model)")


def _load_frozen(path: str, config: Config, dtype, device, tokenizer=None, adapters: list[str] | None = None,
                 quantization_key: str | None = None):
    """A frozen model in eval mode; `quantization_key` names the config key of its quantization bits."""
    bits = getattr(config.ppo, quantization_key) if quantization_key else None
    model = load_causal_lm(path, config.model, dtype, device, tokenizer, quantization_bit=bits,
                           max_length=config.data.cutoff_len, quantization_key=quantization_key or "quantization_bit")
    if adapters:
        model = apply_frozen_adapters(model, adapters, "ref_model_adapters")
    model.requires_grad_(False)
    model.eval()
    disable_dropout(model)
    return model


def build_reward_source(spec: RewardSpec, config: Config, models: PPOModels, tokenizer, dtype, device,
                        shared_base_ok: bool):
    """Instantiate one reward source."""
    p = config.ppo
    chunk = config.training.per_device_eval_batch_size
    if spec.type == "function":
        return FunctionReward(spec.path, spec.name)
    if spec.type == "api":
        return ApiReward(spec.path, spec.name, p.reward_api_timeout, p.reward_api_retries)
    if spec.type == "lora":
        check_lora_reward(spec.path, config, tokenizer)
        hidden = models.policy.config.get_text_config().hidden_size
        head = ValueHead.load(spec.path, hidden).to(device)
        if shared_base_ok:
            # One adapter per LoRA reward source: `reward`, then `reward1`, `reward2`, ...
            adapter, number = REWARD_ADAPTER, 0
            while adapter in models.policy.peft_config:
                number += 1
                adapter = f"{REWARD_ADAPTER}{number}"
            load_frozen_adapter(models.policy, spec.path, adapter)
            models.policy.base_model.set_adapter("default")
            return SharedBaseReward(models.policy, head, spec.name, chunk, adapter)
        model = _load_frozen(config.model.model_name_or_path, config, dtype, device, tokenizer, [spec.path])
        return SeparateModelReward(model, head, tokenizer, template=None, same_tokenizer=True, name=spec.name,
                                   chunk_size=chunk)
    # full: its own model folder, a causal LM with a value head or a one-label sequence classifier
    if not Path(spec.path).is_dir():
        raise fail(f"reward model folder {spec.path} does not exist; set reward_model to an RM folder")
    classifier = classifier_labels(spec.path) is not None
    if not classifier and not has_value_head(spec.path):
        raise fail(f"{Path(spec.path) / 'value_head.safetensors'} not found: {spec.path} is not a reward model "
                   "(train one with stage: rm, or use an AutoModelForSequenceClassification with num_labels: 1)")
    rm_tokenizer = load_tokenizer(config.model, spec.path)
    if classifier:
        backbone, head = load_reward_classifier(spec.path, config.model, dtype, device, rm_tokenizer)
        disable_dropout(backbone)
        template, same = _classifier_rendering(config, tokenizer, rm_tokenizer)
        return SeparateModelReward(backbone, head, rm_tokenizer, template, same, spec.name, chunk, backbone_scores)
    model = _load_frozen(spec.path, config, dtype, device, rm_tokenizer,
                         quantization_key="reward_model_quantization_bit")
    head = ValueHead.load(spec.path, model.config.get_text_config().hidden_size).to(device)
    same = _same_vocab(rm_tokenizer, tokenizer)
    template = None if same else template_for(config.data, rm_tokenizer)
    return SeparateModelReward(model, head, rm_tokenizer, template, same, spec.name, chunk)


PROBES = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "Be brief.")


def _classifier_rendering(config: Config, tokenizer, rm_tokenizer):
    """(template, same) for a classifier RM, trained elsewhere under its own chat template.

    It renders with its tokenizer's chat template (the config's `template` when it has none);
    `same`: that rendering is the policy's token for token, so the policy's ids are scored as they
    are and `template` is None.
    """
    own = get_template(None if getattr(rm_tokenizer, "chat_template", None) else config.data.template, rm_tokenizer)
    if not _same_vocab(rm_tokenizer, tokenizer):
        return own, False
    policy = template_for(config.data, tokenizer)
    messages, system = PROBES
    alike = []
    for probe_system in (None, system):
        try:
            alike.append(own.encode_turns(rm_tokenizer, messages, probe_system)
                         == policy.encode_turns(tokenizer, messages, probe_system))
        except RlhfkitError:  # a template without system turns: compared without them
            continue
    return (None, True) if alike and all(alike) else (own, False)


def build_ppo_models(config: Config, tokenizer, device: torch.device) -> PPOModels:
    """Load policy (+ value head), reference and reward sources for `config`."""
    f, m = config.finetuning, config.model
    dtype = resolve_dtype(m, config.training)
    adapters = split_paths(m.adapter_name_or_path)
    specs = reward_specs(config)
    base = load_causal_lm(m.model_name_or_path, m, dtype, device, tokenizer, quantization_bit=m.quantization_bit,
                          max_length=config.data.cutoff_len)
    disable_dropout(base)
    frozen_reference = None
    if f.finetuning_type != "lora" and not config.ppo.ref_model:
        frozen_reference = _load_frozen(m.model_name_or_path, config, dtype, device, tokenizer, adapters)
    if config.training.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    policy = setup_finetuning(base, f, adapters, resize_vocab=m.resize_vocab)
    disable_dropout(policy)
    if config.training.torch_compile:  # the LoRA reference is this model with its adapter off
        for model in (policy, frozen_reference):
            if model is not None:
                compile_blocks(model, config.training.torch_compile_memory_budget)
    hidden = policy.config.get_text_config().hidden_size
    critic = ValueHead(hidden).to(device) if config.ppo.advantage_estimator == "gae" else None
    models = PPOModels(policy=policy, value_head=critic, reference=None, reference_adapter="")
    # Reference: explicit model, the frozen SFT adapter, the adapter-less base, or a frozen copy.
    resumed_adapter = f.finetuning_type == "lora" and adapters and not f.create_new_adapter
    if config.ppo.ref_model:
        models.reference = _load_frozen(config.ppo.ref_model, config, dtype, device, tokenizer,
                                        split_paths(config.ppo.ref_model_adapters), "ref_model_quantization_bit")
    elif f.finetuning_type == "lora":
        models.reference = policy
        models.reference_adapter = None
        if resumed_adapter:
            load_frozen_adapter(policy, adapters[-1], REFERENCE_ADAPTER)
            policy.base_model.set_adapter("default")
            models.reference_adapter = REFERENCE_ADAPTER
    else:
        models.reference = frozen_reference
    # Reward sources: a LoRA RM shares the base when the base was not changed by merged adapters.
    shared_base_ok = f.finetuning_type == "lora" and len(adapters) <= 1 and not f.create_new_adapter
    for spec in specs:
        source = build_reward_source(spec, config, models, tokenizer, dtype, device, shared_base_ok)
        models.rewards.append((source, spec.weight))
    if critic is not None:
        _init_value_head(config, models, specs)
    disable_dropout(policy)  # again: the reference and reward adapters loaded since bring their own dropout
    return models


def _init_value_head(config: Config, models: PPOModels, specs: list[RewardSpec]) -> None:
    choice = config.ppo.value_head_init
    model_sources = [s for s, _ in models.rewards if isinstance(s, (SharedBaseReward, SeparateModelReward))]
    same_size = [s for s in model_sources if s.value_head.summary.in_features == models.value_head.summary.in_features]
    if choice == "reward" and not same_size:
        raise fail(f"{config.source}: value_head_init: reward needs a lora or full reward model with the policy's "
                   "hidden size; use value_head_init: zero")
    if choice == "reward" or (choice == "auto" and any(isinstance(s, SharedBaseReward) for s in same_size)):
        models.value_head.load_state_dict(copy.deepcopy(same_size[0].value_head.state_dict()))
        logger.info("value head initialised from the reward model's head")
    else:
        logger.info("value head zero-initialised")


def trainable_policy_parameters(models: PPOModels) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable (name, parameter) pairs of the policy and the value head."""
    named = [(f"policy.{n}", p) for n, p in models.policy.named_parameters() if p.requires_grad]
    if models.value_head is not None:
        named += [(f"value_head.{n}", p) for n, p in models.value_head.named_parameters()]
    return named
