"""Converting raw rows in alpaca or sharegpt format (LLaMA-Factory's conventions) to `Example`s.

alpaca: the user turn is `instruction` and `input` joined by "\\n" (an empty one is left out); the
`history` column holds earlier `[user, assistant]` pairs, prepended in order; `system` is a
per-row system prompt. An empty or missing `output` gives a prompt-only example.

sharegpt: a list of turns, `{"from": ..., "value": ...}` by default or any tags set in
dataset_info.json (OpenAI-style `{"role": ..., "content": ...}` lists are detected for
direct files). A leading system turn becomes `Example.system` (it wins over a `system`
column). Tool data (a non-empty `tools` column, or `function_call` / `observation` turns, in
the assistant's and the user's place) becomes messages in transformers' tool format with the
function definitions in `Example.tools` (see `data.tools`); only SFT through the tokenizer's
own chat template trains on it. An empty final assistant turn counts as no reply (prompt-only
example).

Rows with images, videos or audios are refused: only text models are supported.

Pairwise rows have `chosen` and `rejected` columns: strings (alpaca), or a turn dict or a
string (sharegpt); the conversation before them must end with a user turn.

Cells holding a JSON list or object as text (as in CSV files) are decoded.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rlhfkit.data.dataset_info import MEDIA_COLUMNS, media_refusal
from rlhfkit.data.example import Example
from rlhfkit.data.tools import parse_tools, tool_call_message
from rlhfkit.errors import fail

if TYPE_CHECKING:
    from rlhfkit.data.dataset_info import DatasetSpec

def row_to_example(row: dict[str, Any], source: str, spec: DatasetSpec) -> Example:
    """Convert one raw row according to the dataset's formatting."""
    media = next((name for name in MEDIA_COLUMNS if row.get(name)), None)
    if media is not None:
        raise fail(f"{source}: {media_refusal(media)}")
    if spec.formatting == "sharegpt":
        return _sharegpt(row, source, spec)
    return _alpaca(row, source, spec)


def column_value(row: dict[str, Any], source: str, spec: DatasetSpec, key: str, required: bool) -> Any:
    """The value of the column mapped to `key`, or None when optional and absent."""
    name = spec.columns.get(key)
    if name is None or name not in row:
        if required:
            found = ", ".join(sorted(map(str, row))) or "none"
            column = name or key
            raise fail(
                f"{source}: missing column {column!r} (columns found: {found}); fix the data or "
                f"set columns.{key} for dataset {spec.name!r} in dataset_info.json"
            )
        return None
    return row[name]


