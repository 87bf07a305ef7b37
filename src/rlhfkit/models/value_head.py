"""Scalar head (hidden -> 1) used as the reward model's score and as PPO's critic."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.errors import fail
from rlhfkit.models.forward import forward_reading_values
from rlhfkit.models.weight_files import check_safetensors, indexed_weight_files

VALUE_HEAD_FILE = "value_head.safetensors"
HEAD_PREFIX = "v_head."
"""Key prefix of the head's tensors in files (`v_head.summary.weight`, `v_head.summary.bias`): the names
LLaMA-Factory and TRL (`AutoModelForCausalLMWithValueHead.v_head`) write and read."""
PICKLED_HEAD_FILES = ("value_head.bin", "pytorch_model.bin")
"""Pickled heads (LLaMA-Factory without safetensors; TRL's LoRA reward models), never unpickled here."""


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
        """Write `value_head.safetensors` into `directory`, keys in LLaMA-Factory's names (`HEAD_PREFIX`)."""
        path = Path(directory) / VALUE_HEAD_FILE
        tensors = {HEAD_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "pt", "hidden_size": str(self.summary.in_features)})
        return path

    @classmethod
    def load(cls, directory: str | Path, hidden_size: int | None = None) -> "ValueHead":
        """The head saved in `directory` (any layout `read_head_state` reads); check it fits `hidden_size`."""
        state = read_head_state(directory)
        saved_hidden = state["summary.weight"].shape[-1]
        if hidden_size is not None and saved_hidden != hidden_size:
            raise fail(f"the value head in {directory} was trained for hidden size {saved_hidden}, but the model "
                       f"has {hidden_size}; the reward model must share the policy's base model")
        head = cls(saved_hidden)
        head.load_state_dict({k: v.float() for k, v in state.items()})
        return head


def _head_in_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """`v_head.*` tensors stored among the model's own weights (TRL's `save_pretrained` of a full model)."""
    found = {}
    for path in indexed_weight_files(directory):
        check_safetensors(path)  # a damaged shard: one line naming it
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                if key.startswith(HEAD_PREFIX):
                    found[key] = weights.get_tensor(key)
    return found


def _pickled_head(directory: Path) -> Path | None:
    """A pickled value head: value_head.bin, or TRL's pytorch_model.bin beside a LoRA adapter."""
    if (directory / PICKLED_HEAD_FILES[0]).is_file():
        return directory / PICKLED_HEAD_FILES[0]
    trl_adapter_head = directory / PICKLED_HEAD_FILES[1]
    if (directory / "adapter_config.json").is_file() and trl_adapter_head.is_file():
        return trl_adapter_head
    return None


def convert_command(pickled: Path) -> str:
    """A one-line shell command that rewrites the head in `pickled` as value_head.safetensors beside it."""
    target = pickled.parent / VALUE_HEAD_FILE
    return (f"python -c \"import torch; from safetensors.torch import save_file; "
            f"t = torch.load('{pickled}', weights_only=True); "
            f"save_file({{k: v.contiguous() for k, v in t.items() if k.startswith('{HEAD_PREFIX}')}}, '{target}')\"")


def read_head_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The value head's `summary.weight` ``(1, hidden)`` and `summary.bias` ``(1,)`` saved in `directory`.

    Layouts read: `value_head.safetensors` with LLaMA-Factory's keys (`v_head.summary.*`, what
    rlhfkit writes) or rlhfkit's earlier ones (`summary.*`); `v_head.*` tensors inside the
    model's safetensors (TRL's full save). A pickled head (`value_head.bin`, TRL's
    `pytorch_model.bin` beside an adapter) is refused with the command that converts it.
    """
    directory = Path(directory)
    path = directory / VALUE_HEAD_FILE
    if path.is_file():
        check_safetensors(path)  # a truncated or garbage file: one line naming it
    tensors = load_file(str(path)) if path.is_file() else _head_in_model_weights(directory)
    if not tensors:
        pickled = _pickled_head(directory)
        if pickled is not None:
            raise fail(f"{pickled} is a pickle, which rlhfkit never loads (it can run code); convert the value "
                       f"head once to safetensors: {convert_command(pickled)}")
        raise fail(f"{path} not found: {directory} is not a reward model folder (no value head in "
                   f"{VALUE_HEAD_FILE} nor v_head.* weights in its safetensors); train one with `stage: rm`")
    state = {key[len(HEAD_PREFIX):] if key.startswith(HEAD_PREFIX) else key: value for key, value in tensors.items()}
    if set(state) != {"summary.weight", "summary.bias"} or state["summary.weight"].dim() != 2 \
            or state["summary.weight"].shape[0] != 1 or state["summary.bias"].shape != (1,):
        where = path if path.is_file() else directory
        raise fail(f"{where} holds {sorted(tensors)[:4]}, not one value head (v_head.summary.weight of shape "
                   "(1, hidden) and v_head.summary.bias); it is not a reward model's head")
    return state


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
    """Whether `directory` holds a value head in a layout `read_head_state` reads or refuses with advice."""
    directory = Path(directory)
    return ((directory / VALUE_HEAD_FILE).is_file() or _pickled_head(directory) is not None
            or bool(_head_in_model_weights(directory)))


def value_head_folder(model_name_or_path: str, adapter_paths: list[str]) -> Path:
    """The folder a run's value head would be saved with: the last adapter's, else the model's (where
    LLaMA-Factory's `load_valuehead_params` looks)."""
    return Path(adapter_paths[-1] if adapter_paths else model_name_or_path)
