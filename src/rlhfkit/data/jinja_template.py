"""`TokenizerTemplate`: the tokenizer's own jinja chat template, split into turns by diffing.

For the assistant turn at position k the prompt segment is
``render(turns[:k], add_generation_prompt=True)`` minus the text already assigned, and the
response segment is ``render(turns[:k + 1])`` minus that rendering, cut right after the
first special/added token following the reply text (the turn terminator). Whatever the
template writes after the terminator (e.g. "\\n") starts the next prompt segment, or is
dropped after the last reply. Templates that render earlier turns differently once more
turns follow (some "thinking" templates do) cannot be split this way and raise an error
suggesting a built-in template.
"""

from __future__ import annotations

from typing import Any

from rlhfkit.data.templates import EOS, TEMPLATES, Pieces, Template
from rlhfkit.errors import fail


class TokenizerTemplate(Template):
    """Renders with `tokenizer.apply_chat_template` (the `auto` template)."""

    name = "auto"

    def _pieces(self, tokenizer: Any, messages: list[dict[str, str]], system: str | None) -> Pieces:
        conversation = [{"role": "system", "content": system}] if system else []
        conversation += [{"role": m["role"], "content": m["content"]} for m in messages]
        consumed = ""
        pairs: list[tuple[list, list]] = []
        for k, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            before = self._render(tokenizer, conversation[:k], True)
            after = self._render(tokenizer, conversation[: k + 1], False)
            self._check_prefix(consumed, before)
            self._check_prefix(before, after)
            reply, terminator = _split_reply(tokenizer, after[len(before):], message["content"])
            pairs.append(([before[len(consumed):]], [reply] if terminator else [reply, EOS]))
            consumed = before + reply
        tail: list = []
        if conversation and conversation[-1]["role"] == "user":
            final = self._render(tokenizer, conversation, True)
            self._check_prefix(consumed, final)
            tail = [final[len(consumed):]]
        return pairs, tail

    def _stop_words(self, tokenizer: Any) -> list[str]:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        pairs, _ = self._pieces(tokenizer, probe, None)
        _, terminator = _split_reply(tokenizer, pairs[0][1][0], "y")
        return [terminator] if terminator else []

    @staticmethod
    def _render(tokenizer: Any, conversation: list[dict[str, str]], generation: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
        except Exception as error:  # jinja raises TemplateError, templates raise their own messages
            detail = " ".join(str(error).split())[:200]
            raise fail(
                f"template: the tokenizer's chat_template failed ({type(error).__name__}: {detail}); "
                f"set template: to one of {', '.join(TEMPLATES)}"
            ) from None
        if not isinstance(text, str):
            raise fail("template: the tokenizer's chat_template did not render text; set template: to a built-in")
        return text

    @staticmethod
    def _check_prefix(prefix: str, text: str) -> None:
        if not text.startswith(prefix):
            raise fail(
                "template: the tokenizer's chat_template renders earlier turns differently once more turns "
                "follow, so it cannot be split into prompt/response; "
                f"set template: to one of {', '.join(TEMPLATES)}"
            )


def _split_reply(tokenizer: Any, text: str, content: str) -> tuple[str, str | None]:
    """Cut `text` (a rendered reply) after its terminator: the first special token after the content."""
    stripped = content.strip()
    found = text.find(stripped) if stripped else -1
    start = found + len(stripped) if found >= 0 else 0
    markers = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    best: tuple[int, str] | None = None
    for marker in markers:
        if not marker:
            continue
        index = text.find(marker, start)
        if index >= 0 and (best is None or index < best[0] or (index == best[0] and len(marker) > len(best[1]))):
            best = (index, marker)
    if best is None:
        return text, None
    end = best[0] + len(best[1])
    return text[:end], best[1]
