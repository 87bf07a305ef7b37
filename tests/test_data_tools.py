"""Data never silently mis-trained: tool-call data (LLaMA-Factory's glaive_toolcall layout) trains
through the tokenizer's own chat template or is refused, and image, video and audio data is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assistant, cpu_config, user, write_dataset_info, write_jsonl
from rlhfkit.data import get_template, load_examples, resolve_datasets, tokenize_sft
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.tiny import build_char_tokenizer
from rlhfkit.stages.common import load_stage_data

IGNORE = -100
# A chat template that supports tools the way Qwen2.5's does: the definitions in the system turn,
# calls in <tool_call> markup inside the assistant turn, results in a user turn.
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- 'Tools:' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- for call in message.tool_calls %}{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", "
    "\"arguments\": ' + (call.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
TURNS = [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": '{"sky": "sunny"}'},
    {"from": "gpt", "value": "It is sunny."},
]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


def _glaive(folder: Path, rows: list[dict] | None = None) -> Path:
    """A dataset_info.json entry as LLaMA-Factory's glaive_toolcall_en_demo has it (tools as JSON text)."""
    rows = rows if rows is not None else [{"conversations": TURNS, "tools": json.dumps(TOOLS)}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "glaive.json").write_text(json.dumps(rows), encoding="utf-8")
    write_dataset_info(folder, {"glaive": {"file_name": "glaive.json", "formatting": "sharegpt",
                                           "columns": {"messages": "conversations", "tools": "tools"}}})
    return folder


@pytest.fixture()
def tool_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def _one_line_error(call) -> str:
    with pytest.raises(RlhfkitError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# -- tool-call data -------------------------------------------------------------------------


def test_tool_turns_and_tools_column_become_the_tool_format(tmp_path: Path) -> None:
    [example] = load_examples(resolve_datasets("glaive", str(_glaive(tmp_path))), "sft")
    assert example.messages == [user("Weather in Paris?"), CALL, {"role": "tool", "content": '{"sky": "sunny"}'},
                                assistant("It is sunny.")]
    assert example.tools == [{"type": "function", "function": TOOLS[0]}]


def test_tool_data_trains_through_the_tokenizers_template(tmp_path: Path, tool_tokenizer) -> None:
    """The ids are the template's own rendering with tools=...; the call and the final reply (each up to
    its <|im_end|>) are trained, the tool definitions, the prompt and the tool's result are not."""
    [example] = load_examples(resolve_datasets("glaive", str(_glaive(tmp_path))), "sft")
    [sample], stats = tokenize_sft([example], tool_tokenizer, get_template("auto", tool_tokenizer), cutoff_len=2048)
    text = tool_tokenizer.apply_chat_template(example.messages, tools=example.tools, tokenize=False)
    text = text[:text.rindex("<|im_end|>") + len("<|im_end|>")]  # nothing after the last reply's end is trained
    assert tool_tokenizer.decode(sample["input_ids"]) == text
    assert '"description": "Weather of a city"' in text  # the tools reached the model's input
    trained = "".join(tool_tokenizer.decode([t]) if label != IGNORE else "\0"
                      for t, label in zip(sample["input_ids"], sample["labels"]))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert [part for part in trained.split("\0") if part] == [call, "It is sunny.<|im_end|>"]
    assert stats.kept == 1


def test_tool_data_through_the_sft_stage_data_path(tmp_path: Path, tool_tokenizer) -> None:
    config = cpu_config(dict(stage="sft", model_name_or_path="unused", dataset="glaive",
                             dataset_dir=str(_glaive(tmp_path)), output_dir=str(tmp_path / "out")))
    data = load_stage_data(config, tool_tokenizer)
    assert len(data.train) == 1 and IGNORE in data.train[0]["labels"]


def test_named_template_refuses_tool_data(tmp_path: Path, tool_tokenizer) -> None:
    config = cpu_config(dict(stage="sft", model_name_or_path="unused", dataset="glaive", template="chatml",
                             dataset_dir=str(_glaive(tmp_path)), output_dir=str(tmp_path / "out")))
    message = _one_line_error(lambda: load_stage_data(config, tool_tokenizer))
    assert "glaive.json" in message and "template 'chatml'" in message and "template: auto" in message


def test_template_without_tool_support_refuses_tool_data(tmp_path: Path) -> None:
    [example] = load_examples(resolve_datasets("glaive", str(_glaive(tmp_path))), "sft")
    tokenizer = build_char_tokenizer()  # plain ChatML: it ignores tools
    message = _one_line_error(lambda: tokenize_sft([example], tokenizer, get_template("auto", tokenizer), 2048))
    assert "glaive.json" in message and "ignores the tools list" in message


def test_tools_column_alone_makes_tool_data(tmp_path: Path, tool_tokenizer) -> None:
    """A row that offers tools but calls none still shows the model the definitions."""
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
             "tools": json.dumps(TOOLS)}, {"conversations": [{"from": "human", "value": "A"},
                                                            {"from": "gpt", "value": "B"}], "tools": ""}]
    offered, plain = load_examples(resolve_datasets("glaive", str(_glaive(tmp_path, rows))), "sft")
    assert offered.tools == [{"type": "function", "function": TOOLS[0]}] and plain.tools is None
    samples, _ = tokenize_sft([offered, plain], tool_tokenizer, get_template("auto", tool_tokenizer), 2048)
    assert "Tools:" in tool_tokenizer.decode(samples[0]["input_ids"])
    assert "Tools:" not in tool_tokenizer.decode(samples[1]["input_ids"])


