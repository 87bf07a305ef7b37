"""The reward-source interface: one scalar per (prompt, response) pair."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from rlhfkit.errors import fail


@dataclass
class ScoringBatch:
    """What a reward source may read about a rollout batch of b samples."""

    prompts: list[str]
    """Each sample's last user message (plain text)."""
    responses: list[str]
    """Each decoded response, truncated after its stop token, special tokens removed."""
    messages: list[list[dict[str, str]]]
    """Each prompt conversation (role/content), for sources that render their own template."""
    systems: list[str | None]
    """Each prompt's system message."""
    sequence_ids: torch.Tensor
    """``(b, P + R)`` the policy's tokens: left-padded prompt then truncated, right-padded response."""
    sequence_mask: torch.Tensor
    """``(b, P + R)`` attention mask of sequence_ids."""
    texts: list[str] | None = None
    """Each templated prompt plus response as decoded text, special tokens kept, padding removed."""
    answers: list[str | None] | None = None
    """Each prompt row's reference answer (its final assistant reply in the data), None where it has none."""


class RewardSource(Protocol):
    """Anything that scores a ScoringBatch; `name` labels its statistics."""

    name: str

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        """Scores ``(b,)`` float32 on the CPU."""


def checked_scores(name: str, values, expected: int) -> torch.Tensor:
    """Validate a source's output: right count, numbers (not booleans or strings), finite; one-line
    errors otherwise."""
    try:
        values = list(values)
        if not all(map(_is_number, values)):
            raise TypeError
        scores = [_finite_or_inf(v) for v in values]
    except (TypeError, ValueError):
        raise fail(f"reward source '{name}' returned non-numeric scores (a boolean or a string is not a score); "
                   f"it must return {expected} floats") from None
    if len(scores) != expected:
        raise fail(f"reward source '{name}' returned {len(scores)} scores for {expected} responses; "
                   "it must return exactly one per response")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise fail(f"reward source '{name}' returned a non-finite score (sample {bad[0]}: {scores[bad[0]]}); "
                   "make it return finite floats")
    return torch.tensor(scores, dtype=torch.float32)


def _is_number(value) -> bool:
    """Whether `value` is a number (a Python, NumPy or 0-d tensor one) and not a boolean or a string."""
    if isinstance(value, (bool, str, bytes)):
        return False
    return str(getattr(value, "dtype", "")) not in ("bool", "torch.bool")


def _finite_or_inf(value) -> float:
    """`float(value)`, with an integer beyond float's range as infinity (then refused as non-finite)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def build_scoring_batch(tokenizer, items: list[dict], query_ids: torch.Tensor, query_mask: torch.Tensor,
                        response_ids: torch.Tensor, response_mask: torch.Tensor) -> ScoringBatch:
    """The ScoringBatch of a rollout: prompt items (from `tokenize_prompts`) and their responses."""
    responses = tokenizer.batch_decode(response_ids.masked_fill(~response_mask, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask.to(query_mask.dtype)], dim=1)
    return ScoringBatch(
        prompts=[item["messages"][-1]["content"] for item in items], responses=responses,
        messages=[item["messages"] for item in items], systems=[item.get("system") for item in items],
        sequence_ids=ids, sequence_mask=mask,
        texts=[tokenizer.decode(row[row_mask.bool()]) for row, row_mask in zip(ids, mask)],
        answers=[item.get("answer") for item in items])
