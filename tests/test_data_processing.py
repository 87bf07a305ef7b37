"""Tokenisation with truncation, collators and train/validation splits."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data import (
    Example,
    collate_pairwise,
    collate_prompts,
    collate_sft,
    get_template,
    pad_sequences,
    tokenize_pairwise,
    tokenize_prompts,
    tokenize_sft,
    train_val_split,
)
from conftest import assistant, user
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.tiny import build_char_tokenizer

IGNORE = -100


@pytest.fixture()
def tok():
    return build_char_tokenizer()


@pytest.fixture()
def chatml(tok):
    return get_template("chatml", tok)


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


PROMPT_HI = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
SECOND = "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"  # chatml replies end with "<|im_end|>\n"


# -- SFT truncation -------------------------------------------------------------------------


def test_long_response_is_truncated_not_dropped(tok, chatml) -> None:
    prompt = enc(tok, PROMPT_HI)
    samples, stats = tokenize_sft([Example([user("Hi"), assistant("abcdefghij")])], tok, chatml, cutoff_len=len(prompt) + 4)
    assert samples == [{"input_ids": prompt + enc(tok, "abcd"), "labels": [IGNORE] * len(prompt) + enc(tok, "abcd")}]
    assert (stats.kept, stats.dropped_too_long, stats.truncated) == (1, 0, 1)


def test_prompt_filling_cutoff_is_dropped_and_counted(tok, chatml) -> None:
    prompt = enc(tok, PROMPT_HI)
    examples = [Example([user("Hi"), assistant("x")]), Example([user("Hi, a much longer question"), assistant("y")])]
    samples, stats = tokenize_sft(examples, tok, chatml, cutoff_len=len(prompt) + 3)
    assert [s["input_ids"] for s in samples] == [prompt + enc(tok, "x<|im_end|>\n")]
    assert (stats.kept, stats.dropped_too_long, stats.truncated) == (1, 1, 0)
    summary = stats.summary()
    assert "1 kept" in summary and "1 dropped" in summary and f"cutoff_len={len(prompt) + 3}" in summary
    # Exactly the prompt's length: no room for a single response token.
    samples, stats = tokenize_sft([examples[0], examples[0]], tok, chatml, cutoff_len=len(prompt) + 1)
    assert stats.kept == 2 and samples[0]["input_ids"] == prompt + enc(tok, "x")


def test_every_example_too_long_is_an_error(tok, chatml) -> None:
    with pytest.raises(RlhfkitError, match="cutoff_len=5") as err:
        tokenize_sft([Example([user("Hi"), assistant("x")], source="d.jsonl line 1")], tok, chatml, cutoff_len=5)
    assert "\n" not in str(err.value)


def test_multi_turn_truncation_keeps_turns_from_the_start(tok, chatml) -> None:
    messages = [user("Hi"), assistant("Yo"), user("Again"), assistant("Okay")]
    first = enc(tok, PROMPT_HI) + enc(tok, "Yo<|im_end|>\n")
    second_prompt = enc(tok, SECOND)
    # The second reply keeps two tokens.
    samples, stats = tokenize_sft([Example(messages)], tok, chatml, cutoff_len=len(first) + len(second_prompt) + 2)
    assert samples[0]["input_ids"] == first + second_prompt + enc(tok, "Ok")
    assert samples[0]["labels"][-2:] == enc(tok, "Ok") and stats.truncated == 1
    # The second prompt does not fit with a reply token: only the first turn is kept.
    samples, stats = tokenize_sft([Example(messages)], tok, chatml, cutoff_len=len(first) + len(second_prompt))
    assert samples[0]["input_ids"] == first and stats.truncated == 1
    # ... but with mask_history only the last reply is trained, so nothing trained is left.
    with pytest.raises(RlhfkitError):
        tokenize_sft([Example(messages)], tok, chatml, cutoff_len=len(first) + len(second_prompt), mask_history=True)
    samples, stats = tokenize_sft(
        [Example(messages), Example([user("Hi"), assistant("Yo")])], tok, chatml,
        cutoff_len=len(first) + len(second_prompt), mask_history=True,
    )
    assert (stats.kept, stats.dropped_too_long) == (1, 1)


def test_labels_align_with_input_ids(tok, chatml) -> None:
    examples = [Example([user("q" * n), assistant("r" * (7 - n))]) for n in range(1, 7)]
    samples, _ = tokenize_sft(examples, tok, chatml, cutoff_len=30)
    for sample in samples:
        assert len(sample["input_ids"]) == len(sample["labels"]) <= 30
        assert all(label in (IGNORE, token) for token, label in zip(sample["input_ids"], sample["labels"]))


# -- pairwise -------------------------------------------------------------------------------


def test_tokenize_pairwise(tok, chatml) -> None:
    prompt = enc(tok, PROMPT_HI)
    example = Example([user("Hi")], chosen="good", rejected="no")
    [sample], stats = tokenize_pairwise([example], tok, chatml, cutoff_len=100)
    assert sample == {
        "chosen_input_ids": prompt + enc(tok, "good<|im_end|>\n"),
        "rejected_input_ids": prompt + enc(tok, "no<|im_end|>\n"),
        "prompt_length": len(prompt),
    }
    assert stats.kept == 1
    [sample], stats = tokenize_pairwise([example], tok, chatml, cutoff_len=len(prompt) + 4)
    assert sample["chosen_input_ids"] == prompt + enc(tok, "good")
    assert sample["rejected_input_ids"] == prompt + enc(tok, "no<|im_end|>\n")
    assert stats.truncated == 1
    long_example = Example([user("Hi there, long")], chosen="c", rejected="r")
    samples, stats = tokenize_pairwise([example, long_example], tok, chatml, cutoff_len=len(prompt) + 4)
    assert len(samples) == 1 and stats.dropped_too_long == 1


def test_tokenize_pairwise_multi_turn_prompt(tok, chatml) -> None:
    example = Example([user("Hi"), assistant("Yo"), user("Again")], system=None, chosen="A", rejected="B")
    [sample], _ = tokenize_pairwise([example], tok, chatml, cutoff_len=200)
    prompt = enc(tok, PROMPT_HI + "Yo<|im_end|>\n" + SECOND)
    assert sample["prompt_length"] == len(prompt)
    assert sample["chosen_input_ids"] == prompt + enc(tok, "A<|im_end|>\n")


# -- prompts --------------------------------------------------------------------------------


def test_tokenize_prompts(tok, chatml) -> None:
    examples = [
        Example([user("Hi")], system="S", source="p.jsonl line 1"),
        Example([user("Hi"), assistant("dropped reply")]),
        Example([user("x" * 100)], source="p.jsonl line 3"),
    ]
    samples, stats = tokenize_prompts(examples, tok, chatml, cutoff_len=60)
    assert samples[0] == {
        "input_ids": enc(tok, "<|im_start|>system\nS<|im_end|>\n" + PROMPT_HI),
        "messages": [user("Hi")],
        "system": "S",
        "answer": None,
    }
    assert samples[1]["input_ids"] == enc(tok, PROMPT_HI) and samples[1]["messages"] == [user("Hi")]
    assert samples[1]["answer"] == "dropped reply"  # kept as the reference answer for rule-checked rewards
    assert (stats.kept, stats.dropped_too_long) == (2, 1)
    with pytest.raises(RlhfkitError, match="p.jsonl line 3") as err:
        tokenize_prompts(examples, tok, chatml, cutoff_len=60, overlong="error")
    assert "\n" not in str(err.value) and "cutoff_len=60" in str(err.value)


# -- collators ------------------------------------------------------------------------------


def test_pad_sequences_sides() -> None:
    seqs = [[1, 2, 3], [4], []]
    assert pad_sequences(seqs, 0, "right").tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad_sequences(seqs, 9, "left").tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert pad_sequences(seqs, 0).dtype == torch.long
    with pytest.raises(ValueError):
        pad_sequences(seqs, 0, "middle")


def test_collate_sft() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate_sft(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_pairwise_chosen_rows_first() -> None:
    batch = [
        {"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 4], "prompt_length": 1},
        {"chosen_input_ids": [7, 8], "rejected_input_ids": [7, 9, 9, 9], "prompt_length": 1},
    ]
    out = collate_pairwise(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [7, 8, 0, 0], [1, 4, 0, 0], [7, 9, 9, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_collate_prompts_left_padded() -> None:
    batch = [{"input_ids": [3, 4, 5], "messages": [], "system": None}, {"input_ids": [6], "messages": [], "system": None}]
    out = collate_prompts(batch, pad_token_id=2)
    assert out["input_ids"].tolist() == [[3, 4, 5], [2, 2, 6]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# -- splits ---------------------------------------------------------------------------------


def test_train_val_split() -> None:
    items = list(range(20))
    train, val = train_val_split(items, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18 and sorted(train + val) == items
    assert train_val_split(items, 0.1, seed=3) == (train, val)
    assert train_val_split(items, 0.1, seed=4) != (train, val)
    train, val = train_val_split(items, 5, seed=0)
    assert len(val) == 5 and train == sorted(train)
    assert train_val_split(items, 0, seed=0) == (items, [])
    assert len(train_val_split(list(range(3)), 0.01, seed=0)[1]) == 1


@pytest.mark.parametrize("bad", [20, 25, -1, 1.5, "x"])
def test_train_val_split_bad_sizes(bad) -> None:
    with pytest.raises(RlhfkitError) as err:
        train_val_split(list(range(20)), bad, seed=0)
    assert "val_size" in str(err.value) and "\n" not in str(err.value)
