"""Scalar head (hidden -> 1) used as the reward model's score and as PPO's critic."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.errors import fail
from rlhfkit.models.forward import forward_reading_values
from rlhfkit.models.weight_files import check_safetensors

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """A linear map from the last hidden state to one scalar per position.

    Shapes: ``(b, t, hidden)`` -> ``(b, t)``. Kept in float32 whatever the backbone's dtype.
    """

    def __init__(self, hidden_size: int, zero_init: bool = True) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        if zero_init:
            nn.init.zeros_(self.summary.weight)
            nn.init.zeros_(self.summary.bias)
        else:
            nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1))
            nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.summary.weight
        return self.summary(hidden_states.to(weight.dtype)).squeeze(-1)

    def save(self, directory: str | Path) -> Path:
        """Write `value_head.safetensors` into `directory`."""
        path = Path(directory) / VALUE_HEAD_FILE
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"hidden_size": str(self.summary.in_features)})
        return path

    @classmethod
    def load(cls, directory: str | Path, hidden_size: int | None = None) -> "ValueHead":
        """Read `value_head.safetensors` from `directory`; check it fits `hidden_size`."""
        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            raise fail(f"{path} not found: {directory} is not a reward model folder of this tool "
                       "(train one with `stage: rm`, which saves the value head there)")
        check_safetensors(path)
        tensors = load_file(str(path))
        weight, bias = tensors.get("summary.weight"), tensors.get("summary.bias")
        if set(tensors) != {"summary.weight", "summary.bias"} or weight.dim() != 2 or weight.shape[0] != 1 \
                or bias.shape != (1,):
            raise fail(f"{path} does not hold a value head (summary.weight (1, hidden), summary.bias (1,)); "
                       "it was not written by rlhfkit")
        saved_hidden = weight.shape[-1]
        if hidden_size is not None and saved_hidden != hidden_size:
            raise fail(f"{path} was trained for hidden size {saved_hidden}, but the model has {hidden_size}; "
                       "the reward model must share the policy's base model")
        head = cls(saved_hidden)
        head.load_state_dict(tensors)
        return head


class ModelWithValueHead(nn.Module):
    """A causal LM and its value head as one module, the unit accelerate prepares.

    DeepSpeed and FSDP2 prepare one model per optimizer, and FSDP gathers a module's weights only
    inside its forward; so the head runs inside this forward. It takes the LM's arguments and
    returns the LM's output, with ``output["values"]`` ``(b, T)`` added when `with_values`
    (``(b, K)``, only at the positions that get logits, with `values_at_logits`). `value_head`
    None: a policy without a critic (the critic-free estimators), which never asks for values.
    """

    def __init__(self, model: nn.Module, value_head: ValueHead | None) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head

    @property
    def _no_split_modules(self):
        """The LM's transformer blocks, which FSDP's transformer-based auto wrap shards one by one."""
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_values: bool = False,
                output_hidden_states: bool = False, values_at_logits: bool = False, **kwargs):
        if with_values and values_at_logits:
            output, output["values"] = forward_reading_values(  # values (b, K)
                self.model, self.value_head, kwargs.get("logits_to_keep", 0),
                lambda: self.model(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=output_hidden_states, **kwargs))
            return output
        output = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=output_hidden_states or with_values, **kwargs)
        if with_values:
            output["values"] = self.value_head(output.hidden_states[-1])  # (b, T)
        return output


def has_value_head(directory: str | Path) -> bool:
    """Whether `directory` holds a saved value head."""
    return (Path(directory) / VALUE_HEAD_FILE).is_file()
