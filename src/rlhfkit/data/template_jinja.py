"""A jinja `chat_template` that renders conversations exactly as a built-in `FormatTemplate` does.

`rlhfkit export` writes it into the exported tokenizer, so other tools (transformers, vLLM,
`rlhfkit chat` with `auto`) see the training format. It renders `FormatTemplate.render`: a
conversation ending with a user turn includes the generation prompt (the user format ends with
the assistant header); one ending with a reply is the RM's view (reasoning templates strip the
history's thoughts unless `preserve_thinking`; `efficient_eos` templates end with EOS). A
leading system message replaces the default system prompt; an empty one keeps it, as in
LLaMA-Factory.
"""

from __future__ import annotations

from typing import Any

from rlhfkit.data.format_template import FormatTemplate, fill
from rlhfkit.data.templates import BOS, EOS


def _literal(text: str) -> str:
    """`text` as a jinja string literal (jinja reads backslash escapes the way Python's unicode_escape does)."""
    return "'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _expression(slot: Any, variable: str, template: FormatTemplate, tokenizer: Any) -> str:
    """A jinja expression for one slot, with ``{content}`` read from `variable`."""
    if slot is BOS or slot is EOS:
        return _literal(template._text(tokenizer, slot))
    before, found, after = slot.partition("{content}")
    parts = [_literal(before)] + ([variable, _literal(after)] if found else [])
    return " ~ ".join(part for part in parts if part != "''") or "''"


def _emit(slots, variable: str, template: FormatTemplate, tokenizer: Any) -> str:
    return "".join("{{ " + _expression(slot, variable, template, tokenizer) + " }}" for slot in slots)


def _strip_macro(template: FormatTemplate) -> str:
    """A macro removing every `start ... end` thought block, then leading newlines (LF's `remove_thought`)."""
    start, end = (_literal(word) for word in template.thought_words)
    return (
        "{%- macro strip_thought(text) -%}"
        "{%- set ns = namespace(kept='', rest=text, done=false) -%}"
        f"{{%- for _ in range(text.count({start})) -%}}{{%- if not ns.done -%}}"
        f"{{%- set i = ns.rest.find({start}) -%}}"
        f"{{%- set j = ns.rest.find({end}, i + {start}|length) if i >= 0 else -1 -%}}"
        "{%- if j < 0 -%}{%- set ns.done = true -%}{%- else -%}"
        f"{{%- set ns.kept = ns.kept ~ ns.rest[:i] -%}}{{%- set ns.rest = ns.rest[j + {end}|length:] -%}}"
        "{%- endif -%}{%- endif -%}{%- endfor -%}"
        "{{- (ns.kept ~ ns.rest).lstrip('\\n') -}}"
        "{%- endmacro -%}"
    )


def builtin_chat_template(template: FormatTemplate, tokenizer: Any) -> str:
    """The jinja equivalent of `template.render` (module docstring)."""
    t, emit = template, lambda slots, variable="content": _emit(slots, variable, template, tokenizer)
    thinking = t.thought_words is not None
    parts = [
        ("{%- if messages and messages[0]['role'] == 'system' -%}"
         "{%- set system_message = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
         "{%- else -%}{%- set system_message = '' -%}{%- set turns = messages -%}{%- endif -%}"),
        f"{{%- if not system_message -%}}{{%- set system_message = {_literal(t.default_system)} -%}}{{%- endif -%}}",
        _strip_macro(t) if thinking else "",
        "{%- for message in turns -%}{%- set content = message['content'] -%}{%- if loop.first -%}",
        emit(t.prefix),
    ]
    if t.system_in_user:
        first = _expression(fill(t.system, "{content}")[0], "system_message", t, tokenizer)
        parts.append(f"{{%- if system_message -%}}{{%- set content = {first} ~ content -%}}{{%- endif -%}}")
    else:
        parts.append("{%- if system_message -%}" + emit(t.system, "system_message") + "{%- endif -%}")
    parts.append("{%- endif -%}{%- if message['role'] == 'user' -%}" + emit(t.user))
    if thinking:
        thought = _literal(t.empty_thought if t.empty_thought is not None else "".join(t.thought_words))
        if not t.enable_thinking:
            parts.append(f"{{%- if loop.last -%}}{{{{ {thought} }}}}{{%- endif -%}}")
        parts.append("{%- else -%}")
        if not t.preserve_thinking:
            parts.append("{%- if not loop.last -%}{%- set content = strip_thought(content) -%}{%- endif -%}")
        if t.enable_thinking is False:
            parts.append("{%- if loop.last -%}{%- set content = strip_thought(content) -%}{%- endif -%}")
        start, end = (_literal(word.strip()) for word in t.thought_words)
        parts.append(f"{{%- if loop.last and {start} not in content and {end} not in content -%}}"
                     f"{{{{ {thought} }}}}{{%- endif -%}}")
    else:
        parts.append("{%- else -%}")
    parts.append(emit(t.assistant))
    if t.efficient_eos:
        parts.append("{%- if loop.last -%}" + emit((EOS,)) + "{%- endif -%}")
    parts.append("{%- endif -%}{%- endfor -%}")
    return "".join(parts)
