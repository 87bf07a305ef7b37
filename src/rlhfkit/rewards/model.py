"""Reward models with a value head (a LoRA adapter on the policy's base, or a separate model), or a
separate one-label sequence classifier."""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from rlhfkit.data import collate_prompts
from rlhfkit.models.forward import sequence_scores
from rlhfkit.models.value_head import ValueHead
from rlhfkit.rewards.base import ScoringBatch

REWARD_ADAPTER = "reward"


@contextlib.contextmanager
def active_adapter(peft_model, name: str | None):
    """Run with adapter `name` active (None: all adapters disabled), then restore the previous state.

    Only the routing flags of peft's adapter layers change, never `requires_grad`: peft's own
    `set_adapter` / `disable_adapter` freeze and unfreeze adapter weights, which DDP and FSDP
    (that record trainable parameters once, when wrapping) must not see.
    """
    layers = [m for m in peft_model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    saved = [(m, m._active_adapter, m._disable_adapters) for m in layers]
    tuner = peft_model.base_model
    previous = tuner.active_adapter
    for module in layers:
        if name is None:
            module._disable_adapters = True
        else:
            module._active_adapter = [name]
            module._disable_adapters = False
    if name is not None:
        tuner.active_adapter = name
    try:
        yield
    finally:
        for module, active, disabled in saved:
            module._active_adapter, module._disable_adapters = active, disabled
        tuner.active_adapter = previous


class SharedBaseReward:
    """The RM stage's adapter loaded as a second adapter on the policy's base, with its head; it scores
    the policy's tokens (`ScoringBatch.reward_model_input`: each ended reply followed by its template's suffix).

    `forward_model` is what the forward passes go through: the policy's PeftModel, or (set by the
    PPO stage) the prepared policy module, through which DDP, FSDP and DeepSpeed see every pass.
    """

    def __init__(self, peft_model, value_head: ValueHead, name: str = "reward", chunk_size: int = 8,
                 adapter_name: str = REWARD_ADAPTER) -> None:
        self.model, self.value_head, self.name, self.chunk_size = peft_model, value_head, name, chunk_size
        self.adapter_name = adapter_name
        self.forward_model = peft_model

    @torch.no_grad()
    def score(self, batch: ScoringBatch) -> torch.Tensor:
        scores = []
        device = self.value_head.summary.weight.device
        all_ids, all_mask = batch.reward_model_input()
        with active_adapter(self.model, self.adapter_name):
            for begin in range(0, all_ids.shape[0], self.chunk_size):
                ids = all_ids[begin:begin + self.chunk_size].to(device)
                mask = all_mask[begin:begin + self.chunk_size].to(device)
                scores.append(sequence_scores(self.forward_model, self.value_head, ids, mask).float().cpu())
        return torch.cat(scores)


class SeparateModelReward:
    """A reward model with its own weights (full RM, or a LoRA RM merged into its own base copy).

    With the policy's tokenizer (and rendering) it scores the policy's tokens (`reward_model_input`);
    otherwise it renders each conversation with its own tokenizer and template (`encode_reply`: an ended
    reply with its end-of-turn and suffix, a truncated one without) and scores that. `read_scores` reads
    the scores: `sequence_scores` for a causal LM with a value head, `backbone_scores` for a
    classifier's backbone with its score map as the head.
    """

    def __init__(self, model, value_head: ValueHead, tokenizer, template, same_tokenizer: bool,
                 name: str = "reward", chunk_size: int = 8, read_scores=sequence_scores) -> None:
        self.model, self.value_head, self.tokenizer, self.template = model, value_head, tokenizer, template
        self.same_tokenizer, self.name, self.chunk_size = same_tokenizer, name, chunk_size
        self.read_scores = read_scores

    def _encode(self, batch: ScoringBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.same_tokenizer:
            return batch.reward_model_input()
        rows = []
        ended = batch.ended_with_stop_token
        for row, (messages, system, response) in enumerate(zip(batch.messages, batch.systems, batch.responses)):
            prompt, reply = self.template.encode_reply(
                self.tokenizer, messages + [{"role": "assistant", "content": response}], system,
                ended=ended is None or bool(ended[row]))
            rows.append({"input_ids": prompt + reply})
        collated = collate_prompts(rows, self.tokenizer.pad_token_id)
        return collated["input_ids"], collated["attention_mask"]

    @torch.no_grad()
    def score(self, batch: ScoringBatch) -> torch.Tensor:
        ids, mask = self._encode(batch)
        device = next(self.model.parameters()).device
        scores = []
        for begin in range(0, ids.shape[0], self.chunk_size):
            chunk_ids = ids[begin:begin + self.chunk_size].to(device)
            chunk_mask = mask[begin:begin + self.chunk_size].to(device)
            scores.append(self.read_scores(self.model, self.value_head, chunk_ids, chunk_mask).float().cpu())
        return torch.cat(scores)
