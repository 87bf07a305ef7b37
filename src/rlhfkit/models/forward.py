"""Forward passes shared by every stage: position ids from the mask, scores, selective logits."""

from __future__ import annotations

import torch


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


def forward_with_values(model, value_head, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_to_keep: int | torch.Tensor = 0, with_values: bool = True):
    """The LM output and the value of every position, ``(b, T)`` (None without `with_values`).

    `value_head` is applied to the last hidden states here; None means `model` is a
    `ModelWithValueHead` (possibly wrapped by DDP, FSDP or DeepSpeed) that applies its own head
    inside its forward, which sharded training needs: the head's weights exist in full only there.
    """
    if value_head is None and with_values:
        output = causal_lm_forward(model, input_ids, attention_mask, logits_to_keep, with_values=True)
        return output, output["values"]
    output = causal_lm_forward(model, input_ids, attention_mask, logits_to_keep, output_hidden_states=with_values)
    return output, value_head(output.hidden_states[-1]) if with_values else None


def sequence_scores(model, value_head, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score of each sequence: the value head at its last real token. ``(b,)``.

    `value_head` None: `model` is a `ModelWithValueHead` (see `forward_with_values`).
    """
    _, values = forward_with_values(model, value_head, input_ids, attention_mask, logits_to_keep=1)  # (b, T)
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_real_index(attention_mask)]
