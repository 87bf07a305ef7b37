"""A reward model scores an ended response where RM training read its score.

RM training scores prompt + reply from `encode_reply`, whose reply under a ChatML template ends
"<|im_end|>\\n": the score is read at the "\\n". A policy's response stops at <|im_end|>, so before
scoring it gets the template's `reply_suffix_ids` (the "\\n"); truncated responses, templates
whose replies end at their stop token (llama3) and the `auto` template score as they are.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    EOS_ID,
    PAD_ID,
    TINY_HIDDEN,
    TINY_WIDEST,
    assistant,
    float32_tolerance,
    pad_prompts_and_responses,
    random_lora,
    random_value_head,
    raw_scores,
    tiny_llama,
    user,
)
from rlhfkit.data import get_template
from rlhfkit.models.tiny import build_char_tokenizer
from rlhfkit.rewards.base import build_scoring_batch, with_reply_suffix
from rlhfkit.rewards.model import SeparateModelReward, SharedBaseReward

NEWLINE = 99  # "\n" in the character tokenizer (3 special tokens, 94 printable characters, " ", "\t")
EOT_ID = 101  # <|eot_id|>, added below
CONVERSATIONS = [("write a", "abab", True), ("hello there", "xyz", False), ("q", "a longer reply", True)]


def char_tokenizer():
    """The test character tokenizer (EOS <|im_end|>) plus llama3's markers as special tokens (ids 100-103)."""
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                         special_tokens=True)
    return tokenizer


@pytest.mark.parametrize(("name", "suffix"), [
    ("chatml", [NEWLINE]), ("qwen", [NEWLINE]), ("qwen3", [NEWLINE]), ("smollm2", [NEWLINE]),
    ("default", [NEWLINE]),  # ("{content}", EOS, "\n")
    ("alpaca", [NEWLINE, NEWLINE]),  # ("{content}", EOS, "\n\n")
    ("llama3", []),  # "{content}<|eot_id|>"
    ("falcon", []),  # efficient_eos: "{content}\n" then the EOS that ends the conversation
])
def test_reply_suffix_ids_follow_the_stop_token_of_encode_reply(name, suffix):
    tokenizer = char_tokenizer()
    template = get_template(name, tokenizer)
    assert template.reply_suffix_ids(tokenizer) == suffix
    _, reply = template.encode_reply(tokenizer, [user("Hi"), assistant("Yo")])
    stop = reply[len(reply) - len(suffix) - 1]
    assert stop in template.stop_token_ids(tokenizer)
    assert reply[len(reply) - len(suffix):] == suffix
    assert stop == (EOT_ID if name == "llama3" else EOS_ID)


def test_auto_template_replies_end_at_their_end_of_turn():
    """The tokenizer's own template cuts replies after <|im_end|>; its "\\n" starts the next prompt."""
    tokenizer = char_tokenizer()
    template = get_template("auto", tokenizer)
    assert template.reply_suffix_ids(tokenizer) == []
    _, reply = template.encode_reply(tokenizer, [user("Hi"), assistant("Yo")])
    assert reply[-1] == EOS_ID


