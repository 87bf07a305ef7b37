"""Bad user input raises `RlhfkitError` with a one-line message naming the file, row or key."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_dataset_info, write_jsonl
from rlhfkit.data import load_examples, resolve_datasets
from rlhfkit.errors import RlhfkitError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(RlhfkitError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def load(name: str, dataset_dir: Path, kind: str = "sft"):
    return load_examples(resolve_datasets(name, str(dataset_dir)), kind)


def test_missing_direct_file(tmp_path: Path) -> None:
    message = error_of(resolve_datasets, "nope.jsonl", str(tmp_path))
    assert "nope.jsonl" in message and str(tmp_path / "nope.jsonl") in message


def test_missing_file_of_dataset_info_entry(tmp_path: Path) -> None:
    write_dataset_info(tmp_path, {"mine": {"file_name": "gone.json"}})
    message = error_of(resolve_datasets, "mine", str(tmp_path))
    assert str(tmp_path / "gone.json") in message and "'mine'" in message


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c" "output": "d"}\n')
    message = error_of(load, str(path), tmp_path)
    assert f"{path} line 3" in message and "malformed JSON" in message


def test_malformed_json_list(tmp_path: Path) -> None:
    path = write(tmp_path / "x.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]\n')
    message = error_of(load, str(path), tmp_path)
    assert f"{path} line 3" in message


def test_malformed_dataset_info(tmp_path: Path) -> None:
    write(tmp_path / "dataset_info.json", '{"a": {"file_name": "a.json",}}')
    message = error_of(resolve_datasets, "a", str(tmp_path))
    assert "dataset_info.json line 1" in message


def test_single_object_json_file(tmp_path: Path) -> None:
    path = write(tmp_path / "x.json", '{\n  "instruction": "a",\n  "output": "b"\n}\n')
    assert "single JSON object" in error_of(load, str(path), tmp_path)


def test_missing_column(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}])
    write_dataset_info(tmp_path, {"d": {"file_name": "d.jsonl"}})
    message = error_of(load, "d", tmp_path)
    assert f"{tmp_path / 'd.jsonl'} line 2" in message
    assert "'output'" in message and "answer, instruction" in message


def test_missing_sharegpt_column(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"dialog": []}])
    write_dataset_info(tmp_path, {"d": {"file_name": "d.jsonl", "formatting": "sharegpt"}})
    message = error_of(load, "d", tmp_path)
    assert "'conversations'" in message and "dialog" in message and "line 1" in message


def test_empty_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "  ", "input": "", "output": "b"}])
    message = error_of(load, str(path), tmp_path)
    assert f"{path} line 1" in message and "empty prompt" in message and "'instruction'" in message


def test_empty_prompt_sharegpt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "b"}]}])
    message = error_of(load, str(path), tmp_path)
    assert f"{path} line 1 turn 1" in message and "empty prompt" in message


def test_empty_response_for_sft(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}])
    message = error_of(load, str(path), tmp_path)
    assert f"{path} line 2" in message and "empty response" in message and "'output'" in message


def test_sharegpt_without_final_reply_for_sft(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "q"}]}])
    message = error_of(load, str(path), tmp_path)
    assert f"{path} line 1" in message and "reply" in message


def test_empty_chosen(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "chosen": "", "rejected": "r"}])
    message = error_of(load, str(path), tmp_path, "pairwise")
    assert f"{path} line 1" in message and "chosen" in message


def test_broken_turn_order(tmp_path: Path) -> None:
    turns = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": turns}])
    message = error_of(load, str(path), tmp_path)
    assert f"{path} line 1 turn 2" in message and "alternate" in message


def test_unknown_role(tmp_path: Path) -> None:
    turns = [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": turns}])
    message = error_of(load, str(path), tmp_path)
    assert "'bot'" in message and "'gpt'" in message and "turn 2" in message


def test_wrong_tags(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"role": "user", "content": "a"}]}])
    write_dataset_info(tmp_path, {"d": {"file_name": "d.jsonl", "formatting": "sharegpt"}})
    message = error_of(load, "d", tmp_path, "prompt")
    assert "'from'" in message and "role, content" in message and "tags" in message


def test_no_usable_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.jsonl", "\n\n")
    write_dataset_info(tmp_path, {"empty": {"file_name": "empty.jsonl"}})
    message = error_of(load, "empty", tmp_path)
    assert "no usable rows" in message and str(path) in message
    assert "no rows" in error_of(resolve_datasets, str(path), str(tmp_path))


def test_unknown_dataset_name_suggests_closest(tmp_path: Path) -> None:
    write_dataset_info(tmp_path, {"alpaca_en": {"file_name": "a.json"}, "sharegpt_zh": {"file_name": "b.json"}})
    message = error_of(resolve_datasets, "alpaca_em", str(tmp_path))
    assert "'alpaca_em'" in message and "did you mean 'alpaca_en'" in message and "dataset_info.json" in message


def test_other_hub_only_dataset(tmp_path: Path) -> None:
    """ModelScope, Modelers, script and cloud sources are refused (hf_hub_url: tests/test_model_keys.py)."""
    write_dataset_info(tmp_path, {"hub": {"ms_hub_url": "org/data"}})
    message = error_of(resolve_datasets, "hub", str(tmp_path))
    assert "ms_hub_url" in message and "not supported" in message and "file_name" in message


def test_bad_entry_values(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    write_dataset_info(tmp_path, {"d": {"file_name": "d.jsonl", "formatting": "openai"}})
    assert "formatting 'openai'" in error_of(resolve_datasets, "d", str(tmp_path))


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = write(tmp_path / "d.txt", "hello")
    message = error_of(resolve_datasets, str(path), str(tmp_path))
    assert str(path) in message and ".jsonl" in message


def test_undetectable_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    message = error_of(resolve_datasets, str(path), str(tmp_path))
    assert f"{path} line 1" in message and "dataset_info.json" in message


def test_non_object_row(tmp_path: Path) -> None:
    path = write(tmp_path / "d.json", '[["a", "b"]]')
    assert f"{path} row 1" in error_of(load, str(path), tmp_path)


def test_csv_with_extra_cells(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "instruction,output\na,b\nc,d,e\n")
    assert f"{path} row 2" in error_of(load, str(path), tmp_path)


def test_bad_history_item(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b", "history": [["only one"]]}])
    write_dataset_info(tmp_path, {"d": {"file_name": "d.jsonl", "columns": {"history": "history"}}})
    message = error_of(load, "d", tmp_path)
    assert "history item 1" in message and str(path) in message


def test_bad_turn_order_in_tokenisation_names_the_row() -> None:
    from rlhfkit.data import Example, get_template, tokenize_sft
    from rlhfkit.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    example = Example([{"role": "assistant", "content": "a"}], source="d.jsonl line 4")
    message = error_of(tokenize_sft, [example], tok, get_template("chatml", tok), 64)
    assert message.startswith("d.jsonl line 4: message 1")
