"""`Example`, the normalised conversation every data format is converted to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One training example, independent of the file format it came from.

    `messages` alternate `{"role": "user"|"assistant", "content": str}` turns, starting with
    a user turn. An SFT example ends with an assistant turn; a prompt-only or pairwise example
    ends with a user turn, and a pairwise one holds the two candidate final replies in
    `chosen` (preferred) and `rejected`. `source` says where the row came from
    ("data/x.jsonl line 12") for error messages.

    Tool data (`tools` not None: the function definitions, possibly none) may also hold
    `{"role": "tool", ...}` turns in the user's place and assistant turns with `tool_calls`
    (see `data.tools`).
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    system: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    source: str = ""
    tools: list[dict] | None = None

    @property
    def ends_with_reply(self) -> bool:
        """True when the last turn is an assistant reply."""
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"

    @property
    def is_pairwise(self) -> bool:
        """True when the example has both a chosen and a rejected reply."""
        return self.chosen is not None and self.rejected is not None
