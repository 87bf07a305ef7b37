"""`TokenizerTemplate`: the tokenizer's own jinja chat template, split into turns by diffing.

For the assistant turn at position k the prompt segment is
``render(turns[:k], add_generation_prompt=True)`` minus the text already assigned, and the
response segment is ``render(turns[:k + 1])`` minus that rendering, cut right after the
first special/added token following the reply text (the turn terminator). Whatever the
template writes after the terminator (e.g. "\\n") starts the next prompt segment, or is
dropped after the last reply. Templates that render earlier turns differently once more
turns follow (some "thinking" templates do) cannot be split this way and raise an error
suggesting a built-in template.

Tool-call conversations (`encode_tool_turns`) render with ``tools=`` the same way; a reply that
is a tool call ends at the template's turn terminator after the (last) called function's name.
`check_tool_template` refuses templates that do not render tools, calls and results.
"""

from __future__ import annotations

from typing import Any

from rlhfkit.data.templates import EOS, TEMPLATES, Pair, Pieces, Template
from rlhfkit.data.tools import check_tool_messages
from rlhfkit.errors import RlhfkitError, fail


class TokenizerTemplate(Template):
    """Renders with `tokenizer.apply_chat_template` (the `auto` template)."""

    name = "auto"

    def encode_tool_turns(self, tokenizer: Any, messages: list[dict[str, Any]], system: str | None,
                          tools: list[dict]) -> list[Pair]:
        """`encode_turns` for a tool-call conversation (`data.tools`), rendered with ``tools=tools``."""
        check_tool_messages(messages)
        pairs, _ = self._pieces(tokenizer, list(messages), system, tools)
        return [(self._ids(tokenizer, p), self._ids(tokenizer, r)) for p, r in pairs]

    def _pieces(self, tokenizer: Any, messages: list[dict[str, Any]], system: str | None,
                tools: list[dict] | None = None) -> Pieces:
        conversation = [{"role": "system", "content": system}] if system else []
        conversation += [{k: v for k, v in m.items() if k in ("role", "content", "tool_calls")} for m in messages]
        consumed = ""
        pairs: list[tuple[list, list]] = []
        for k, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            before = self._render(tokenizer, conversation[:k], True, tools)
            after = self._render(tokenizer, conversation[: k + 1], False, tools)
            self._check_prefix(consumed, before)
            self._check_prefix(before, after)
            if message.get("tool_calls"):
                reply, terminator = self._split_tool_call(tokenizer, after[len(before):], message["tool_calls"])
            else:
                reply, terminator = _split_reply(tokenizer, after[len(before):], message["content"])
            pairs.append(([before[len(consumed):]], [reply] if terminator else [reply, EOS]))
            consumed = before + reply
        tail: list = []
        if conversation and conversation[-1]["role"] in ("user", "tool"):
            final = self._render(tokenizer, conversation, True, tools)
            self._check_prefix(consumed, final)
            tail = [final[len(consumed):]]
        return pairs, tail

    def _split_tool_call(self, tokenizer: Any, text: str, calls: list[dict]) -> tuple[str, str | None]:
        """Cut a rendered tool-call reply after the turn terminator that follows the last call's name
        (the call's own markup, such as <tool_call>, may be special tokens too)."""
        name = calls[-1]["function"]["name"]
        start = text.rfind(name)
        if start < 0:
            raise fail(f"template: the tokenizer's chat_template did not render the call of {name!r}; "
                       "use a model whose chat template supports tool calls")
        terminators = self._stop_words(tokenizer)
        end = text.find(terminators[0], start + len(name)) if terminators else -1
        if end < 0:
            return text, None
        return text[:end + len(terminators[0])], terminators[0]

    def _stop_words(self, tokenizer: Any) -> list[str]:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        pairs, _ = self._pieces(tokenizer, probe, None)
        _, terminator = _split_reply(tokenizer, pairs[0][1][0], "y")
        return [terminator] if terminator else []

    @staticmethod
    def _render(tokenizer: Any, conversation: list[dict[str, Any]], generation: bool,
                tools: list[dict] | None = None) -> str:
        try:
            text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                                 add_generation_prompt=generation)
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


PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_lookup", "description": "Looks a probe word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}
PROBE_CONVERSATION = [
    {"role": "user", "content": "Look up x."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "probe_lookup", "arguments": {"word": "x"}}}]},
    {"role": "tool", "content": "probe result 42"},
    {"role": "assistant", "content": "It is 42."},
]


def tool_support_problem(tokenizer: Any) -> str | None:
    """What the tokenizer's chat template fails to render of a tool conversation; None if it renders all."""
    try:
        text = TokenizerTemplate._render(tokenizer, PROBE_CONVERSATION, False, [PROBE_TOOL])
    except RlhfkitError:
        return "chat_template fails on tool messages"
    if "Looks a probe word up." not in text:
        return "chat_template ignores the tools list"
    if text.count("probe_lookup") < 2:  # once among the tools, once in the call
        return "chat_template ignores assistant tool_calls"
    if "probe result 42" not in text:
        return "chat_template ignores tool results"
    return None


def check_tool_template(template: Template, tokenizer: Any, where: str) -> None:
    """Fail unless `template` is the tokenizer's own and renders tools, tool calls and tool results."""
    if not isinstance(template, TokenizerTemplate):
        raise fail(f"{where}: tool-call data (a tools column or function_call/observation turns) is rendered "
                   f"only through the tokenizer's own chat template, not template {template.name!r}; set template: "
                   "auto with a model whose chat template supports tools, or remove the tool data")
    if not getattr(tokenizer, "chat_template", None):
        raise fail(f"{where}: tool-call data needs the tokenizer's chat template, and this tokenizer has none; "
                   "use a model whose chat template supports tools, or remove the tool data")
    problem = tool_support_problem(tokenizer)
    if problem is not None:
        raise fail(f"{where}: tool-call data (a tools column or function_call/observation turns) cannot be "
                   f"rendered: the tokenizer's {problem}; use a model whose chat template supports tools "
                   "(apply_chat_template(..., tools=...)), or remove the tool data")
