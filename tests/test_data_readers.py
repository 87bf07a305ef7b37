"""Reading every supported format and file type into `Example`s, and resolving dataset names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assistant, user, write_dataset_info, write_jsonl
from rlhfkit.data import Example, load_examples, resolve_datasets
from rlhfkit.errors import RlhfkitError


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


# -- alpaca ---------------------------------------------------------------------------------


def test_alpaca_with_input_history_and_system(tmp_path: Path) -> None:
    write_json(
        tmp_path / "alp.json",
        [
            {
                "instruction": "Translate",
                "input": "bonjour",
                "output": "hello",
                "history": [["hi", "hey"], ["how are you?", "fine"]],
                "sys": "Be brief.",
            },
            {"instruction": "Say yes", "input": "", "output": "yes"},
        ],
    )
    write_dataset_info(tmp_path, {"alp": {"file_name": "alp.json", "columns": {"history": "history", "system": "sys"}}})
    examples = load_examples(resolve_datasets("alp", str(tmp_path)), "sft")
    first, second = examples
    assert first.messages == [user("hi"), assistant("hey"), user("how are you?"), assistant("fine"), user("Translate\nbonjour"), assistant("hello")]
    assert first.system == "Be brief."
    assert first.source == f"{tmp_path / 'alp.json'} row 1"
    assert second == Example([user("Say yes"), assistant("yes")], source=f"{tmp_path / 'alp.json'} row 2")


def test_alpaca_column_remapping(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "ctx": "math", "answer": "4"}])
    write_dataset_info(
        tmp_path,
        {"qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "query": "ctx", "response": "answer"}}},
    )
    [example] = load_examples(resolve_datasets(["qa"], str(tmp_path)), "sft")
    assert example.messages == [user("2+2?\nmath"), assistant("4")]
    assert example.source == f"{tmp_path / 'qa.jsonl'} line 1"


def test_alpaca_empty_output_is_a_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Write a poem", "output": ""}, {"instruction": "Hi"}])
    examples = load_examples(resolve_datasets(str(path), str(tmp_path)), "prompt")
    assert [e.messages for e in examples] == [[user("Write a poem")], [user("Hi")]]


def test_prompt_kind_strips_final_reply(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}],
    )
    [example] = load_examples(resolve_datasets(str(path), str(tmp_path)), "prompt")
    assert example.messages == [user("a"), assistant("b"), user("c")]


# -- sharegpt -------------------------------------------------------------------------------


def test_sharegpt_custom_tags_and_system_turn(tmp_path: Path) -> None:
    rows = [
        {
            "dialog": [
                {"speaker": "sys", "text": "You are terse."},
                {"speaker": "me", "text": "hello"},
                {"speaker": "bot", "text": "hi"},
                {"speaker": "me", "text": "bye"},
                {"speaker": "bot", "text": "ciao"},
            ]
        }
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot", "system_tag": "sys"}
    write_dataset_info(tmp_path, {"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"}, "tags": tags}})
    [example] = load_examples(resolve_datasets("chat", str(tmp_path)), "sft")
    assert example.messages == [user("hello"), assistant("hi"), user("bye"), assistant("ciao")]
    assert example.system == "You are terse."


def test_sharegpt_default_tags_with_system_column(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"}]
    write_json(tmp_path / "sg.json", rows)
    write_dataset_info(tmp_path, {"sg": {"file_name": "sg.json", "formatting": "sharegpt", "columns": {"system": "system"}}})
    [example] = load_examples(resolve_datasets("sg", str(tmp_path)), "sft")
    assert example == Example([user("q"), assistant("a")], system="S", source=f"{tmp_path / 'sg.json'} row 1")


def test_openai_messages_detected_from_file(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "oa.jsonl", rows)
    [spec] = resolve_datasets(str(path), str(tmp_path))
    assert spec.formatting == "sharegpt" and spec.tags["role_tag"] == "role" and not spec.ranking
    [example] = load_examples([spec], "sft")
    assert example.messages == [user("u"), assistant("a")] and example.system == "Sys"


def test_openai_tags_via_dataset_info(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    write_jsonl(tmp_path / "oa.jsonl", rows)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
    write_dataset_info(tmp_path, {"oa": {"file_name": "oa.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}})
    [example] = load_examples(resolve_datasets("oa", str(tmp_path)), "sft")
    assert example.messages == [user("u"), assistant("a")]


def test_sharegpt_tool_turns_become_tool_calls_and_results(tmp_path: Path) -> None:
    """Not plain text: a call and a result in transformers' tool format (more in test_data_tools)."""
    turns = [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."},
    ]
    path = write_jsonl(tmp_path / "tools.jsonl", [{"conversations": turns}])
    [example] = load_examples(resolve_datasets(str(path), str(tmp_path)), "sft")
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                "function": {"name": "w", "arguments": {}}}]}
    assert example.messages == [user("weather?"), call, {"role": "tool", "content": "sunny"},
                                assistant("It is sunny.")]
    assert example.tools == []  # tool data without definitions


