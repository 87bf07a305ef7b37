"""Chat templates: turning conversations into token ids split into prompt and response parts.

`get_template(name, tokenizer)` returns a `Template`:

* ``None``/``"auto"``: the tokenizer's own jinja `chat_template`. Turns are split by
  rendering growing prefixes of the conversation (`apply_chat_template(...,
  tokenize=False)`, with and without the generation prompt) and diffing the strings; each
  piece is tokenised with `add_special_tokens=False`. A reply's segment ends at the first
  special/added token after its text (its turn terminator, e.g. ``<|im_end|>``); text after
  it (e.g. "\\n") starts the next prompt. If the template puts no special token after a
  reply, the tokenizer's EOS id is appended to the response so the model learns to stop.
* built-ins (`TEMPLATES`): ``default`` ("Human: ...\\nAssistant: ..." with EOS after each
  reply), ``empty`` (bare text, EOS after each reply), ``chatml``, ``llama3`` and ``qwen``
  (chatml with Qwen's default system prompt). Their special markers are written as text
  (``<|im_start|>``, ``<|begin_of_text|>``, ...) and become single tokens only if the
  tokenizer knows them; otherwise the literal characters are encoded. BOS: ``llama3`` writes
  ``<|begin_of_text|>`` itself; the others prepend the tokenizer's BOS only when the
  tokenizer adds one by itself to plain text (as Llama tokenizers do), so BOS is never doubled.

Segments are tokenised one by one, which is what training and generation both see; for
tokenizers that merge across segment boundaries this can differ slightly from tokenising
the whole rendered string at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhfkit.errors import fail

Messages = Sequence[dict[str, str]]
Pair = tuple[list[int], list[int]]
# ([(prompt pieces, response pieces)] per reply, prompt pieces after the last reply); a piece is text or EOS.
Pieces = tuple[list[tuple[list, list]], list]


class _Eos:
    """Placeholder for the tokenizer's EOS token in a built-in format."""

    def __repr__(self) -> str:
        return "EOS"


EOS = _Eos()


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
    """Base class: subclasses implement `_text_pairs` (and may override `stop_token_ids`)."""

    name: str

    def encode_turns(self, tokenizer: Any, messages: Messages, system: str | None = None) -> list[Pair]:
        """For each assistant turn, (prompt_ids, response_ids); a trailing user turn is ignored.

        Concatenating the pairs gives the whole conversation; every response ends with the
        turn terminator the model must learn to generate.
        """
        check_messages(messages)
        pairs, _ = self._pieces(tokenizer, list(messages), system)
        return [(self._ids(tokenizer, p), self._ids(tokenizer, r)) for p, r in pairs]

    def encode_prompt(self, tokenizer: Any, messages: Messages, system: str | None = None) -> list[int]:
        """The ids of a conversation ending with a user turn, plus the generation prompt."""
        check_messages(messages)
        if not messages or messages[-1]["role"] != "user":
            raise fail("encode_prompt: the conversation must end with a user turn")
        pairs, tail = self._pieces(tokenizer, list(messages), system)
        ids: list[int] = []
        for prompt, response in pairs:
            ids += self._ids(tokenizer, prompt) + self._ids(tokenizer, response)
        return ids + self._ids(tokenizer, tail)

    def render(self, tokenizer: Any, messages: Messages, system: str | None = None) -> str:
        """The conversation as text, as the model sees it (EOS written as the eos_token).

        A conversation ending with a user turn includes the generation prompt.
        """
        check_messages(messages)
        pairs, tail = self._pieces(tokenizer, list(messages), system)
        pieces = [piece for pair in pairs for part in pair for piece in part]
        if messages and messages[-1]["role"] == "user":
            pieces += tail
        return "".join(tokenizer.eos_token if piece is EOS else str(piece) for piece in pieces)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end a reply: the tokenizer's EOS plus the template's turn terminator."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for word in self._stop_words(tokenizer):
            encoded = encode_text(tokenizer, word)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids

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


