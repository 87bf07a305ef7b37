"""A generation copy of the policy: decode with plain weights in the compute dtype, train the originals.

PEFT's LoRA forward adds two rank-r products, casts and bookkeeping to every adapted projection of
every decoded token; merging ``W + scale * B A`` into the trained base would make decoding plain,
but the base (bf16 on an accelerator) would drift by a rounding at every merge and unmerge. And a
fully trained policy under mixed precision keeps float32 weights, which decoding (no autocast)
would read at twice the bytes of bf16. So the policy keeps its weights untouched, and a separate
model of the same class decodes:

* every adapted linear layer gets its own weight, ``W + scale * B A``, computed in at least
  float32 and rounded once to the decoding dtype;
* with a decoding `dtype` (mixed precision's), every floating weight of another dtype gets its own
  copy in that dtype;
* `refresh` rewrites those in place (the same memory, so compiled decode steps and CUDA graphs that
  captured them stay valid) from the current weights, once per PPO step;
* every other tensor (embeddings, norms, head, biases, rotary buffers, fully trained modules of
  `additional_target` in the decoding dtype) is the policy's own, shared, not copied.

A LoRA rollout then costs what a full one does. The copy's logits equal the policy's up to the
merged weights' rounding (tests/test_rollout_engines.py). Layers other than plain LoRA linears
(DoRA, LoRA on embeddings or convolutions, another PEFT method) raise `UnsupportedAdapter`; the
engine then decodes on the policy itself.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn


class UnsupportedAdapter(Exception):
    """The policy has a layer `GenerationCopy` cannot merge."""


def _lora_parts(module: LoraLinear, adapter: str) -> tuple[nn.Linear, nn.Linear, float] | None:
    """``(lora_A, lora_B, scale)`` of `adapter` in a plain LoRA linear layer; None when the adapter
    is not active there (the base alone)."""
    if module.disable_adapters or adapter not in module.lora_A or adapter not in module.active_adapters:
        return None
    if module.merged:
        raise UnsupportedAdapter(f"{type(module).__name__} is merged into its base already")
    if getattr(module, "fan_in_fan_out", False) or module.use_dora.get(adapter, False) \
            or adapter in getattr(module, "lora_variant", {}):
        raise UnsupportedAdapter("a LoRA variant (DoRA, transposed weights) is not merged into a generation copy")
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if lora_a.bias is not None or lora_b.bias is not None or not isinstance(module.base_layer, nn.Linear):
        raise UnsupportedAdapter("a LoRA layer with bias or a non-linear base is not merged into a generation copy")
    return lora_a, lora_b, float(module.scaling[adapter])


class GenerationCopy:
    """A decoding copy of `policy` (a PEFT model: its active adapter merged; or a plain model) whose
    floating weights are in `dtype` (None: their own dtypes). See the module docstring.

    `model` is the copy (a ``PreTrainedModel`` of the base's class, in eval mode, no gradients).
    """

    def __init__(self, policy, dtype: torch.dtype | None = None) -> None:
        peft = callable(getattr(policy, "get_base_model", None))  # a PeftModel (its base has peft_config too)
        base = policy.get_base_model() if peft else policy
        self.adapter, self.dtype = (policy.active_adapter if peft else None), dtype
        with torch.device("meta"):
            copy = type(base)(base.config)
        self.merges: list[tuple[torch.Tensor, nn.Linear, nn.Linear, nn.Linear, float]] = []
        self.casts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, target in copy.named_modules():
            self._fill(target, base.get_submodule(name) if name else base)
        copy.eval()
        copy.requires_grad_(False)
        self.model = copy
        self.refresh()

    def _fill(self, target: nn.Module, source: nn.Module) -> None:
        """Give `target`'s own parameters and buffers their tensors from `source` (same path in the base)."""
        if isinstance(source, AuxiliaryTrainingWrapper):  # a fully trained module (additional_target)
            copies = getattr(source, "modules_to_save", {})
            source = copies[self.adapter] if self.adapter in copies and not source.disable_adapters \
                else source.original_module
        elif isinstance(source, BaseTunerLayer) and not isinstance(source, LoraLinear):
            raise UnsupportedAdapter(f"{type(source).__name__} layers are not merged into a generation copy")
        parts = _lora_parts(source, self.adapter) if isinstance(source, LoraLinear) else None
        if isinstance(source, LoraLinear):
            source = source.base_layer
        for key, _ in list(target.named_parameters(recurse=False)):
            original = getattr(source, key).detach()
            dtype = self.dtype if self.dtype is not None and original.is_floating_point() else original.dtype
            if parts is not None and key == "weight":
                tensor = torch.empty_like(original, dtype=dtype)
                self.merges.append((tensor, source, *parts))
            elif dtype != original.dtype:
                tensor = torch.empty_like(original, dtype=dtype)
                self.casts.append((tensor, original))
            else:
                tensor = original  # shared
            target._parameters[key] = nn.Parameter(tensor, requires_grad=False)
        for key, _ in list(target.named_buffers(recurse=False)):
            target._buffers[key] = getattr(source, key)
        for key, value in list(vars(target).items()):  # plain tensor attributes (a rotary's original frequencies)
            if isinstance(value, torch.Tensor) and isinstance(getattr(source, key, None), torch.Tensor):
                setattr(target, key, getattr(source, key))

    @property
    def copies_anything(self) -> bool:
        """Whether any weight differs from the policy's (merged or cast); else the policy itself decodes as well."""
        return bool(self.merges or self.casts)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rewrite every merged or cast weight in place from the policy's current weights."""
        for merged, base, lora_a, lora_b, scale in self.merges:
            accumulate = torch.promote_types(base.weight.dtype, torch.float32)
            total = torch.addmm(base.weight.to(accumulate), lora_b.weight.to(accumulate), lora_a.weight.to(accumulate),
                                alpha=scale)  # (out, in)
            merged.copy_(total)
        for cast, original in self.casts:
            cast.copy_(original)
