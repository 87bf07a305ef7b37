"""Reading raw rows (dicts) from local data files: JSON, JSONL, CSV and Parquet.

JSON and JSONL are parsed here rather than through `datasets`, so a malformed line is
reported with its file and line number. A `.json` file may hold either one JSON list of
objects or one object per line (as `datasets` also accepts). CSV is read with the standard
library; cells that hold a JSON list or object (for example a `history` or `conversations`
column) are left as strings and decoded by the format converters. Parquet is read with
pyarrow.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhfkit.errors import fail, one_line

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

# A raw row and where it came from, e.g. ("data/x.jsonl line 3", {...}).
Row = tuple[str, dict[str, Any]]


def list_data_files(path: Path) -> list[Path]:
    """The data files behind `path`: the file itself, or the supported files in a folder."""
    if path.is_dir():
        files = sorted(
            child
            for child in path.iterdir()
            if child.is_file()
            and not child.name.startswith(".")
            and child.suffix.lower() in SUPPORTED_SUFFIXES
        )
        if not files:
            raise fail(
                f"{path}: folder has no {'/'.join(SUPPORTED_SUFFIXES)} files; "
                "put the data files there or point file_name at a file"
            )
        return files
    if not path.is_file():
        raise fail(f"{path}: data file not found; check the path or file_name")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise fail(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return [path]


def iter_rows(path: Path) -> Iterator[Row]:
    """Yield `(source, row)` for every row of every data file behind `path`."""
    for file in list_data_files(path):
        suffix = file.suffix.lower()
        if suffix == ".csv":
            yield from _csv_rows(file)
        elif suffix == ".parquet":
            yield from _parquet_rows(file)
        else:
            yield from _json_rows(file)


def first_row(path: Path) -> Row | None:
    """The first row behind `path`, or None if there are no rows."""
    return next(iter_rows(path), None)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise fail(f"{file}: not valid UTF-8 text ({one_line(error)}); re-save it as UTF-8") from None
    except OSError as error:
        reason = one_line(error.strerror or error)
        raise fail(f"{file}: cannot read ({reason}); check the path and permissions") from None


def _check_object(source: str, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise fail(
            f"{source}: expected a JSON object with named columns, found {type(row).__name__}; "
            "make every row an object"
        )
    return row


def _json_rows(file: Path) -> Iterator[Row]:
    text = _read_text(file)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise fail(
                f"{file} line {error.lineno} column {error.colno}: malformed JSON ({error.msg}); fix the file"
            ) from None
        if not isinstance(rows, list):
            raise fail(f"{file}: expected a JSON list of rows; fix the file")
        for index, row in enumerate(rows, start=1):
            source = f"{file} row {index}"
            yield source, _check_object(source, row)
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{file} line {line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if line_number == 1 and _is_single_object(text):
                raise fail(
                    f"{file}: holds a single JSON object; expected a list of rows "
                    "([{...}, {...}]) or one JSON object per line"
                ) from None
            raise fail(f"{source}: malformed JSON ({error.msg}); fix or remove the line") from None
        yield source, _check_object(source, row)


def _is_single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _csv_rows(file: Path) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text = _read_text(file)
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        for index, row in enumerate(reader, start=1):
            source = f"{file} row {index}"
            if None in row:
                raise fail(
                    f"{source}: has more cells than the header has columns; quote cells that contain commas"
                )
            yield source, {key: value for key, value in row.items() if key is not None}
    except csv.Error as error:
        raise fail(f"{file} line {reader.line_num}: malformed CSV ({one_line(error)}); fix the file") from None


def _parquet_rows(file: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as error:  # pyarrow raises several types for broken files
        raise fail(f"{file}: cannot read Parquet ({one_line(error)}); check the file") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{file} row {index}", row
