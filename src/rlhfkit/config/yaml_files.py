"""Read YAML written by a user, safely: YAML's safe loader, a size limit and a limit on the nodes
after aliases are expanded (an alias bomb never reaches the code that formats values), duplicate
keys refused, invalid UTF-8 reported by byte offset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rlhfkit.errors import fail, shown

MAX_CONFIG_BYTES = 1 << 20
"""Longest config file or override value read (1 MiB; real configs are a few KiB)."""
MAX_CONFIG_NODES = 100_000
"""Most YAML nodes (keys, values, list items) a config may hold once its aliases are expanded."""
MAX_EXPANDED_CHARS = 16 * MAX_CONFIG_BYTES
"""Most characters its scalars may hold once its aliases are expanded."""
MERGE_TAG = "tag:yaml.org,2002:merge"


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _check_duplicate_keys(node: MappingNode, where: str) -> None:
    """Refuse a mapping that names a key twice (YAML would keep the last silently); merged keys (``<<``) may be
    overridden."""
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, ScalarNode) or key.tag == MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        if (key.tag, key.value) in seen:
            raise fail(f"{where}: key {shown(key.value)} appears twice (lines {seen[key.tag, key.value]} and "
                       f"{line}); keep one")
        seen[key.tag, key.value] = line


def check_nodes(root: Node, where: str) -> None:
    """Refuse more than `MAX_CONFIG_NODES` nodes or `MAX_EXPANDED_CHARS` characters after alias expansion,
    aliases that contain themselves, and duplicate keys. Each distinct node is visited once, so the check
    takes time linear in the text."""
    expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, characters) with aliases expanded
    started: set[int] = set()  # nodes whose count is pending: the current path from the root
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            started.discard(key)
            counts = [expanded[id(child)] for child in _children(node)]
            nodes = 1 + sum(n for n, _ in counts)
            chars = (len(node.value) if isinstance(node, ScalarNode) else 0) + sum(c for _, c in counts)
            if nodes > MAX_CONFIG_NODES or chars > MAX_EXPANDED_CHARS:
                raise fail(f"{where}: more than {MAX_CONFIG_NODES} values or {MAX_EXPANDED_CHARS} characters once "
                           "its aliases (*name) are expanded; a config needs far fewer: remove repeated aliases")
            expanded[key] = (nodes, chars)
            continue
        if key in expanded:
            continue
        if key in started:
            raise fail(f"{where} line {node.start_mark.line + 1}: an alias refers to the value that contains it; "
                       "remove the recursion")
        started.add(key)
        if isinstance(node, MappingNode):
            _check_duplicate_keys(node, where)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in expanded)


def parse_yaml(text: str, where: str) -> Any:
    """The value of YAML `text` (safe loader) after `check_nodes`; `where` names it in messages.

    Syntax errors are raised as `yaml.YAMLError`; limits, duplicate keys and values Python cannot
    hold as one-line `RlhfkitError`s.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise fail(f"{where} is longer than {MAX_CONFIG_BYTES} characters; a config is a few kilobytes")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_nodes(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise fail(f"{where}: values nested too deeply; flatten the config") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise fail(f"{where}: a value cannot be read ({str(err).splitlines()[0][:100]})") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping from `path` with `parse_yaml`; errors name the file (and line or byte)."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"config file {path} does not exist; pass the path of a YAML file")
    with path.open("rb") as stream:
        data = stream.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise fail(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes; a config is a few kilobytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise fail(f"config file {path}: invalid UTF-8 at byte offset {err.start} (from 0); save it as UTF-8") from None
    try:
        loaded = parse_yaml(text, str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise fail(f"{path}{line}: {problem}; fix the YAML syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise fail(f"{path}: the config must be a mapping of key: value lines")
    return loaded
