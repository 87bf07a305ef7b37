"""Reward models saved as a one-label `AutoModelForSequenceClassification` (the Hub's usual layout).

Such a model is a backbone plus a linear `score` map (hidden -> num_labels) applied to the last
non-padding token. Here the backbone runs as any reward model's does (position ids from the
attention mask) and its score map becomes a `ValueHead`, so its reward is read at the last real
token of each sequence whatever the padding, as `reward_model_type: full` reads a value head's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from rlhfkit.config import ModelArguments
from rlhfkit.errors import fail
from rlhfkit.models.loading import attn_implementation, check_model_path
from rlhfkit.models.value_head import ValueHead
from rlhfkit.models.weight_files import model_weight_files


def classifier_labels(path: str | Path) -> int | None:
    """The label count of a sequence-classification checkpoint in `path`; None for any other model."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return None
    return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def _score_layer(model) -> nn.Linear:
    """The classifier's own linear map (outside the backbone) to one output."""
    backbone = model.base_model
    layers = [m for name, child in model.named_children() if child is not backbone
              for m in child.modules() if isinstance(m, nn.Linear)]
    if len(layers) != 1 or layers[0].out_features != 1:
        raise fail(f"{type(model).__name__} does not end in one linear map to a single score; "
                   "use a reward model with num_labels: 1 (or a value-head reward model)")
    return layers[0]


def load_reward_classifier(path: str, model_args: ModelArguments, dtype: torch.dtype, device: torch.device | None,
                           tokenizer) -> tuple[nn.Module, ValueHead]:
    """(frozen backbone on `device`, its score map as a float32 `ValueHead`) of the classifier in `path`."""
    check_model_path(path)
    model_weight_files(Path(path))  # damaged or pickled weights: one line naming the file
    labels = classifier_labels(path)
    if labels != 1:
        raise fail(f"{path} is a sequence classifier with {labels} labels; a reward model needs num_labels: 1 "
                   "(one score per sequence)")
    kwargs = {"dtype": dtype, "trust_remote_code": model_args.trust_remote_code, "use_safetensors": True}
    if attn_implementation(model_args) is not None:
        kwargs["attn_implementation"] = attn_implementation(model_args)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise fail(f"cannot load a sequence classifier from {path}: {str(err).splitlines()[0]}") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    layer = _score_layer(model)
    head = ValueHead(layer.in_features)
    with torch.no_grad():
        head.summary.weight.copy_(layer.weight.float())
        head.summary.bias.copy_(layer.bias.float() if layer.bias is not None else torch.zeros(1))
    backbone = model.base_model
    backbone.requires_grad_(False)
    backbone.eval()
    if device is not None:
        backbone.to(device)
        head.to(device)
    return backbone, head