@pytest.mark.parametrize("kind", ["prompt", "pairwise"])
def test_tool_data_is_refused_outside_sft(tmp_path: Path, kind) -> None:
    rows = [{"conversations": TURNS[:3], "tools": json.dumps(TOOLS), "chosen": {"from": "gpt", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}}]
    folder = _glaive(tmp_path, rows)
    if kind == "pairwise":
        write_dataset_info(folder, {"glaive": {"file_name": "glaive.json", "formatting": "sharegpt", "ranking": True,
                                               "columns": {"messages": "conversations", "tools": "tools"}}})
    message = _one_line_error(lambda: load_examples(resolve_datasets("glaive", str(folder)), kind))
    assert "glaive.json" in message and "stage sft only" in message


@pytest.mark.parametrize("value,fragment", [("get_weather(Paris)", "must hold JSON"),
                                            ('{"arguments": {}}', "must hold JSON"),
                                            ('{"name": "f", "arguments": "{bad"}', "malformed JSON")])
def test_malformed_function_call_names_the_row(tmp_path: Path, value, fragment) -> None:
    turns = [TURNS[0], {"from": "function_call", "value": value}, TURNS[2], TURNS[3]]
    folder = _glaive(tmp_path, [{"conversations": turns, "tools": json.dumps(TOOLS)}])
    message = _one_line_error(lambda: load_examples(resolve_datasets("glaive", str(folder)), "sft"))
    assert "turn 2" in message and fragment in message


# -- images, videos, audios -----------------------------------------------------------------


def test_multimodal_dataset_info_entry_is_refused(tmp_path: Path) -> None:
    """LLaMA-Factory's mllm_demo layout: OpenAI-style messages with <image> and an images column."""
    rows = [{"messages": [{"role": "user", "content": "<image>Who are they?"},
                          {"role": "assistant", "content": "Two players."}], "images": ["mllm_demo_data/1.jpg"]}]
    (tmp_path / "mllm_demo.json").write_text(json.dumps(rows), encoding="utf-8")
    write_dataset_info(tmp_path, {"mllm_demo": {
        "file_name": "mllm_demo.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}})
    message = _one_line_error(lambda: resolve_datasets("mllm_demo", str(tmp_path)))
    assert "'mllm_demo'" in message and "images" in message and "not supported" in message


@pytest.mark.parametrize("column", ["images", "videos", "audios"])
def test_media_in_a_direct_file_is_refused(tmp_path: Path, column) -> None:
    path = write_jsonl(tmp_path / "mm.jsonl", [{"instruction": "Describe <image>", "output": "x", column: ["a.bin"]}])
    message = _one_line_error(lambda: resolve_datasets(str(path), str(tmp_path)))
    assert "mm.jsonl" in message and column in message


def test_media_in_a_later_row_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mm.jsonl", [{"instruction": "a", "output": "b"},
                                               {"instruction": "c", "output": "d", "videos": ["v.mp4"]}])
    message = _one_line_error(lambda: load_examples(resolve_datasets(str(path), str(tmp_path)), "sft"))
    assert "line 2" in message and "videos" in message
