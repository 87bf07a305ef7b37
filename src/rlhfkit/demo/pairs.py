"""The demo's preference pairs: two SFT samples per prompt, ordered by the gold judge.

Train-prompt pairs train the reward model; held-out-prompt pairs (prompts the RM and PPO never
see) measure its accuracy. A pair whose two gold scores differ by less than `TIE_MARGIN` is a tie
and dropped, as is a pair with an empty response.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfkit.demo import task
from rlhfkit.demo.sampling import load_policy, sample
from rlhfkit.errors import fail

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TIE_MARGIN = 0.1
"""Pairs whose gold scores differ by less than this are ties and dropped."""
PAIR_FILES = {"train": "pairs.jsonl", "heldout": "pairs_heldout.jsonl"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def pairs_from(first, second) -> list[dict]:
    """Pairs of two samples per prompt, ordered by the gold judge; near-ties and empty ones dropped."""
    scores_a, scores_b = task.gold_score(first.responses), task.gold_score(second.responses)
    rows = []
    for prompt, a, b, score_a, score_b in zip(first.prompts, first.responses, second.responses, scores_a, scores_b):
        if abs(score_a - score_b) < TIE_MARGIN or not a.strip() or not b.strip():
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        rows.append({"instruction": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def label_pairs(model_dir: Path, sft_dir: Path, prompts: dict[str, list[str]], data_dir: Path, max_new_tokens: int,
                fresh: bool, device: torch.device) -> bool:
    """Preference pairs for the train prompts (RM training) and the held-out ones (RM accuracy),
    sampled on `device`.

    Returns whether new pairs were written (False: the files of an earlier run are reused).
    """
    if _reusable(data_dir, fresh):
        return False
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    policy = load_policy(model_dir, sft_dir, device)
    for split_index, (split, split_prompts) in enumerate(prompts.items()):
        logger.info("== pairs: sampling 2 responses for %d %s prompts from the SFT policy", len(split_prompts), split)
        seed = 1 + 2 * split_index
        first, second = (sample(policy, reference=None, tokenizer=tokenizer, prompts=split_prompts,
                                max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + offset,
                                label=f"{split} pairs, {which} samples")
                         for offset, which in ((0, "first"), (1, "second")))
        rows = pairs_from(first, second)
        if len(rows) < 8:
            raise fail(f"only {len(rows)} {split} preference pairs survived the tie rule; "
                       "the SFT policy's samples are too alike")
        write_jsonl(data_dir / PAIR_FILES[split], rows)
        logger.info("== pairs: %d %s pairs kept of %d prompts (ties within %.2f dropped)", len(rows), split,
                    len(split_prompts), TIE_MARGIN)
    return True


def _reusable(data_dir: Path, fresh: bool) -> bool:
    if fresh or not all((data_dir / name).is_file() for name in PAIR_FILES.values()):
        return False
    logger.info("== pairs: reusing %s", data_dir / PAIR_FILES["train"])
    return True


def written_pairs(count: int, data_dir: Path, fresh: bool) -> bool:
    """Quick mode: pairs of written reviews (positive chosen over negative, as VADER confirms).

    A tiny random model writes gibberish that the gold judge scores 0, so its own samples would
    all be ties; the written reviews exercise the same RM stage. Returns whether pairs were written.
    """
    if _reusable(data_dir, fresh):
        return False
    import random

    rng = random.Random(0)
    rows = []
    for spec in task.demo_prompt_specs()[0][:count]:
        good, bad = task.write_review(spec, "positive", rng), task.write_review(spec, "negative", rng)
        if good and bad:
            rows.append({"instruction": spec.text, "chosen": good, "rejected": bad})
    split = max(len(rows) // 4, 1)
    write_jsonl(data_dir / PAIR_FILES["train"], rows[split:])
    write_jsonl(data_dir / PAIR_FILES["heldout"], rows[:split])
    return True
