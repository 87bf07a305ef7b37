"""Chat templates: turning conversations into token ids split into prompt and response parts.

`get_template(name, tokenizer)` returns a `Template`:

* ``None``/``"auto"``: the tokenizer's own jinja `chat_template`. Turns are split by
  rendering growing prefixes of the conversation (`apply_chat_template(...,
  tokenize=False)`, with and without the generation prompt) and diffing the strings; each
  piece is tokenised with `add_special_tokens=False`. A reply's segment ends at the first
  special/added token after its text (its turn terminator, e.g. ``<|im_end|>``); text after
  it (e.g. "\\n") starts the next prompt. If the template puts no special token after a
  reply, the tokenizer's EOS id is appended to the response so the model learns to stop.
* a LLaMA-Factory template name (`TEMPLATES`: llama3, qwen3, mistral, gemma, ...): the same
  tokens, labels and stop words as LLaMA-Factory (`FormatTemplate`). Special markers are
  written as text (``<|im_start|>``, ``<|eot_id|>``, ...) and become single tokens only if the
  tokenizer knows them; otherwise their characters are encoded (LLaMA-Factory would add the
  stop words to the vocabulary instead).

Segments are tokenised one by one, which is what training and generation both see; for
tokenizers that merge across segment boundaries this can differ slightly from tokenising
the whole rendered string at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Sequence
from typing import Any

from rlhfkit.errors import fail

logger = logging.getLogger(__name__)

Messages = Sequence[dict[str, str]]
Pair = tuple[list[int], list[int]]
# ([(prompt pieces, response pieces)] per reply, prompt pieces after the last reply); a piece is text or EOS.
Pieces = tuple[list[tuple[list, list]], list]


class _Marker:
    """Placeholder for the tokenizer's BOS or EOS token in a built-in format."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


