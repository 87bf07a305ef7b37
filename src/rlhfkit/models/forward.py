"""Forward passes shared by every stage: position ids from the mask, scores, selective logits, and the
LM head's input instead of its logits (for `rl.head_logprobs`, which applies the head in chunks)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch import nn

from rlhfkit.errors import fail


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. ``(b, T)``."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for left or right padding. ``(b,)``."""
    length = attention_mask.shape[-1]
    flipped_first = attention_mask.long().flip(-1).argmax(-1)
    return length - 1 - flipped_first


def causal_lm_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 0,
    output_hidden_states: bool = False,
    **extra,
):
    """Run `model` with position ids from the mask and no KV cache.

    `logits_to_keep` > 0 computes vocabulary logits only for the last that many positions, which
    is all PPO needs (responses sit at the end of left-padded sequences); a 1-D index tensor keeps
    exactly those positions (transformers' convention). `extra` goes to the
    model as is (`with_values` for a `ModelWithValueHead`).
    """
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=logits_to_keep,
        output_hidden_states=output_hidden_states,
        use_cache=False,
        **extra,
    )


class HeadInput:
    """Holds the hidden states the LM head was called with (`capture_head_input`)."""

    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def capture_head_input(model) -> Iterator[HeadInput]:
    """Record the input of `model`'s output embeddings (the LM head) during a forward pass.

    That input is the last hidden state (after the final norm) at exactly the positions that get
    logits (`logits_to_keep`), which is where PPO needs values. Reading it here instead of asking
    for ``output_hidden_states`` keeps transformers' per-layer output-capturing hooks out of the
    forward pass: inside compiled blocks (`torch_compile`) each such hook is a graph break.
    """
    captured = HeadInput()

    def keep(_module, args):
        captured.hidden = args[0]

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise fail(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None), so its "
                   "values cannot be read at the logits' positions; PPO needs a causal LM with an LM head")
    handle = head.register_forward_pre_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def values_at_logits(captured: HeadInput, value_head, logits: torch.Tensor,
                     logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The value at every position that has logits, ``(b, K)``, from a `capture_head_input` record."""
    hidden = captured.hidden
    if hidden is None:
        raise RuntimeError("the model's forward did not call its output embeddings; values cannot be read")
    if hidden.shape[1] != logits.shape[1]:  # a model that runs its head on every position
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
    return value_head(hidden)


def forward_reading_values(model, value_head, logits_to_keep: int | torch.Tensor, run):
    """``run()`` (a forward pass of `model`) and the values at its logits' positions ``(b, K)``."""
    with capture_head_input(model) as captured:
        output = run()
    return output, values_at_logits(captured, value_head, output.logits, logits_to_keep)


def forward_with_values(model, value_head, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_to_keep: int | torch.Tensor = 0, with_values: bool = True,
                        at_logits: bool = False):
    """The LM output and the value of every position, ``(b, T)`` (None without `with_values`).

    `at_logits`: values only at the positions that get logits (`logits_to_keep`), ``(b, K)``, read
    from the LM head's input (`capture_head_input`), which is cheaper than all hidden states.
    `value_head` is applied to the last hidden states here; None means `model` is a
    `ModelWithValueHead` (possibly wrapped by DDP, FSDP or DeepSpeed) that applies its own head
    inside its forward, which sharded training needs: the head's weights exist in full only there.
    """
    if value_head is None and with_values:
        output = causal_lm_forward(model, input_ids, attention_mask, logits_to_keep, with_values=True,
                                   values_at_logits=at_logits)
        return output, output["values"]
    if with_values and at_logits:
        return forward_reading_values(model, value_head, logits_to_keep,
                                      lambda: causal_lm_forward(model, input_ids, attention_mask, logits_to_keep))
    output = causal_lm_forward(model, input_ids, attention_mask, logits_to_keep, output_hidden_states=with_values)
    return output, value_head(output.hidden_states[-1]) if with_values else None


def sequence_scores(model, value_head, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score of each sequence: the value head at its last real token. ``(b,)``.

    `value_head` None: `model` is a `ModelWithValueHead` (see `forward_with_values`).
    """
    _, values = forward_with_values(model, value_head, input_ids, attention_mask, logits_to_keep=1)  # (b, T)
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_real_index(attention_mask)]


def backbone_scores(backbone, value_head, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score of each sequence from a model without an LM head (a classifier's backbone): the head on
    its last hidden state at the last real token. ``(b,)``."""
    output = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return value_head(output.last_hidden_state[rows, last_real_index(attention_mask)])  # (b, hidden) -> (b,)
# Config attributes of models whose logits are not just ``head(last hidden state)`` (Gemma's soft
# cap, Cohere's and Granite's scales): their heads are never bypassed.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def language_model(model):
    """The causal LM inside `model`: through DDP/DeepSpeed (``.module``) and a `ModelWithValueHead`."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and not hasattr(model, "get_output_embeddings"):
            model = inner
        elif hasattr(model, "value_head") and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        else:
            return model


def cache_keyword(model) -> str:
    """The keyword `model`'s forward takes its KV cache under: ``cache`` where the forward of the
    transformers model inside (through DDP, a `ModelWithValueHead`, PEFT and ``torch.compile``) has that
    parameter (newer releases, e.g. 5.24, which warn about the old name), else ``past_key_values``
    (older ones, e.g. 5.17, which take nothing else). Read it once per decode loop: it inspects a signature."""
    while True:
        inner = language_model(model)
        inner = getattr(inner, "_orig_mod", inner)  # torch.compile's OptimizedModule
        get_base_model = getattr(inner, "get_base_model", None)  # a PeftModel (its base has peft_config too)
        if callable(get_base_model):
            inner = get_base_model()
        if inner is model:
            break
        model = inner
    parameters = inspect.signature(model.forward).parameters  # follows transformers' deprecation wrapper
    return "cache" if "cache" in parameters else "past_key_values"


def chunkable_head(model) -> nn.Linear | None:
    """`model`'s LM head if its logits are exactly ``hidden @ head.weight^T``, else None.

    That is: a bias-free ``nn.Linear`` holding its whole weight (not a shard: FSDP's DTensor or
    ZeRO-3's empty placeholder), of a model that transforms its logits no further (`LOGIT_TRANSFORMS`).
    """
    lm = language_model(model)
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if type(weight.data) is not torch.Tensor or weight.numel() != head.in_features * head.out_features:
        return None
    config = getattr(lm, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in LOGIT_TRANSFORMS:
        if getattr(text_config, key, None) not in (None, 1, 1.0):
            return None
    return head


@contextlib.contextmanager
def head_returns_input(head: nn.Linear) -> Iterator[nn.Linear]:
    """Inside, `head` returns its input: the model's "logits" are the last hidden states ``(..., H)``
    at the positions that would get logits; hooks on the head still run."""
    previous = vars(head).get("forward")  # an instance forward (the CPU's kept-buffer head) comes back after
    head.forward = lambda hidden: hidden
    try:
        yield head
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