@dataclass(frozen=True)
class FormatTemplate(Template):
    """A built-in template described by format strings with a ``{content}`` slot.

    `user` includes the generation prompt that follows it; `assistant` is the reply plus
    its terminator (a tuple of text and `EOS`); `separator` follows each reply and is part
    of the next prompt; `prefix` starts the conversation (then `system`, if any).
    """

    name: str
    user: str
    assistant: tuple = ("{content}", EOS)
    system: str = "{content}"
    separator: str = ""
    prefix: str = ""
    default_system: str | None = None
    stop_words: tuple[str, ...] = ()

    def _pieces(self, tokenizer: Any, messages: list[dict[str, str]], system: str | None) -> Pieces:
        system = system if system is not None else self.default_system
        head = self.prefix + (self.system.replace("{content}", system) if system else "")
        pairs: list[tuple[list, list]] = []
        prompt = [head]
        for message in messages:
            if message["role"] == "user":
                prompt.append(self.user.replace("{content}", message["content"]))
            else:
                content = message["content"]
                reply = [p.replace("{content}", content) if isinstance(p, str) else p for p in self.assistant]
                pairs.append((prompt, reply))
                prompt = [self.separator]
        first = pairs[0][0] if pairs else prompt
        first.insert(0, self._bos(tokenizer, "".join(first)))
        return pairs, prompt

    def _bos(self, tokenizer: Any, start: str) -> str:
        """The tokenizer's BOS text if it adds BOS to plain text itself and `start` lacks it."""
        bos = tokenizer.bos_token
        if self.prefix or tokenizer.bos_token_id is None or not bos or start.startswith(bos):
            return ""
        bos_id = tokenizer.bos_token_id
        adds_bos = tokenizer.encode("a", add_special_tokens=True)[:1] == [bos_id] != encode_text(tokenizer, "a")[:1]
        return bos if adds_bos else ""

    def _stop_words(self, tokenizer: Any) -> list[str]:
        return list(self.stop_words)


_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TEMPLATES: dict[str, FormatTemplate] = {
    "default": FormatTemplate(
        "default", user="Human: {content}\nAssistant: ", system="System: {content}\n", separator="\n"
    ),
    "empty": FormatTemplate("empty", user="{content}", system="{content}\n"),
    "chatml": FormatTemplate(
        "chatml", user=_CHATML_USER, assistant=("{content}<|im_end|>",), system=_CHATML_SYSTEM,
        separator="\n", stop_words=("<|im_end|>",),
    ),
    "qwen": FormatTemplate(
        "qwen", user=_CHATML_USER, assistant=("{content}<|im_end|>",), system=_CHATML_SYSTEM,
        separator="\n", default_system=QWEN_DEFAULT_SYSTEM, stop_words=("<|im_end|>",),
    ),
    "llama3": FormatTemplate(
        "llama3",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant=("{content}<|eot_id|>",),
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        prefix="<|begin_of_text|>",
        stop_words=("<|eot_id|>",),
    ),
}


def get_template(name: str | None, tokenizer: Any) -> Template:
    """The template called `name`, or the tokenizer's own for None/"auto"."""
    key = (name or "auto").strip().lower()
    if key == "auto":
        from rlhfkit.data.jinja_template import TokenizerTemplate

        if not getattr(tokenizer, "chat_template", None):
            raise fail(
                "template: the tokenizer has no chat_template, so template 'auto' cannot be used; "
                f"set template: to one of {', '.join(TEMPLATES)}"
            )
        return TokenizerTemplate()
    if key not in TEMPLATES:
        names = ", ".join(TEMPLATES)
        raise fail(f"template: unknown template {name!r}; use 'auto' (the tokenizer's own) or one of {names}")
    template = TEMPLATES[key]
    if EOS in template.assistant and tokenizer.eos_token_id is None:
        raise fail(f"template: {key!r} ends replies with EOS, but the tokenizer has no eos_token; use another template")
    return template
