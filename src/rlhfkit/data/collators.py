"""Batching tokenised samples into padded tensors.

SFT and pairwise batches are right-padded (training); prompt batches are left-padded so
generation continues right after each prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit.data.processing import IGNORE_INDEX


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.LongTensor:
    """Stack `seqs` into a (len(seqs), longest) LongTensor padded with `pad_value` on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if pad_value is None:
        raise ValueError("pad_value is None; give the tokenizer a pad token (e.g. its eos token)")
    rows = [list(map(int, seq)) for seq in seqs]
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), int(pad_value), dtype=torch.long)
    for index, row in enumerate(rows):
        if not row:
            continue
        values = torch.tensor(row, dtype=torch.long)
        if side == "right":
            out[index, : len(row)] = values
        else:
            out[index, width - len(row):] = values
    return out


def _mask(seqs: Sequence[Sequence[int]], side: str) -> torch.LongTensor:
    return pad_sequences([[1] * len(seq) for seq in seqs], 0, side)


def collate_sft(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (padded with -100)."""
    ids = [sample["input_ids"] for sample in batch]
    return {
        "input_ids": pad_sequences(ids, pad_token_id, "right"),
        "attention_mask": _mask(ids, "right"),
        "labels": pad_sequences([sample["labels"] for sample in batch], IGNORE_INDEX, "right"),
    }


def collate_pairwise(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded rows: the B chosen sequences first, then the B rejected ones."""
    ids = [sample["chosen_input_ids"] for sample in batch] + [sample["rejected_input_ids"] for sample in batch]
    return {"input_ids": pad_sequences(ids, pad_token_id, "right"), "attention_mask": _mask(ids, "right")}


def collate_prompts(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt `input_ids` and `attention_mask`, ready for generation."""
    ids = [sample["input_ids"] for sample in batch]
    return {"input_ids": pad_sequences(ids, pad_token_id, "left"), "attention_mask": _mask(ids, "left")}
