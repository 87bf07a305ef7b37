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
    scored_ids: torch.Tensor | None = None
    """``(b, P + R + k)`` what a reward model in the policy's tokens scores: sequence_ids with the template's
    k `reply_suffix_ids` after each response that ended with a stop token (`with_reply_suffix`); None: as is."""
    scored_mask: torch.Tensor | None = None
    """``(b, P + R + k)`` attention mask of scored_ids."""
    ended_with_stop_token: torch.Tensor | None = None
    """``(b,)`` bool, whether each response's last kept token is a stop token (`ended_with_stop_token`):
    a reward model that re-renders the text ends only these replies; None: every response ended."""

    def reward_model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) a reward model in the policy's tokens scores: scored_ids if set, else sequence_ids."""
        if self.scored_ids is None:
            return self.sequence_ids, self.sequence_mask
        return self.scored_ids, self.scored_mask


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


def ended_with_stop_token(response_ids: torch.Tensor, response_mask: torch.Tensor,
                          stop_token_ids: list[int]) -> torch.Tensor:
    """``(b,)`` bool: whether each response (``(b, R)``, kept tokens first) ends with a stop token;
    False for a truncated or empty one."""
    lengths = response_mask.long().sum(-1)  # (b,)
    last = response_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (b,)
    stops = torch.as_tensor(stop_token_ids, dtype=response_ids.dtype, device=response_ids.device)
    return (lengths > 0) & torch.isin(last, stops)


def with_reply_suffix(ids: torch.Tensor, mask: torch.Tensor, response_ids: torch.Tensor,
                      response_mask: torch.Tensor, suffix: list[int], stop_token_ids: list[int],
                      pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids` with `suffix` written right after each response whose last kept token is a stop token.

    Args:
        ids, mask: ``(b, P + R)`` left-padded prompts then right-padded responses (not modified).
        response_ids, response_mask: ``(b, R)`` the responses, kept tokens first in each row.
        suffix: the k ids an ended reply continues with (`Template.reply_suffix_ids`).

    Returns:
        ``(b, P + R + k)`` ids and mask (the inputs themselves when k = 0 or no response ended);
        truncated responses (no stop token) stay as they are.
    """
    lengths = response_mask.long().sum(-1)  # (b,)
    ended = ended_with_stop_token(response_ids, response_mask, stop_token_ids)  # (b,)
    if not suffix or not bool(ended.any()):
        return ids, mask
    k = len(suffix)
    extended = torch.cat([ids, ids.new_full((ids.shape[0], k), pad_token_id)], dim=1)  # (b, P + R + k)
    extended_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], k)], dim=1)
    rows = ended.nonzero().squeeze(1).to(ids.device)  # (e,)
    start = ids.shape[1] - response_ids.shape[1] + lengths.to(ids.device)[rows]  # (e,) first position after each
    columns = start.unsqueeze(1) + torch.arange(k, device=ids.device)  # (e, k)
    extended[rows.unsqueeze(1), columns] = torch.tensor(suffix, dtype=ids.dtype, device=ids.device)
    extended_mask[rows.unsqueeze(1), columns] = 1
    return extended, extended_mask


def build_scoring_batch(tokenizer, template, items: list[dict], query_ids: torch.Tensor, query_mask: torch.Tensor,
                        response_ids: torch.Tensor, response_mask: torch.Tensor) -> ScoringBatch:
    """The ScoringBatch of a rollout: prompt items (from `tokenize_prompts`) and their responses, generated
    under `template` (whose `reply_suffix_ids` follow each ended response in `scored_ids`)."""
    stop_token_ids = template.stop_token_ids(tokenizer)
    responses = tokenizer.batch_decode(response_ids.masked_fill(~response_mask, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask.to(query_mask.dtype)], dim=1)
    scored_ids, scored_mask = with_reply_suffix(ids, mask, response_ids, response_mask,
                                                template.reply_suffix_ids(tokenizer), stop_token_ids,
                                                tokenizer.pad_token_id)
    return ScoringBatch(
        prompts=[item["messages"][-1]["content"] for item in items], responses=responses,
        messages=[item["messages"] for item in items], systems=[item.get("system") for item in items],
        sequence_ids=ids, sequence_mask=mask,
        texts=[tokenizer.decode(row[row_mask.bool()]) for row, row_mask in zip(ids, mask)],
        answers=[item.get("answer") for item in items], scored_ids=scored_ids, scored_mask=scored_mask,
        ended_with_stop_token=ended_with_stop_token(response_ids, response_mask, stop_token_ids).cpu())