def _text(value: Any, source: str, what: str) -> str:
    """Coerce a cell to text: None -> "", numbers -> str, OpenAI text parts joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(part.get("text", "")) for part in value)
    raise fail(f"{source}: {what} must be text, found {type(value).__name__}; only text data is supported")


def _decode(value: Any, source: str, what: str) -> Any:
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise fail(f"{source}: {what} holds malformed JSON ({error.msg}); fix the cell") from None
    return value


def _maybe_json(value: Any) -> Any:
    """Decode a JSON list/object held as text, or return the value unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _alpaca(row: dict[str, Any], source: str, spec: DatasetSpec) -> Example:
    prompt_col = spec.columns.get("prompt") or "prompt"
    user = _text(column_value(row, source, spec, "prompt", True), source, f"column {prompt_col!r}")
    query = _text(column_value(row, source, spec, "query", False), source, "the query column")
    user = "\n".join(part for part in (user, query) if part)
    if not user.strip():
        raise fail(f"{source}: empty prompt (column {prompt_col!r}); fill it in or remove the row")
    messages: list[dict[str, str]] = []
    history = _decode(column_value(row, source, spec, "history", False), source, "history")
    for index, pair in enumerate(history or [], start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise fail(f"{source}: history item {index} must be a [user, assistant] pair; fix the row")
        past_user, past_reply = (_text(v, source, f"history item {index}") for v in pair)
        if not past_user.strip() or not past_reply.strip():
            raise fail(f"{source}: history item {index} has an empty turn; fill it in or remove the row")
        messages += [{"role": "user", "content": past_user}, {"role": "assistant", "content": past_reply}]
    messages.append({"role": "user", "content": user})
    system = _text(column_value(row, source, spec, "system", False), source, "system") or None
    example = Example(messages, system=system, source=source)
    example.tools = parse_tools(column_value(row, source, spec, "tools", False), source) or None
    if spec.ranking:
        response = _maybe_json(column_value(row, source, spec, "response", False))
        if spec.columns.get("chosen") not in row and isinstance(response, list) and len(response) == 2:
            example.chosen, example.rejected = (_text(v, source, "response") for v in response)  # old style
        else:
            example.chosen = _text(column_value(row, source, spec, "chosen", True), source, "chosen")
            example.rejected = _text(column_value(row, source, spec, "rejected", True), source, "rejected")
        _check_pair(example, source)
        return example
    reply = _text(column_value(row, source, spec, "response", False), source, "response")
    if reply.strip():
        messages.append({"role": "assistant", "content": reply})
    return example


def _check_pair(example: Example, source: str) -> None:
    for what, value in (("chosen", example.chosen), ("rejected", example.rejected)):
        if not (value or "").strip():
            raise fail(f"{source}: empty {what} reply; fill it in or remove the row")


def _sharegpt(row: dict[str, Any], source: str, spec: DatasetSpec) -> Example:
    tags = spec.tags
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    roles = {  # the place each kind of turn takes in the alternation
        tags["user_tag"]: "user",
        tags["observation_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["function_tag"]: "assistant",
    }
    tool_turns = False
    turns = _decode(column_value(row, source, spec, "messages", True), source, "the conversation")
    if not isinstance(turns, list) or not turns:
        raise fail(f"{source}: the conversation must be a non-empty list of turns; fix the row")
    system = _text(column_value(row, source, spec, "system", False), source, "system") or None
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(turns, start=1):
        where = f"{source} turn {index}"
        if not isinstance(turn, dict) or role_tag not in turn or content_tag not in turn:
            keys = ", ".join(map(str, turn)) if isinstance(turn, dict) else type(turn).__name__
            raise fail(
                f"{where}: expected keys {role_tag!r} and {content_tag!r}, found {keys}; fix the row or "
                f"set tags.role_tag/content_tag for dataset {spec.name!r} in dataset_info.json"
            )
        tag, content = turn[role_tag], _text(turn[content_tag], where, "content")
        if index == 1 and tag == tags["system_tag"]:
            system = content or None
            continue
        if tag == tags["system_tag"]:
            raise fail(f"{where}: a system turn is only allowed as the first turn; fix the row")
        if tag not in roles:
            known = ", ".join(repr(t) for t in roles)
            raise fail(
                f"{where}: unknown role {tag!r} (expected one of {known}); fix the row or set tags in dataset_info.json"
            )
        role = roles[tag]
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            raise fail(
                f"{where}: expected a {expected} turn, found {tag!r}; turns must alternate user/assistant "
                "starting with user; fix the row"
            )
        is_last = index == len(turns)
        if not content.strip():
            if tag == tags["assistant_tag"] and is_last:
                break  # an empty final reply: prompt-only example
            what = "prompt" if role == "user" else "reply"
            raise fail(f"{where}: empty {what}; fill it in or remove the row")
        if tag == tags["function_tag"]:
            messages.append(tool_call_message(content, where))
        elif tag == tags["observation_tag"]:
            messages.append({"role": "tool", "content": content})
        else:
            messages.append({"role": role, "content": content})
        tool_turns = tool_turns or tag in (tags["function_tag"], tags["observation_tag"])
    if not messages:
        raise fail(f"{source}: the conversation has no user turn; fix the row")
    example = Example(messages, system=system, source=source)
    tools = parse_tools(column_value(row, source, spec, "tools", False), source)
    if tools or tool_turns:
        example.tools = tools
    if spec.ranking:
        if example.ends_with_reply:
            raise fail(
                f"{source}: a pairwise conversation must end with a user turn "
                "(the replies go in chosen/rejected); fix the row"
            )
        for what in ("chosen", "rejected"):
            setattr(example, what, _reply(column_value(row, source, spec, what, True), source, what, content_tag))
        _check_pair(example, source)
    return example


def _reply(value: Any, source: str, what: str, content_tag: str) -> str:
    """A pairwise reply given as a turn dict, as a turn dict serialised to text (CSV), or as text."""
    decoded = _maybe_json(value)
    if isinstance(decoded, dict) and content_tag in decoded:
        value = decoded
    if isinstance(value, dict):
        if content_tag not in value:
            found = ", ".join(map(str, value))
            raise fail(f"{source}: {what} has no {content_tag!r} key (found {found}); fix the row")
        value = value[content_tag]
    return _text(value, source, what)
