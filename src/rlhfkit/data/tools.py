"""Tool-call data in the shape chat templates take (`apply_chat_template(..., tools=...)`).

LLaMA-Factory's sharegpt tool data (its glaive_toolcall demo) has a `tools` column, a JSON list
of function definitions, and two more turn kinds: `function_call` in the assistant's place, whose
content is JSON ``{"name": ..., "arguments": {...}}`` (or a list of them, for parallel calls), and
`observation` in the user's place, the tool's output. They become::

    tools:        [{"type": "function", "function": {"name", "description", "parameters"}}, ...]
    function_call {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                   "function": {"name": ..., "arguments": {...}}}, ...]}
    observation   {"role": "tool", "content": ...}

which is what transformers documents for chat templates that support tools.
"""

from __future__ import annotations

import json
from typing import Any

from rlhfkit.errors import fail

CALL_FORMAT = 'JSON such as {"name": "f", "arguments": {...}} (or a list of them)'


def parse_tools(value: Any, source: str) -> list[dict]:
    """The function definitions of a `tools` cell (a JSON list as text, or a list); [] when empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise fail(f"{source}: the tools column holds malformed JSON ({error.msg}); fix the cell") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise fail(f"{source}: the tools column must be a JSON list of function definitions; fix the cell")
    tools = []
    for index, tool in enumerate(value, start=1):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            tools.append(tool)
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
            tools.append({"type": "function", "function": tool})
        else:
            raise fail(f"{source}: tool {index} in the tools column is not a function definition "
                       '({"name": ..., "description": ..., "parameters": {...}}); fix the cell')
    return tools


def tool_call_message(content: str, where: str) -> dict[str, Any]:
    """The assistant message of a `function_call` turn whose content is `CALL_FORMAT`."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        raise fail(f"{where}: a function_call turn must hold {CALL_FORMAT}; fix the row") from None
    calls = []
    for call in value if isinstance(value, list) else [value]:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise fail(f"{where}: a function_call turn must hold {CALL_FORMAT}; fix the row")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise fail(f"{where}: the arguments of function {call['name']!r} are malformed JSON; fix the row") \
                    from None
        calls.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    if not calls:
        raise fail(f"{where}: a function_call turn must hold {CALL_FORMAT}; fix the row")
    return {"role": "assistant", "content": "", "tool_calls": calls}


def check_tool_messages(messages: list[dict[str, Any]]) -> None:
    """Require user or tool turns alternating with assistant turns, starting with a user turn."""
    for index, message in enumerate(messages):
        allowed = ("user", "tool") if index % 2 == 0 else ("assistant",)
        if message.get("role") not in allowed or (index == 0 and message.get("role") != "user"):
            raise fail(f"message {index + 1}: expected role {' or '.join(allowed)!s}, got {message.get('role')!r}; "
                       "tool conversations alternate user (or tool) and assistant turns, starting with user")
