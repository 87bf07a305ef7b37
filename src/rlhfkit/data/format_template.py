"""`FormatTemplate`: a chat template described by format slots, encoded as LLaMA-Factory encodes it.

A format is a tuple of slots: text (with a ``{content}`` placeholder where the message goes), or
the markers `BOS` / `EOS` (the tokenizer's BOS id, or nothing without one; the EOS id). Each
message becomes a list of slots, and every text slot is tokenised on its own with
`add_special_tokens=False` (so a SentencePiece tokenizer adds its word-start marker to each, as
in LLaMA-Factory). Message by message:

* the first message starts with `prefix`, then `system` filled with the system prompt (the
  given one, or `default_system` when that is empty); with `system_in_user` (LLaMA-Factory's
  Llama2Template) the filled first system slot is instead put in front of the first user text;
* a user message is `user` (which ends with the assistant header, the generation prompt);
* an assistant message is `assistant`, by default ``("{content}", EOS)``.

`efficient_eos` templates write no EOS after replies; one EOS ends the whole conversation
(SFT, RM), and in SFT the first token of every later prompt carries the EOS as its label
(`tokenize_sft`). `replace_eos` makes the first stop word the EOS, when the tokenizer has it
as one token (LLaMA-Factory adds it to the vocabulary otherwise; here the tokenizer's own EOS
stays). Stop words end generation.

Reasoning templates (`thought_words` set, e.g. qwen3) follow LLaMA-Factory's ReasoningTemplate:

* `enable_thinking: false` strips thought blocks from every reply; an assistant reply without
  thought tags gets an empty thought, in the prompt (not trained) when thinking is off, at the
  start of the reply (trained) when it is on;
* SFT (`encode_turns`) keeps the thoughts of earlier replies and gives every reply lacking one
  an empty thought; with `mask_history` (and not `preserve_thinking`) earlier replies lose their
  thoughts and only the last gets the empty one;
* a single reply after its history (`encode_reply`: RM pairs and reward scoring;
  `encode_prompt`: PPO prompts and chat) strips the history's thoughts unless
  `preserve_thinking`, and only the final reply gets the empty thought.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rlhfkit.data.templates import BOS, EOS, Messages, Pair, Template, check_messages, encode_text
from rlhfkit.errors import fail

Slots = tuple  # of str (with "{content}") and BOS / EOS markers
CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
CHATML_ASSISTANT = "{content}<|im_end|>\n"
CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
THINK = ("<think>\n", "\n</think>\n\n")


def fill(slots: Slots, content: str) -> list:
    """`slots` with the first ``{content}`` of each text slot replaced by `content`."""
    return [slot.replace("{content}", content, 1) if isinstance(slot, str) else slot for slot in slots]


def up_to_content(slots: Slots) -> Slots:
    """`slots` cut right after their ``{content}`` placeholder: what a reply cut before its end writes."""
    for index, slot in enumerate(slots):
        if isinstance(slot, str) and "{content}" in slot:
            return tuple(slots[:index]) + (slot[:slot.index("{content}") + len("{content}")],)
    return tuple(slots)


@dataclass(frozen=True)
class FormatTemplate(Template):
    """A built-in template: LLaMA-Factory's format slots and switches (module docstring)."""

    name: str
    user: Slots
    assistant: Slots = ("{content}", EOS)
    system: Slots = ("{content}",)
    prefix: Slots = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    system_in_user: bool = False
    thought_words: tuple[str, str] | None = None
    empty_thought: str | None = None  # the empty thought block; None: both thought words joined
    enable_thinking: bool | None = True
    preserve_thinking: bool = False

    # -- public API ------------------------------------------------------------------------
    def encode_turns(self, tokenizer: Any, messages: Messages, system: str | None = None,
                     mask_history: bool = False) -> list[Pair]:
        """For each assistant turn, (prompt_ids, response_ids), as LLaMA-Factory's SFT encodes them."""
        check_messages(messages)
        messages = [dict(m) for m in messages[: len(messages) // 2 * 2]]
        return [(self._ids(tokenizer, p), self._ids(tokenizer, r))
                for p, r in self._turn_slots(messages, system, mask_history)]

    def encode_reply(self, tokenizer: Any, messages: Messages, system: str | None = None,
                     ended: bool = True) -> Pair:
        """(prompt_ids, reply_ids) for the final assistant reply, as LLaMA-Factory's RM encodes them;
        `ended` False: a reply cut before its end, its slots stopping right after its content."""
        check_messages(messages)
        if not messages or messages[-1]["role"] != "assistant":
            raise fail("encode_reply: the conversation must end with an assistant reply")
        prompt, reply = self._reply_slots([dict(m) for m in messages], system, ended)
        return self._ids(tokenizer, prompt), self._ids(tokenizer, reply)

    def encode_prompt(self, tokenizer: Any, messages: Messages, system: str | None = None) -> list[int]:
        """The ids of a conversation ending with a user turn, plus the generation prompt."""
        return self._ids(tokenizer, self._prompt_slots(messages, system))

    def render(self, tokenizer: Any, messages: Messages, system: str | None = None) -> str:
        """The text of `encode_prompt` (ending with a user turn) or of `encode_reply` (ending with a reply)."""
        check_messages(messages)
        if not messages:
            return ""
        if messages[-1]["role"] == "user":
            slots = self._prompt_slots(messages, system)
        else:
            prompt, reply = self._reply_slots([dict(m) for m in messages], system)
            slots = prompt + reply
        return "".join(self._text(tokenizer, slot) for slot in slots)

    def eos_id(self, tokenizer: Any) -> int | None:
        """The id an EOS slot becomes: the first stop word with `replace_eos` (if one token), else the EOS."""
        if self.replace_eos and self.stop_words:
            ids = encode_text(tokenizer, self.stop_words[0])
            if len(ids) == 1:
                return ids[0]
        return tokenizer.eos_token_id

    def uses_eos(self) -> bool:
        """Whether the encoding writes EOS anywhere (then the tokenizer needs one)."""
        formats = (self.user, self.assistant, self.system, self.prefix)
        return self.efficient_eos or any(slot is EOS for slots in formats for slot in slots)

    # -- LLaMA-Factory's encoding --------------------------------------------------------------
    def _message_slots(self, messages: list[dict[str, str]], system: str | None) -> list[list]:
        """One slot list per message (LLaMA-Factory's `Template._encode` / `Llama2Template._encode`)."""
        system = system or self.default_system
        encoded = []
        for index, message in enumerate(messages):
            slots: list = []
            content = message["content"]
            if index == 0:
                slots += list(self.prefix)
                if system and self.system_in_user:
                    first = fill(self.system, system)[0]
                    content = (first if isinstance(first, str) else "") + content
                elif system:
                    slots += fill(self.system, system)
            slots += fill(self.user if message["role"] == "user" else self.assistant, content)
            encoded.append(slots)
        return encoded

    def _turn_slots(self, messages: list[dict[str, str]], system: str | None, mask_history: bool) -> list:
        """(prompt slots, response slots) per reply: LLaMA-Factory's `encode_multiturn`."""
        replies = range(1, len(messages), 2)
        discard = self.thought_words is not None and mask_history and not self.preserve_thinking
        if self.thought_words is not None:
            for index in replies:
                if self.enable_thinking is False or (discard and index != len(messages) - 1):
                    messages[index]["content"] = self._strip_thought(messages[index]["content"])
        encoded = self._message_slots(messages, system)
        pairs = [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]
        if self.thought_words is not None:
            for turn in ([len(pairs) - 1] if discard else range(len(pairs))):
                pairs[turn] = self._with_thought(*pairs[turn], messages[2 * turn + 1]["content"])
        if self.efficient_eos and pairs:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + [EOS])
        return pairs

    def _reply_slots(self, messages: list[dict[str, str]], system: str | None,
                     ended: bool = True) -> tuple[list, list]:
        """(prompt, final reply) slots: LLaMA-Factory's `encode_oneturn` (plus the EOS its RM adds);
        `ended` False: the reply's slots end with its content (no end-of-turn, suffix or EOS after it)."""
        last = len(messages) - 1
        if self.thought_words is not None:
            for index in range(1, last, 2):
                if not self.preserve_thinking:
                    messages[index]["content"] = self._strip_thought(messages[index]["content"])
            if self.enable_thinking is False:
                messages[last]["content"] = self._strip_thought(messages[last]["content"])
        encoded = self._message_slots(messages, system)
        if not ended:
            encoded[-1] = fill(up_to_content(self.assistant), messages[last]["content"])
        prompt, reply = [slot for slots in encoded[:-1] for slot in slots], encoded[-1]
        if self.thought_words is not None:
            prompt, reply = self._with_thought(prompt, reply, messages[last]["content"])
        return prompt, reply + ([EOS] if self.efficient_eos and ended else [])

    def _prompt_slots(self, messages: Messages, system: str | None) -> list:
        check_messages(messages)
        if not messages or messages[-1]["role"] != "user":
            raise fail("encode_prompt: the conversation must end with a user turn")
        prompt, _ = self._reply_slots([dict(m) for m in messages] + [{"role": "assistant", "content": ""}], system)
        return prompt

    # -- thoughts --------------------------------------------------------------------------
    def _strip_thought(self, content: str) -> str:
        """`content` without its thought blocks, leading newlines removed (LF's `remove_thought`)."""
        start, end = self.thought_words
        return re.sub(f"{re.escape(start)}(.*?){re.escape(end)}", "", content, flags=re.DOTALL).lstrip("\n")

    def _with_thought(self, prompt: list, reply: list, content: str) -> tuple[list, list]:
        """An empty thought for a reply without thought tags: in the prompt, or leading the reply."""
        start, end = self.thought_words
        if start.strip() in content or end.strip() in content:
            return prompt, reply
        thought = self.empty_thought if self.empty_thought is not None else start + end
        return (prompt + [thought], reply) if not self.enable_thinking else (prompt, [thought] + reply)

    # -- slots to ids and text -------------------------------------------------------------
    def _ids(self, tokenizer: Any, slots: list) -> list[int]:
        """Every text slot tokenised on its own; BOS/EOS as ids (nothing where the tokenizer has none)."""
        ids: list[int] = []
        for slot in slots:
            if slot is BOS:
                ids += [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            elif slot is EOS:
                eos = self.eos_id(tokenizer)
                ids += [eos] if eos is not None else []
            else:
                ids += encode_text(tokenizer, slot)
        return ids

    def _text(self, tokenizer: Any, slot) -> str:
        if slot is BOS:
            return tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
        if slot is EOS:
            if self.eos_id(tokenizer) is None:
                return ""
            replaced = self.replace_eos and self.stop_words and self.eos_id(tokenizer) != tokenizer.eos_token_id
            return self.stop_words[0] if replaced else tokenizer.eos_token
        return slot

    def _stop_words(self, tokenizer: Any) -> list[str]:
        return list(self.stop_words)
