"""Chat templates: exact token ids and label masks, checked token by token against hand-written text."""

from __future__ import annotations

import copy

import pytest
from tokenizers import processors

from rlhfkit.data import Example, get_template, tokenize_sft
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.tiny import build_char_tokenizer

IGNORE = -100
EOT = "<|im_end|>"  # the char tokenizer's EOS
BOT = "<|im_start|>"  # the char tokenizer's BOS
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture()
def tok():
    return build_char_tokenizer()


def expected(tok, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels from hand-written (text, trained) parts; checks they tokenise like the whole text."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in parts:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    assert ids == tok.encode("".join(text for text, _ in parts), add_special_tokens=False)
    return ids, labels


def sft(tok, name, messages, system=None, **kwargs):
    template = get_template(name, tok)
    [sample], stats = tokenize_sft([Example(messages, system=system)], tok, template, cutoff_len=10_000, **kwargs)
    assert stats.kept == 1 and stats.dropped_too_long == 0
    return sample


SINGLE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
MULTI = SINGLE + [{"role": "user", "content": "Again"}, {"role": "assistant", "content": "Ok"}]

# The tokenizer's own ChatML jinja, split at the terminator: the "\n" after it starts the next prompt.
AUTO_SINGLE = [
    ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
    ("Yo<|im_end|>", True),
]
# LLaMA-Factory's chatml: the reply is "{content}<|im_end|>\n", newline included.
CHATML_SINGLE = [AUTO_SINGLE[0], ("Yo<|im_end|>\n", True)]
# Single turn with system prompt "Be kind.", written out by hand per template.
SINGLE_WITH_SYSTEM = {
    "auto": AUTO_SINGLE,
    "chatml": CHATML_SINGLE,
    "qwen": CHATML_SINGLE,
    "default": [(f"System: Be kind.{EOT}\nHuman: Hi{EOT}\nAssistant:", False), (f"Yo{EOT}\n", True)],
    "empty": [("Be kind.Hi", False), ("Yo", True)],
    "llama3": [
        (
            f"{BOT}<|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("Yo<|eot_id|>", True),
    ],
}

# Two turns, no system prompt.
MULTI_TURN = {
    "auto": [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Yo<|im_end|>", True),
        ("\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n", False),
        ("Ok<|im_end|>", True),
    ],
    "chatml": [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Yo<|im_end|>\n", True),
        ("<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n", False),
        ("Ok<|im_end|>\n", True),
    ],
    "qwen": [
        (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Yo<|im_end|>\n", True),
        ("<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n", False),
        ("Ok<|im_end|>\n", True),
    ],
    "default": [
        (f"Human: Hi{EOT}\nAssistant:", False),
        (f"Yo{EOT}\n", True),
        (f"Human: Again{EOT}\nAssistant:", False),
        (f"Ok{EOT}\n", True),
    ],
    "empty": [("Hi", False), ("Yo", True), ("Again", False), ("Ok", True)],
    "llama3": [
        (f"{BOT}<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Yo<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nAgain<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Ok<|eot_id|>", True),
    ],
}
NAMES = sorted(MULTI_TURN)


@pytest.mark.parametrize("name", NAMES)
def test_single_turn_with_system_token_by_token(tok, name) -> None:
    ids, labels = expected(tok, SINGLE_WITH_SYSTEM[name])
    sample = sft(tok, name, SINGLE, system="Be kind.")
    assert sample["input_ids"] == ids
    assert sample["labels"] == labels


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_trains_every_reply(tok, name) -> None:
    ids, labels = expected(tok, MULTI_TURN[name])
    sample = sft(tok, name, MULTI)
    assert sample["input_ids"] == ids
    assert sample["labels"] == labels


@pytest.mark.parametrize("name", NAMES)
def test_mask_history_trains_only_last_reply(tok, name) -> None:
    parts = [(text, trained and index == 3) for index, (text, trained) in enumerate(MULTI_TURN[name])]
    ids, labels = expected(tok, parts)
    sample = sft(tok, name, MULTI, mask_history=True)
    assert sample["input_ids"] == ids
    assert sample["labels"] == labels


@pytest.mark.parametrize("name", NAMES)
def test_train_on_prompt_trains_everything(tok, name) -> None:
    ids, _ = expected(tok, MULTI_TURN[name])
    sample = sft(tok, name, MULTI, train_on_prompt=True)
    assert sample["input_ids"] == ids
    assert sample["labels"] == ids


def test_train_on_prompt_with_mask_history(tok) -> None:
    parts = [(text, index >= 2) for index, (text, _) in enumerate(MULTI_TURN["chatml"])]
    ids, labels = expected(tok, parts)
    sample = sft(tok, "chatml", MULTI, train_on_prompt=True, mask_history=True)
    assert (sample["input_ids"], sample["labels"]) == (ids, labels)


@pytest.mark.parametrize("name", NAMES)
def test_encode_prompt_ends_with_generation_prompt(tok, name) -> None:
    template = get_template(name, tok)
    messages = MULTI[:3]
    text = "".join(text for text, _ in MULTI_TURN[name][:3])
    assert template.encode_prompt(tok, messages) == tok.encode(text, add_special_tokens=False)
    assert template.render(tok, messages) == text


def test_qwen_system_override(tok) -> None:
    template = get_template("qwen", tok)
    assert tok.decode(template.encode_prompt(tok, SINGLE[:1], system="Other.")).startswith(
        "<|im_start|>system\nOther.<|im_end|>\n"
    )


def test_auto_matches_tokenizers_own_rendering(tok) -> None:
    template = get_template("auto", tok)
    conversation = [{"role": "system", "content": "S"}] + MULTI
    whole = tok.apply_chat_template(conversation, tokenize=False)
    pairs = template.encode_turns(tok, MULTI, system="S")
    concatenated = [token for pair in pairs for part in pair for token in part]
    # Only the "\n" the template writes after the final terminator is left out.
    assert concatenated + tok.encode("\n", add_special_tokens=False) == tok.encode(whole, add_special_tokens=False)
    assert all(response[-1] == tok.eos_token_id for _, response in pairs)
    prompt_text = tok.apply_chat_template(conversation[:4], tokenize=False, add_generation_prompt=True)
    assert template.encode_prompt(tok, MULTI[:3], system="S") == tok.encode(prompt_text, add_special_tokens=False)


LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def test_auto_with_llama3_style_jinja_and_special_tokens(tok) -> None:
    tok.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    tok.chat_template = LLAMA3_JINJA
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    template = get_template(None, tok)
    pairs = template.encode_turns(tok, MULTI)
    whole = tok.apply_chat_template(MULTI, tokenize=False)
    assert [t for pair in pairs for part in pair for t in part] == tok.encode(whole, add_special_tokens=False)
    assert [response[-1] for _, response in pairs] == [eot, eot]
    assert pairs[0][0][0] == tok.bos_token_id and pairs[0][0].count(tok.bos_token_id) == 1
    assert template.stop_token_ids(tok) == [tok.eos_token_id, eot]


def test_builtin_llama3_uses_special_tokens_when_known(tok) -> None:
    tok.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    tok.bos_token = "<|begin_of_text|>"  # as in Llama 3's tokenizer; LLaMA-Factory's llama3 writes the tokenizer's BOS
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAMA3_TOKENS}
    template = get_template("llama3", tok)
    [(prompt, response)] = template.encode_turns(tok, SINGLE)
    assert prompt[0] == ids["<|begin_of_text|>"] and prompt.count(ids["<|begin_of_text|>"]) == 1
    assert response == tok.encode("Yo", add_special_tokens=False) + [ids["<|eot_id|>"]]
    assert template.stop_token_ids(tok) == [tok.eos_token_id, ids["<|eot_id|>"]]


def test_builtin_writes_bos_only_where_its_format_has_it(tok) -> None:
    """As LLaMA-Factory: BOS where the format says so, never added because the tokenizer adds one to plain text."""
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)]
    )
    assert tok.encode("a")[0] == tok.bos_token_id
    [(prompt, _)] = get_template("default", tok).encode_turns(tok, SINGLE)
    assert prompt == tok.encode(f"Human: Hi{EOT}\nAssistant:", add_special_tokens=False)
    [(prompt, _)] = get_template("chatml", tok).encode_turns(tok, SINGLE)
    assert prompt == tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    # llama3's prefix is the BOS: exactly one.
    [(prompt, _)] = get_template("llama3", tok).encode_turns(tok, SINGLE)
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1


