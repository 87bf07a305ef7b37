"""The configuration reference, generated from the dataclasses' field docstrings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from rlhfkit.config.arguments import DEFAULT_ONLY_KEYS, IGNORED_KEYS, SECTIONS


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _default(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else None
    return "(required)" if value is None and f.name in ("model_name_or_path", "output_dir", "dataset") else f"`{value}`"


def render_reference() -> str:
    """Markdown: one table per concern with every key, its default and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/rlhfkit/config/arguments.py` (`python -m rlhfkit.config.reference > docs/configuration.md`).",
        "Every key can be set in the YAML file or as `key=value` after it on the command line.",
        "",
    ]
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        lines += [f"## {section}", "", (cls.__doc__ or "").strip(), "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            lines.append(f"| `{f.name}` | {_default(f)} | {docs.get(f.name, '')} |")
        lines.append("")
    lines += ["## Accepted LLaMA-Factory keys without effect", "", "| key | why |", "|---|---|"]
    lines += [f"| `{key}` | {why} |" for key, why in IGNORED_KEYS.items()]
    lines += ["", "## LLaMA-Factory keys accepted only at their default", "",
              "Another value stops the run with the reason; see [llamafactory.md](llamafactory.md).", "",
              "| key | accepted value | why another is refused |", "|---|---|---|"]
    lines += [f"| `{key}` | {'unset' if value is None else f'`{str(value).lower()}` or unset'} | {why} |"
              for key, (value, why) in DEFAULT_ONLY_KEYS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
