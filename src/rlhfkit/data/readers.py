"""Loading `Example`s for a training stage from resolved dataset specs.

Each stage needs a different shape of example:

* ``"sft"``: every row must end with an assistant reply (an empty `output` is an error);
  ranking datasets are refused.
* ``"pairwise"``: the dataset must be a ranking dataset (chosen/rejected); the messages end
  with the user turn the two replies answer.
* ``"prompt"``: any format; a final assistant reply is removed, so PPO can use the prompts
  of SFT-style data. For ranking data the chosen/rejected replies are kept but unused.

Tool-call data is refused except for ``"sft"``.

Rows are checked strictly: a broken row raises `RlhfkitError` naming the file and row
rather than being skipped silently.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhfkit.data.dataset_info import DatasetSpec
from rlhfkit.data.example import Example
from rlhfkit.data.files import iter_rows
from rlhfkit.data.formats import column_value, row_to_example
from rlhfkit.data.hub import hub_rows
from rlhfkit.errors import fail

KINDS = ("sft", "pairwise", "prompt")

__all__ = ["Example", "KINDS", "load_examples", "read_examples"]


def load_examples(specs: Sequence[DatasetSpec], kind: str, max_samples: int | None = None) -> list[Example]:
    """Read every dataset in `specs` as examples for stage `kind` ("sft", "pairwise", "prompt").

    `max_samples` (and a dataset's own `num_samples`) keep only the first rows of each dataset.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if max_samples is not None and (type(max_samples) is not int or max_samples < 1):
        raise fail(f"max_samples must be a positive integer, got {max_samples!r}")
    examples: list[Example] = []
    for spec in specs:
        examples += read_examples(spec, kind, max_samples)
    return examples


def read_examples(spec: DatasetSpec, kind: str, max_samples: int | None = None) -> list[Example]:
    """Read one dataset as examples for stage `kind`."""
    if kind == "sft" and spec.ranking:
        raise fail(
            f"dataset {spec.name!r} ({spec.path}) is pairwise (chosen/rejected); supervised fine-tuning "
            "needs prompt/response data, so use another dataset here"
        )
    if kind == "pairwise" and not spec.ranking:
        raise fail(
            f"dataset {spec.name!r} ({spec.path}) is not pairwise; reward modelling needs chosen and "
            "rejected columns (set \"ranking\": true and the columns in dataset_info.json)"
        )
    limits = [n for n in (max_samples, spec.num_samples) if n is not None]
    limit = min(limits) if limits else None
    examples: list[Example] = []
    for source, row in (hub_rows(spec.hub) if spec.hub is not None else iter_rows(spec.path)):
        if limit is not None and len(examples) >= limit:
            break
        example = row_to_example(row, source, spec)
        if kind != "sft" and example.tools is not None:
            stage = "reward modelling" if kind == "pairwise" else "PPO and eval"
            raise fail(f"{source}: tool-call data (a tools column or function_call/observation turns) is supported "
                       f"for stage sft only, not for {stage}; remove dataset {spec.name!r} or its tool rows")
        if kind == "sft" and not example.ends_with_reply:
            column = spec.columns.get("response") if spec.formatting == "alpaca" else None
            if column is not None:
                column_value(row, source, spec, "response", required=True)  # names a missing column
            what = f"empty response (column {column!r})" if column else "no final assistant reply"
            raise fail(f"{source}: {what}; supervised fine-tuning needs a reply, so fill it in or remove the row")
        if kind == "prompt" and example.ends_with_reply:
            example.messages = example.messages[:-1]
        examples.append(example)
    if not examples:
        raise fail(f"dataset {spec.name!r} ({spec.path}) has no usable rows; add data or remove it from dataset:")
    return examples