BOS = _Marker("BOS")
EOS = _Marker("EOS")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without any special tokens added by the tokenizer."""
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def check_messages(messages: Messages) -> None:
    """Require alternating user/assistant turns starting with user."""
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise fail(
                f"message {index + 1}: expected role {expected!r}, got {message.get('role')!r}; "
                "conversations must alternate user/assistant starting with user"
            )


class Template:
    """Base class: subclasses implement `_pieces` (and may override `stop_token_ids`).

    The base encodes by `_pieces` (the `auto` template); `FormatTemplate` overrides the public
    methods with LLaMA-Factory's encoding.
    """

    name: str
    default_system: str = ""  # used when a conversation has no system prompt
    efficient_eos: bool = False  # replies end with no EOS of their own; see FormatTemplate

    def encode_turns(self, tokenizer: Any, messages: Messages, system: str | None = None,
                     mask_history: bool = False) -> list[Pair]:
        """For each assistant turn, (prompt_ids, response_ids); a trailing user turn is ignored.

        Concatenating the pairs gives the whole conversation; every response ends with the
        turn terminator the model must learn to generate. `mask_history` (only the last reply is
        trained) changes how reasoning templates treat earlier thoughts.
        """
        check_messages(messages)
        pairs, _ = self._pieces(tokenizer, list(messages), system or self.default_system or None)
        return [(self._ids(tokenizer, p), self._ids(tokenizer, r)) for p, r in pairs]

    def encode_reply(self, tokenizer: Any, messages: Messages, system: str | None = None,
                     ended: bool = True) -> Pair:
        """(prompt_ids, reply_ids) of a conversation ending with an assistant reply (RM pairs, scoring).

        `ended` False: a reply cut before its end (a response truncated at max_new_tokens), whose ids
        stop after its content, without the end-of-turn token (or EOS) and what follows it.
        """
        if not messages or messages[-1]["role"] != "assistant":
            raise fail("encode_reply: the conversation must end with an assistant reply")
        turns = self.encode_turns(tokenizer, messages, system)
        prompt = [token for pair in turns[:-1] for part in pair for token in part] + turns[-1][0]
        reply = turns[-1][1]
        # A reply's segment ends at its end-of-turn token (or the EOS `_pieces` appends), split off by
        # the tokenizer as a special token: dropping it leaves the content's own ids.
        if not ended and reply and reply[-1] in self.stop_token_ids(tokenizer):
            reply = reply[:-1]
        return prompt, reply

    def encode_prompt(self, tokenizer: Any, messages: Messages, system: str | None = None) -> list[int]:
        """The ids of a conversation ending with a user turn, plus the generation prompt."""
        check_messages(messages)
        if not messages or messages[-1]["role"] != "user":
            raise fail("encode_prompt: the conversation must end with a user turn")
        pairs, tail = self._pieces(tokenizer, list(messages), system or self.default_system or None)
        ids: list[int] = []
        for prompt, response in pairs:
            ids += self._ids(tokenizer, prompt) + self._ids(tokenizer, response)
        return ids + self._ids(tokenizer, tail)

    def render(self, tokenizer: Any, messages: Messages, system: str | None = None) -> str:
        """The conversation as text, as the model sees it (EOS written as the eos_token).

        A conversation ending with a user turn includes the generation prompt.
        """
        check_messages(messages)
        pairs, tail = self._pieces(tokenizer, list(messages), system or self.default_system or None)
        pieces = [piece for pair in pairs for part in pair for piece in part]
        if messages and messages[-1]["role"] == "user":
            pieces += tail
        return "".join(tokenizer.eos_token if piece is EOS else str(piece) for piece in pieces)

    def eos_id(self, tokenizer: Any) -> int | None:
        """The id that ends a reply in training data (the tokenizer's EOS unless a template replaces it)."""
        return tokenizer.eos_token_id

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end a reply: the tokenizer's EOS plus the template's turn terminator."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for word in self._stop_words(tokenizer):
            encoded = encode_text(tokenizer, word)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids

    def reply_suffix_ids(self, tokenizer: Any) -> list[int]:
        """The ids `encode_reply` writes after a reply's first stop token (ChatML: those of "\\n").

        A response cut at its stop token gets these before a reward model scores it, so the score is
        read where RM training (`tokenize_pairwise`, which uses `encode_reply`) read it. Empty for
        replies that end at their stop token (llama3's <|eot_id|>, the `auto` template) or hold none.
        """
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        _, reply = self.encode_reply(tokenizer, probe)
        stops = set(self.stop_token_ids(tokenizer))
        ends = [index for index, token in enumerate(reply) if token in stops]
        return reply[ends[0] + 1:] if ends else []

    # -- for subclasses -------------------------------------------------------------------
    def _pieces(self, tokenizer: Any, messages: list[dict[str, str]], system: str | None) -> Pieces:
        """Prompt/response pieces per reply, and the prompt pieces for a trailing user turn."""
        raise NotImplementedError

    def _stop_words(self, tokenizer: Any) -> list[str]:
        return []

    @staticmethod
    def _ids(tokenizer: Any, pieces: list) -> list[int]:
        ids: list[int] = []
        text = ""
        for piece in pieces:
            if piece is EOS:
                ids += encode_text(tokenizer, text) + [tokenizer.eos_token_id]
                text = ""
            else:
                text += piece
        return ids + encode_text(tokenizer, text)


def get_template(name: str | None, tokenizer: Any, default_system: str | None = None,
                 enable_thinking: bool | None = True, preserve_thinking: bool = False) -> Template:
    """The template called `name`, or the tokenizer's own for None/"auto".

    `default_system` replaces the template's default system prompt; `enable_thinking` and
    `preserve_thinking` set how reasoning templates treat thoughts (`FormatTemplate`).
    """
    key = (name or "auto").strip().lower()
    if key == "auto":
        from rlhfkit.data.jinja_template import TokenizerTemplate

        if not getattr(tokenizer, "chat_template", None):
            raise fail(
                "template: the tokenizer has no chat_template, so template 'auto' cannot be used; "
                "set template: to a LLaMA-Factory template name (listed in docs/data.md), e.g. chatml"
            )
        template = TokenizerTemplate()
        if default_system is not None:
            template.default_system = default_system
        return template
    from rlhfkit.data.template_library import TEMPLATES

    check_template_name(name)
    template = dataclasses.replace(TEMPLATES[key], enable_thinking=enable_thinking,
                                   preserve_thinking=preserve_thinking)
    if default_system is not None:
        template = dataclasses.replace(template, default_system=default_system)
    if template.uses_eos() and template.eos_id(tokenizer) is None:
        raise fail(f"template: {key!r} ends replies with EOS, but the tokenizer has no eos_token; use another template")
    return template


def check_template_name(name: str | None, where: str = "template") -> None:
    """Refuse a name that is neither auto nor a built-in, suggesting the closest."""
    from rlhfkit.data.template_library import TEMPLATES

    key = (name or "auto").strip().lower()
    if key != "auto" and key not in TEMPLATES:
        close = difflib.get_close_matches(key, TEMPLATES, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        if re.search(r"vl\b|vl_|\dv\b|llava|vision|audio|omni|ocr|video|pixtral|paligemma|mllama|minicpm_[vo]", key):
            hint = "it looks like a template for vision or audio models, which are not supported; "
        raise fail(f"{where}: unknown template {name!r}; {hint}use 'auto' (the tokenizer's own chat template) "
                   f"or one of {', '.join(sorted(TEMPLATES))}")


def template_for(data: Any, tokenizer: Any) -> Template:
    """`get_template` with the template keys of a config's data section; a warning when the template's
    end-of-turn marker is not one token of the tokenizer (the template is then probably not the model's)."""
    template = get_template(data.template, tokenizer, data.default_system, data.enable_thinking,
                            data.preserve_thinking)
    stop_words = getattr(template, "stop_words", ())
    if stop_words and len(encode_text(tokenizer, stop_words[0])) != 1:
        logger.warning("note: template %s ends turns with %r, which is not one token of this tokenizer: replies are "
                       "trained to end with its characters and generation does not stop there (LLaMA-Factory would "
                       "add it to the vocabulary); is it this model's template? template: auto uses the tokenizer's "
                       "own", data.template, stop_words[0])
    return template


def __getattr__(name: str) -> Any:
    """`TEMPLATES` (the LLaMA-Factory-named built-ins) is loaded on first use: it builds on this module."""
    if name == "TEMPLATES":
        from rlhfkit.data.template_library import TEMPLATES

        return TEMPLATES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