# -- pairwise -------------------------------------------------------------------------------


def test_pairwise_alpaca_via_dataset_info_and_detected(tmp_path: Path) -> None:
    rows = [{"instruction": "Pick", "input": "x", "chosen": "good", "rejected": "bad"}]
    write_json(tmp_path / "pref.json", rows)
    write_dataset_info(tmp_path, {"pref": {"file_name": "pref.json", "ranking": True}})
    for name in ("pref", str(tmp_path / "pref.json")):
        [spec] = resolve_datasets(name, str(tmp_path))
        assert spec.ranking
        [example] = load_examples([spec], "pairwise")
        assert example.messages == [user("Pick\nx")]
        assert (example.chosen, example.rejected) == ("good", "bad")


def test_pairwise_sharegpt_dict_and_string_replies(tmp_path: Path) -> None:
    rows = [
        {
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}, {"from": "human", "value": "joke?"}],
            "chosen": {"from": "gpt", "value": "funny"},
            "rejected": "dull",
        }
    ]
    write_jsonl(tmp_path / "p.jsonl", rows)
    write_dataset_info(tmp_path, {"p": {"file_name": "p.jsonl", "formatting": "sharegpt", "ranking": True}})
    [example] = load_examples(resolve_datasets("p", str(tmp_path)), "pairwise")
    assert example.messages == [user("hi"), assistant("hey"), user("joke?")]
    assert (example.chosen, example.rejected) == ("funny", "dull")
    # Pairwise data serves as prompts too.
    [prompt] = load_examples(resolve_datasets("p", str(tmp_path)), "prompt")
    assert prompt.messages == example.messages


# -- file types -----------------------------------------------------------------------------


def test_csv_alpaca_with_json_history_cell(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output", "history"])
        writer.writeheader()
        writer.writerow({"instruction": "Add, please", "input": "1,2", "output": "3", "history": '[["a", "b"]]'})
        writer.writerow({"instruction": "Multi\nline", "input": "", "output": "ok", "history": ""})
    examples = load_examples(resolve_datasets(str(path), str(tmp_path)), "sft")
    assert examples[0].messages == [user("a"), assistant("b"), user("Add, please\n1,2"), assistant("3")]
    assert examples[1].messages == [user("Multi\nline"), assistant("ok")]
    assert examples[1].source == f"{path} row 2"


def test_parquet_sharegpt(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(
        [
            {"conversations": [{"from": "human", "value": "p1"}, {"from": "gpt", "value": "r1"}]},
            {"conversations": [{"from": "human", "value": "p2"}, {"from": "gpt", "value": "r2"}]},
        ]
    )
    pq.write_table(table, path)
    examples = load_examples(resolve_datasets(str(path), str(tmp_path)), "sft")
    assert [e.messages for e in examples] == [[user("p1"), assistant("r1")], [user("p2"), assistant("r2")]]
    assert examples[1].source == f"{path} row 2"


def test_parquet_alpaca_pairwise(tmp_path: Path) -> None:
    path = tmp_path / "pref.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "q", "chosen": "c", "rejected": "r"}]), path)
    [example] = load_examples(resolve_datasets(str(path), str(tmp_path)), "pairwise")
    assert (example.messages, example.chosen, example.rejected) == ([user("q")], "c", "r")


def test_json_extension_holding_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    examples = load_examples(resolve_datasets(str(path), str(tmp_path)), "sft")
    assert [e.source for e in examples] == [f"{path} line 1", f"{path} line 2"]


def test_folder_of_files(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"instruction": "1", "output": "x"}])
    write_json(folder / "b.json", [{"instruction": "2", "output": "y"}])
    (folder / "README.md").write_text("ignored")
    write_dataset_info(tmp_path, {"parts": {"file_name": "parts"}})
    examples = load_examples(resolve_datasets("parts", str(tmp_path)), "sft")
    assert [e.messages[0]["content"] for e in examples] == ["1", "2"]


