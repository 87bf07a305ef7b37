"""Save trained weights as a folder that transformers / peft load directly."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from rlhfkit.models.loading import POLICY_ADAPTER
from rlhfkit.models.value_head import ModelWithValueHead, ValueHead


def save_pretrained_model(model, tokenizer, directory: str | Path, value_head: ValueHead | None = None,
                          state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights as safetensors into `directory` (created if needed).

    A PeftModel saves only its trainable `default` adapter (loadable with
    `PeftModel.from_pretrained(base, directory)`); a plain model saves everything (loadable with
    `AutoModelForCausalLM.from_pretrained(directory)`). The value head goes to
    `value_head.safetensors` beside them and never into the language model's weights.
    `state_dict`, if given, holds `model`'s full weights (gathered when they are sharded).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    extra = {} if state_dict is None else {"state_dict": _without_tied_copies(model, state_dict)}
    if isinstance(model, PeftModel):
        model.save_pretrained(directory, selected_adapters=[POLICY_ADAPTER], safe_serialization=True, **extra)
    else:
        model.save_pretrained(directory, safe_serialization=True, **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if value_head is not None:
        value_head.save(directory)
    return directory


def _without_tied_copies(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of each tied parameter (lm_head tied to the embeddings), as a model's own
    state dict would: a gathered state dict holds a separate copy under each name."""
    first_name: dict[int, str] = {}
    state = dict(state_dict)
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            state.pop(name, None)
        first_name.setdefault(id(param), name)
    return state


def split_trained(module, full_state: dict[str, torch.Tensor] | None = None):
    """(language model, its full state dict or None, value head or None) of a stage's trained module.

    `module` is a causal LM or a `ModelWithValueHead`, unwrapped from accelerate. `full_state` is
    its full state dict when its own parameters are shards (FSDP, DeepSpeed ZeRO-3); the value
    head is then rebuilt from it.
    """
    if not isinstance(module, ModelWithValueHead):
        return module, full_state, None
    if full_state is None or module.value_head is None:
        model_state = None if full_state is None else \
            {k[len("model."):]: v for k, v in full_state.items() if k.startswith("model.")}
        return module.model, model_state, module.value_head
    head = ValueHead(module.value_head.summary.in_features)
    head.load_state_dict({k[len("value_head."):]: v for k, v in full_state.items() if k.startswith("value_head.")})
    model_state = {k[len("model."):]: v for k, v in full_state.items() if k.startswith("model.")}
    return module.model, model_state, head