def test_auto_without_terminator_appends_eos(tok) -> None:
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    pairs = get_template("auto", tok).encode_turns(tok, MULTI)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert pairs == [
        (enc("user: Hi\nassistant: "), enc("Yo\n") + [tok.eos_token_id]),
        (enc("user: Again\nassistant: "), enc("Ok\n") + [tok.eos_token_id]),
    ]


def test_stop_token_ids(tok) -> None:
    for name in NAMES:
        # chatml also stops at <|im_start|> (LLaMA-Factory's second stop word), one token here.
        extra = [tok.bos_token_id] if name == "chatml" else []
        assert get_template(name, tok).stop_token_ids(tok) == [tok.eos_token_id] + extra, name


def test_inconsistent_jinja_template_is_refused(tok) -> None:
    tok.chat_template = "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(RlhfkitError, match="set template:") as err:
        get_template("auto", tok).encode_turns(tok, SINGLE)
    assert "\n" not in str(err.value)


def test_broken_jinja_template_error(tok) -> None:
    tok.chat_template = "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no users\nallowed') }}{% endif %}"
    with pytest.raises(RlhfkitError, match="chat_template failed") as err:
        get_template("auto", tok).encode_turns(tok, SINGLE)
    assert "\n" not in str(err.value)


def test_auto_without_chat_template(tok) -> None:
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(RlhfkitError, match="set template:") as err:
        get_template("auto", plain)
    assert "\n" not in str(err.value)
    assert get_template("chatml", plain).encode_prompt(plain, SINGLE[:1])  # built-ins still work


def test_unknown_template(tok) -> None:
    with pytest.raises(RlhfkitError) as err:
        get_template("vicuna_v9", tok)
    message = str(err.value)
    assert "vicuna_v9" in message and "chatml" in message and "llama3" in message and "\n" not in message
    assert "did you mean 'vicuna'?" in message and "'auto'" in message