# -- name resolution ------------------------------------------------------------------------


def test_comma_separated_names_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"instruction": "a", "output": "1"}])
    write_jsonl(data / "b.jsonl", [{"instruction": "b", "output": "2"}])
    write_jsonl(tmp_path / "c.jsonl", [{"instruction": "c", "output": "3"}])
    write_dataset_info(data, {"a": {"file_name": "a.jsonl"}})
    monkeypatch.chdir(tmp_path)
    # a: dataset_info key; b.jsonl: relative to dataset_dir; c.jsonl: relative to cwd.
    specs = resolve_datasets(" a, b.jsonl ,c.jsonl", "data")
    assert [s.path for s in specs] == [Path("data/a.jsonl"), Path("data/b.jsonl"), Path("c.jsonl")]
    assert [e.messages[0]["content"] for e in load_examples(specs, "sft")] == ["a", "b", "c"]


def test_direct_path_without_dataset_info(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": "b"}])
    [spec] = resolve_datasets(str(path), str(tmp_path / "nowhere"))
    assert spec.formatting == "alpaca" and spec.columns["prompt"] == "instruction"


def test_max_samples_and_num_samples_per_dataset(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(5)])
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "x"} for i in range(5)])
    write_dataset_info(tmp_path, {"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.jsonl", "num_samples": 1}})
    specs = resolve_datasets("a,b", str(tmp_path))
    assert [e.messages[0]["content"] for e in load_examples(specs, "sft", max_samples=2)] == ["a0", "a1", "b0"]
    assert len(load_examples(specs, "sft")) == 6


def test_hub_entry_with_local_file_uses_the_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "local.jsonl", [{"instruction": "a", "output": "b"}])
    write_dataset_info(tmp_path, {"h": {"hf_hub_url": "org/data", "file_name": "local.jsonl"}})
    assert len(load_examples(resolve_datasets("h", str(tmp_path)), "sft")) == 1


def test_stage_mismatch_errors(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "pref.jsonl", [{"instruction": "q", "chosen": "c", "rejected": "r"}])
    write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(RlhfkitError, match="pairwise") as err:
        load_examples(resolve_datasets(str(tmp_path / "pref.jsonl"), str(tmp_path)), "sft")
    assert "\n" not in str(err.value)
    with pytest.raises(RlhfkitError, match="not pairwise") as err:
        load_examples(resolve_datasets(str(tmp_path / "sft.jsonl"), str(tmp_path)), "pairwise")
    assert "\n" not in str(err.value)


def test_csv_sharegpt_pairwise_with_json_cells(tmp_path: Path) -> None:
    path = tmp_path / "pref.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["conversations", "chosen", "rejected"])
        writer.writerow([json.dumps([{"from": "human", "value": "give json"}]), json.dumps({"from": "gpt", "value": "ok"}), '{"a": 1}'])
    [example] = load_examples(resolve_datasets(str(path), str(tmp_path)), "pairwise")
    assert example.messages == [user("give json")]
    # A serialised turn is unpacked; JSON that is not a turn is the reply text itself.
    assert (example.chosen, example.rejected) == ("ok", '{"a": 1}')


def test_alpaca_empty_instruction_uses_input(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "", "input": "just input", "output": "o"}])
    [example] = load_examples(resolve_datasets(str(path), str(tmp_path)), "sft")
    assert example.messages[0] == user("just input")
