"""Sample responses with `generate`, then cut each after its first stop token or stop word."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from rlhfkit.config import GenerationArguments
from rlhfkit.rl import truncate_after_stop


@dataclass
class GeneratedBatch:
    """Responses to a batch of left-padded prompts."""

    response_ids: torch.Tensor
    """``(b, R)`` tokens up to and including the first stop token, pad after it."""
    response_mask: torch.Tensor
    """``(b, R)`` bool, True on kept response tokens."""
    ended_with_stop: torch.Tensor
    """``(b,)`` bool, whether the response stopped by itself (EOS or a stop word)."""


def cut_at_stop_words(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor,
                      stop_words: list[str], pad_token_id: int) -> None:
    """In place: end each response after the first token whose decoded prefix contains a stop word."""
    for row in range(response_ids.shape[0]):
        length = int(response_mask[row].sum())
        for end in range(1, length + 1):
            text = tokenizer.decode(response_ids[row, :end], skip_special_tokens=True)
            if any(word in text for word in stop_words):
                response_mask[row, end:] = False
                response_ids[row, end:] = pad_token_id
                ended[row] = True
                break


class HFGenerator:
    """Rollouts through `model.generate` (sampling, KV cache, left-padded prompts)."""

    def __init__(self, tokenizer, args: GenerationArguments, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.stop_words = [w for w in (args.stop_words or "").split(",") if w]
        self.config = GenerationConfig(
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=self.stop_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> GeneratedBatch:
        """Sample one response per prompt row; ``input_ids`` ``(b, P)`` left-padded."""
        was_training = model.training
        model.eval()
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=self.config)
        if was_training:
            model.train()
        generated = output[:, input_ids.shape[1]:]
        response_ids, response_mask, ended = truncate_after_stop(
            generated, self.stop_token_ids, self.tokenizer.pad_token_id)
        if self.stop_words:
            cut_at_stop_words(self.tokenizer, response_ids, response_mask, ended, self.stop_words,
                              self.tokenizer.pad_token_id)
        # Drop columns that are padding in every row.
        width = max(int(response_mask.sum(-1).max()), 1)
        return GeneratedBatch(response_ids[:, :width], response_mask[:, :width], ended)
