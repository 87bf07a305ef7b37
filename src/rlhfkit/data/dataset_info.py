"""Resolving dataset names to local files, with LLaMA-Factory's `dataset_info.json` format.

`dataset_dir/dataset_info.json` maps a dataset name to an entry such as::

    "my_sft": {
      "file_name": "my_sft.jsonl",          # a file or a folder of files, relative to dataset_dir
      "formatting": "alpaca",               # "alpaca" (default) or "sharegpt"
      "ranking": false,                     # true: pairwise preference data (chosen/rejected)
      "columns": {"prompt": "question", "response": "answer"},
      "tags": {"role_tag": "role", "content_tag": "content"}   # sharegpt only
    }

An entry without a local `file_name` (or whose file does not exist) may name a Hugging Face Hub
dataset instead: `"hf_hub_url": "org/name"` with optional `"subset"`, `"split"` (default train)
and `"folder"`, read through `datasets.load_dataset` (see `data/hub.py`).

Column and tag names left out take LLaMA-Factory's defaults (see `ALPACA_COLUMNS`,
`SHAREGPT_COLUMNS`, `SHAREGPT_TAGS`). A name that is not a key of `dataset_info.json` may be
a path to a data file or folder (absolute, or relative to the working directory or to
`dataset_dir`); its format is then detected from its first row.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.data.files import SUPPORTED_SUFFIXES, first_row, list_data_files
from rlhfkit.data.hub import HubDataset
from rlhfkit.errors import fail

ALPACA_COLUMNS: dict[str, str | None] = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "system": None,
    "chosen": None,
    "rejected": None,
}
SHAREGPT_COLUMNS: dict[str, str | None] = {
    "messages": "conversations",
    "system": None,
    "tools": None,
    "chosen": None,
    "rejected": None,
}
SHAREGPT_TAGS: dict[str, str] = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# OpenAI-style `messages` lists ({"role": ..., "content": ...}).
OPENAI_TAGS: dict[str, str] = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function",
    "system_tag": "system",
}
OTHER_SOURCES = ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
MEDIA_COLUMNS = ("images", "videos", "audios")
"""LLaMA-Factory's multimodal columns (refused: only text models are supported)."""


def media_refusal(column: str) -> str:
    """Why data with a media `column` is refused, and what to do (the tail of a one-line error)."""
    return (f"has {column} (column {column!r}); image, video and audio inputs are not supported yet, since rlhfkit "
            f"trains text-only models (their placeholders such as <image> would be trained as plain text); "
            "use a text-only dataset")


@dataclass
class DatasetSpec:
    """One dataset to load: where its files are and how to read its rows."""

    name: str
    path: Path
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str | None] = field(default_factory=lambda: dict(ALPACA_COLUMNS))
    tags: dict[str, str] = field(default_factory=lambda: dict(SHAREGPT_TAGS))
    num_samples: int | None = None
    hub: HubDataset | None = None
    """Set for an `hf_hub_url` dataset (then `path` is its id)."""


def resolve_datasets(names: str | list[str], dataset_dir: str, cache_dir: str | None = None,
                     token: str | None = None) -> list[DatasetSpec]:
    """Turn `names` ("a,b" or ["a", "b"]) into dataset specs, checking that the files exist.

    `cache_dir` and `token` (the config's cache_dir and hf_hub_token) are used by hf_hub_url datasets.
    """
    if isinstance(names, str):
        names = names.split(",")
    names = [name.strip() for name in names if name and name.strip()]
    if not names:
        raise fail("dataset: no dataset names given; set dataset: to a name in dataset_info.json or a file path")
    info_path = Path(dataset_dir) / "dataset_info.json"
    info = _read_info(info_path)
    hub_options = {"cache_dir": cache_dir, "token": token}
    return [_resolve_one(name, dataset_dir, info, info_path, hub_options) for name in names]


def _read_info(info_path: Path) -> dict[str, Any] | None:
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise fail(
            f"{info_path} line {error.lineno} column {error.colno}: malformed JSON ({error.msg}); fix the file"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise fail(f"{info_path}: cannot read ({' '.join(str(error).split())}); check the file") from None
    if not isinstance(info, dict):
        raise fail(f"{info_path}: expected a JSON object mapping dataset names to entries; fix the file")
    return info


def _resolve_one(name: str, dataset_dir: str, info: dict[str, Any] | None, info_path: Path,
                 hub_options: dict[str, Any]) -> DatasetSpec:
    if info is not None and name in info:
        return _spec_from_entry(name, info[name], dataset_dir, info_path, hub_options)
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(name), Path(dataset_dir) / name]
    for candidate in candidates:
        if candidate.exists():
            return detect_spec(candidate, name)
    looks_like_path = "/" in name or "\\" in name or Path(name).suffix.lower() in SUPPORTED_SUFFIXES
    if looks_like_path or info is None:
        tried = " or ".join(str(candidate) for candidate in candidates)
        where = f"not a dataset in {info_path} and " if info is not None else f"no {info_path}, and "
        raise fail(f"dataset {name!r}: {where}no file at {tried}; check the name or path")
    close = difflib.get_close_matches(name, list(info), n=3, cutoff=0.5)
    if close:
        hint = f"did you mean {', '.join(repr(c) for c in close)}?"
    else:
        hint = f"known: {', '.join(sorted(info)[:20])}"
    raise fail(f"dataset {name!r} is not in {info_path} and is not a file; {hint}")