def test_with_reply_suffix_by_hand():
    """Left-padded prompts (P = 2), right-padded responses (R = 3), suffix [7, 8], stop id 2."""
    ids = torch.tensor([[5, 6, 9, 2, 0], [0, 5, 9, 9, 9], [5, 6, 2, 0, 0], [5, 6, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    response_ids, response_mask = ids[:, 2:], mask[:, 2:].bool()
    before = ids.clone(), mask.clone()
    scored, scored_mask = with_reply_suffix(ids, mask, response_ids, response_mask, [7, 8], [2], 0)
    assert scored.tolist() == [[5, 6, 9, 2, 7, 8, 0],  # ended: the suffix right after the stop token
                               [0, 5, 9, 9, 9, 0, 0],  # truncated: as it was
                               [5, 6, 2, 7, 8, 0, 0],  # ended at once
                               [5, 6, 0, 0, 0, 0, 0]]  # empty response
    assert scored_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0],
                                    [1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    assert torch.equal(ids, before[0]) and torch.equal(mask, before[1])  # the policy's tensors are untouched
    assert with_reply_suffix(ids, mask, response_ids, response_mask, [], [2], 0) == (ids, mask)


def _rollout(tokenizer, template):
    """Prompt items and the policy's padded tensors: each reply's ids, plus <|im_end|> where it ended."""
    items = [{"messages": [user(prompt)], "system": None, "answer": None} for prompt, _, _ in CONVERSATIONS]
    prompts = [template.encode_prompt(tokenizer, item["messages"]) for item in items]
    responses = [tokenizer.encode(reply, add_special_tokens=False) + ([EOS_ID] if ended else [])
                 for _, reply, ended in CONVERSATIONS]
    query, query_mask, response, response_mask, ids, mask = pad_prompts_and_responses(prompts, responses, PAD_ID)
    batch = build_scoring_batch(tokenizer, template, items, query, query_mask, response, response_mask)
    assert torch.equal(batch.sequence_ids, ids) and torch.equal(batch.sequence_mask, mask)
    return batch, prompts, responses


def _rm_training_sequences(tokenizer, template, prompts, responses):
    """What RM training scores for each ended conversation (prompt + reply of `encode_reply`); the
    policy's tokens as they are for a truncated one."""
    sequences = []
    for (prompt_text, reply_text, ended), prompt, response in zip(CONVERSATIONS, prompts, responses):
        encoded_prompt, reply = template.encode_reply(tokenizer, [user(prompt_text), assistant(reply_text)])
        assert encoded_prompt == prompt
        sequences.append(encoded_prompt + reply if ended else prompt + response)
    return sequences


@pytest.fixture(scope="module")
def reward_models(tiny_model_dir):
    """A LoRA RM on the tiny base (adapter "default") and the plain base, each with a random head."""
    lora = random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 2, ("q_proj", "v_proj")).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return lora, base, random_value_head(TINY_HIDDEN, 3, std=1.0, bias=0.25)


@pytest.mark.parametrize("kind", ["shared_base", "separate_same_tokenizer"])
def test_ended_responses_are_scored_as_in_rm_training(tiny_model_dir, reward_models, kind):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = get_template("chatml", tokenizer)
    lora, base, head = reward_models
    if kind == "shared_base":
        model, source = lora, SharedBaseReward(lora, head, adapter_name="default", chunk_size=2)
    else:
        model, source = base, SeparateModelReward(base, head, tokenizer, None, same_tokenizer=True, chunk_size=2)
    batch, prompts, responses = _rollout(tokenizer, template)
    scores = source.score(batch)

    sequences = _rm_training_sequences(tokenizer, template, prompts, responses)
    assert [s[-2:] for s, (_, _, ended) in zip(sequences, CONVERSATIONS) if ended] == [[EOS_ID, NEWLINE]] * 2
    expected, magnitudes = raw_scores(model, head, sequences)
    # float32 scores of a padded batch against the raw model's: the head's sum over the last hidden
    # state of a network whose widest sum is TINY_WIDEST terms (test_reward_sources derives it).
    atol = float32_tolerance(magnitudes, TINY_WIDEST)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=atol)
    # Scored at <|im_end|> (LLaMA-Factory's position) the ended responses differ by far more.
    at_stop, _ = raw_scores(model, head, [p + r for p, r in zip(prompts, responses)])
    assert float((at_stop - expected)[[0, 2]].abs().min()) > 100 * atol
    assert float((at_stop - expected)[1]) == 0.0  # the truncated one: the same sequence


def test_auto_template_scores_the_policys_tokens_as_they_are(tiny_model_dir, reward_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = get_template("auto", tokenizer)
    lora, _, head = reward_models
    batch, prompts, responses = _rollout(tokenizer, template)
    ids, mask = batch.reward_model_input()
    assert torch.equal(ids, batch.sequence_ids) and torch.equal(mask, batch.sequence_mask)
    scores = SharedBaseReward(lora, head, adapter_name="default").score(batch)
    sequences = _rm_training_sequences(tokenizer, template, prompts, responses)
    assert sequences == [p + r for p, r in zip(prompts, responses)]  # RM training saw the same tokens
    expected, magnitudes = raw_scores(lora, head, sequences)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=float32_tolerance(magnitudes, TINY_WIDEST))


# ------------------------------------------------------------------ truncated replies, re-rendered

THOUGHT = "<think>\n\n</think>\n\n"  # qwen3's empty thought, leading a reply when thinking is on


@pytest.mark.parametrize(("name", "content_text", "end"), [
    ("chatml", "Yo", [EOS_ID, NEWLINE]),  # "{content}<|im_end|>\n"
    ("qwen3", THOUGHT + "Yo", [EOS_ID, NEWLINE]),
    ("llama3", "Yo", [EOT_ID]),  # "{content}<|eot_id|>"
    ("default", "Yo", [EOS_ID, NEWLINE]),  # ("{content}", EOS, "\n")
    ("falcon", "Yo", [NEWLINE, EOS_ID]),  # efficient_eos: "{content}\n", then the conversation's EOS
    ("mistral", " Yo", [EOS_ID]),  # (" {content}", EOS)
    ("auto", "Yo", [EOS_ID]),  # the tokenizer's ChatML, cut at <|im_end|>
])
def test_encode_reply_of_an_unended_reply_stops_after_its_content(name, content_text, end):
    """`ended=False`: the reply's own text up to its content, nothing the template writes after it;
    the prompt (with an earlier reply that did end) is the ended reply's."""
    tokenizer = char_tokenizer()
    template = get_template(name, tokenizer)
    messages = [user("Hi"), assistant("Hello there"), user("Go"), assistant("Yo")]
    prompt, reply = template.encode_reply(tokenizer, messages)
    cut_prompt, cut_reply = template.encode_reply(tokenizer, messages, ended=False)
    content = tokenizer.encode(content_text, add_special_tokens=False)
    assert cut_prompt == prompt
    assert cut_reply == content
    assert reply == content + end


@pytest.mark.parametrize("rm_template", ["llama3", "auto"])
def test_a_reward_model_with_its_own_tokenizer_ends_only_ended_replies(tiny_model_dir, rm_template):
    """The policy (ChatML, the tiny tokenizer) ended responses 0 and 2 and was cut off in response 1.
    A reward model with another tokenizer re-renders each: an ended reply as RM training encoded it
    (`encode_reply`), the truncated one as its prompt and its content's ids, no end-of-turn after."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch, _, _ = _rollout(tokenizer, get_template("chatml", tokenizer))
    assert batch.ended_with_stop_token.tolist() == [ended for _, _, ended in CONVERSATIONS]

    rm_tokenizer = char_tokenizer()  # four more special tokens than the policy's
    template = get_template(rm_template, rm_tokenizer)
    rm_model = tiny_llama(len(rm_tokenizer), seed=7).eval()
    head = random_value_head(16, 8, std=1.0, bias=0.25)
    source = SeparateModelReward(rm_model, head, rm_tokenizer, template, same_tokenizer=False, chunk_size=2)
    scores = source.score(batch)

    sequences, closed = [], []
    for prompt_text, reply_text, ended in CONVERSATIONS:
        prompt, reply = template.encode_reply(rm_tokenizer, [user(prompt_text), assistant(reply_text)])
        content = rm_tokenizer.encode(reply_text, add_special_tokens=False)
        assert reply[:len(content)] == content and reply[len(content):]  # an end-of-turn follows the content
        sequences.append(prompt + (reply if ended else content))
        closed.append(prompt + reply)
    ids, mask = source._encode(batch)
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == sequences
    expected, magnitudes = raw_scores(rm_model, head, sequences)
    # float32 scores of a padded batch against the raw model's float64 ones: the head's sum over the
    # last hidden state of a network whose widest sum is its MLP's 32 terms (conftest).
    atol = float32_tolerance(magnitudes, 32)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=atol)
    # Scored as if it had ended, the truncated response would differ by far more.
    as_ended, _ = raw_scores(rm_model, head, closed)
    assert float((as_ended - expected)[1].abs()) > 100 * atol
    assert torch.equal(as_ended[[0, 2]], expected[[0, 2]])