def _spec_from_entry(name: str, entry: Any, dataset_dir: str, info_path: Path,
                     hub_options: dict[str, Any]) -> DatasetSpec:
    where = f"{info_path} dataset {name!r}"
    if not isinstance(entry, dict):
        raise fail(f"{where}: expected an object with file_name, formatting, columns, ...; fix the entry")
    file_name = entry.get("file_name")
    if file_name is not None and not isinstance(file_name, str):
        raise fail(f"{where}: file_name must be a string, got {file_name!r}")
    local = file_name and (Path(file_name) if Path(file_name).is_absolute() else Path(dataset_dir) / file_name)
    hub = _hub_source(entry, where, hub_options) if not (local and local.exists()) else None
    if not file_name and hub is None:
        other = next((key for key in OTHER_SOURCES if entry.get(key)), None)
        if other:
            raise fail(f"{where}: {other} is not supported (only hf_hub_url and local files); download the data "
                       "and set file_name to the local file")
        raise fail(f"{where}: has no file_name; set it to a data file or folder under {dataset_dir}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise fail(f"{where}: formatting {formatting!r} is not supported; use 'alpaca' or 'sharegpt'")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise fail(f"{where}: ranking must be true or false, got {ranking!r}")
    columns = dict(ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS)
    if ranking:
        columns.update(chosen="chosen", rejected="rejected")
    columns.update(_string_map(entry.get("columns"), f"{where} columns", allow_null=True))
    media = next((name for name in MEDIA_COLUMNS if columns.get(name)), None)
    if media is not None:
        raise fail(f"{where}: {media_refusal(media)}")
    tags = dict(SHAREGPT_TAGS)
    tags.update(_string_map(entry.get("tags"), f"{where} tags", allow_null=False))
    num_samples = entry.get("num_samples")
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        raise fail(f"{where}: num_samples must be a positive integer, got {num_samples!r}")
    if hub is not None:
        return DatasetSpec(name, Path(hub.repo_id), formatting, ranking, columns, tags, num_samples, hub)
    if not local.exists():
        raise fail(f"{where}: file {local} not found; check file_name (relative to {dataset_dir})")
    list_data_files(local)  # fail early on unsupported types or empty folders
    return DatasetSpec(name, local, formatting, ranking, columns, tags, num_samples)


def _hub_source(entry: dict[str, Any], where: str, hub_options: dict[str, Any]) -> HubDataset | None:
    """The entry's Hub dataset, if it names one with hf_hub_url."""
    repo_id = entry.get("hf_hub_url")
    if not repo_id:
        return None
    for key in ("hf_hub_url", "subset", "split", "folder"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise fail(f"{where}: {key} must be a string, got {entry[key]!r}")
    return HubDataset(repo_id, entry.get("subset"), entry.get("split") or "train", entry.get("folder"),
                      **hub_options)


def _string_map(value: Any, where: str, allow_null: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(f"{where}: expected an object mapping names to column names; fix the entry")
    for key, item in value.items():
        if not (isinstance(item, str) or (allow_null and item is None)):
            raise fail(f"{where}: {key!r} must be a column name string, got {item!r}")
    return dict(value)


def detect_spec(path: Path, name: str | None = None) -> DatasetSpec:
    """Build a spec for a data file or folder not listed in dataset_info.json, from its first row."""
    found = first_row(path)
    if found is None:
        raise fail(f"{path}: has no rows; add data or remove it from dataset:")
    source, row = found
    media = next((name for name in MEDIA_COLUMNS if row.get(name)), None)
    if media is not None:
        raise fail(f"{source}: {media_refusal(media)}")
    keys = set(row)
    ranking = "chosen" in keys and "rejected" in keys
    spec_name = name or str(path)
    for messages_key in ("conversations", "messages"):
        if messages_key in keys:
            columns = dict(SHAREGPT_COLUMNS, messages=messages_key)
            if "system" in keys:
                columns["system"] = "system"
            if "tools" in keys:
                columns["tools"] = "tools"
            if ranking:
                columns.update(chosen="chosen", rejected="rejected")
            tags = _detect_tags(row[messages_key])
            return DatasetSpec(spec_name, path, "sharegpt", ranking, columns, tags)
    prompt_key = next((key for key in ("instruction", "prompt", "question") if key in keys), None)
    if prompt_key is None:
        raise fail(
            f"{source}: cannot detect the data format from columns {sorted(keys)}; expected alpaca "
            "(instruction/input/output) or sharegpt (conversations or messages) columns, "
            "or describe the file in dataset_info.json"
        )
    columns = dict(ALPACA_COLUMNS, prompt=prompt_key)
    columns["response"] = next((key for key in ("output", "response", "answer") if key in keys), "output")
    for optional in ("history", "system"):
        if optional in keys:
            columns[optional] = optional
    if ranking:
        columns.update(chosen="chosen", rejected="rejected")
    return DatasetSpec(spec_name, path, "alpaca", ranking, columns)


def _detect_tags(messages: Any) -> dict[str, str]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return dict(SHAREGPT_TAGS)
    first = messages[0] if isinstance(messages, list) and messages else None
    if isinstance(first, dict) and "role" in first and "from" not in first:
        return dict(OPENAI_TAGS)
    return dict(SHAREGPT_TAGS)
