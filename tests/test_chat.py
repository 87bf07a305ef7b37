"""`rlhfkit chat`: two turns through a pseudo-terminal, the conversation fed back through the template,
streaming, /reset and /exit, the context limit, and LLaMA-Factory's inference config."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import greedy_reply, pseudo_terminal, random_lora, read_terminal
from rlhfkit.cli import main
from rlhfkit.commands.chat import ChatSession, TextPrinter, chat_loop, chat_settings, generation_config
from rlhfkit.data import get_template

MAX_NEW_TOKENS = 6


@pytest.fixture
def session(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    template = get_template(None, tokenizer)
    config = generation_config(tokenizer, template.stop_token_ids(tokenizer), MAX_NEW_TOKENS, 1.0, 1.0, 0, 1.0,
                               greedy=True)
    return ChatSession(model, tokenizer, template, config)


def test_two_turns_in_a_pseudo_terminal(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    first = greedy_reply(model, tokenizer, [{"role": "user", "content": "hello"}], MAX_NEW_TOKENS)
    second = greedy_reply(model, tokenizer, [{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": first},
                                             {"role": "user", "content": "again"}], MAX_NEW_TOKENS)
    command = [sys.executable, "-m", "rlhfkit.cli", "chat", str(tiny_model_dir), "--greedy",
               "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"]
    with pseudo_terminal(command) as (process, terminal):
        transcript = read_terminal(terminal, "User: ")
        os.write(terminal, b"hello\n")
        transcript += read_terminal(terminal, "User: ")
        os.write(terminal, b"again\n")
        transcript += read_terminal(terminal, "User: ")
        os.write(terminal, b"/exit\n")
        code = process.wait(timeout=60)
        assert code == 0
    transcript = transcript.replace("\r\n", "\n")
    assert "Chatting with" in transcript and "/reset" in transcript
    assert f"hello\nAssistant: {first}\nUser: " in transcript
    assert f"again\nAssistant: {second}\nUser: " in transcript
    assert "Traceback" not in transcript


def test_history_goes_through_the_template_and_reset_clears_it(session):
    written: list[str] = []
    first = session.reply("hi", written.append)
    assert "".join(written) == first  # what streamed is the reply
    ids, dropped = session.prompt_ids("more")
    expected = session.template.encode_prompt(session.tokenizer, [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "more"}])
    assert ids == expected and dropped == 0
    session.reset()
    assert session.prompt_ids("more")[0] == session.template.encode_prompt(
        session.tokenizer, [{"role": "user", "content": "more"}])


def test_oldest_exchanges_dropped_to_fit_the_context(session):
    session.history = [{"role": "user", "content": "a" * 40}, {"role": "assistant", "content": "b" * 40},
                       {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    alone = len(session.template.encode_prompt(session.tokenizer, [{"role": "user", "content": "x"}]))
    last_exchange = session.history[2:] + [{"role": "user", "content": "x"}]
    session.context = len(session.template.encode_prompt(session.tokenizer, last_exchange)) + MAX_NEW_TOKENS
    ids, dropped = session.prompt_ids("x")
    assert dropped == 1 and ids == session.template.encode_prompt(session.tokenizer, last_exchange)
    session.context = alone + MAX_NEW_TOKENS
    assert session.prompt_ids("x")[1] == 2
    session.reply("x", lambda text: None)
    assert len(session.history) == 2 and session.history[0]["content"] == "x"


def test_loop_commands(session):
    lines = iter(["", "hi", "/reset", "  ", "yo", "/exit", "never read"])
    written: list[str] = []
    turns = chat_loop(session, read=lambda prompt: next(lines), write=written.append)
    text = "".join(written)
    assert turns == 2 and text.count("Assistant: ") == 2 and "(conversation cleared)" in text
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["yo"]

    def end_of_input(prompt):
        raise EOFError

    turns = chat_loop(session, read=end_of_input, write=written.append)
    assert turns == 0


def test_printer_holds_back_incomplete_characters():
    class Bytes:  # decodes ids as UTF-8 bytes, like a byte-level tokenizer
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    written: list[str] = []
    printer = TextPrinter(Bytes(), written.append)
    printer.put(torch.tensor([[1, 2, 3]]))  # the prompt: not shown
    for byte in "aé!".encode():
        printer.put(torch.tensor([byte]))
    printer.end()
    assert written == ["a", "é", "!"]


# ------------------------------------------------------------- LLaMA-Factory's inference config


def _inference_config(path, model_dir, adapter_dir=None, extra: str = "") -> str:
    """LLaMA-Factory's inference example, its keys as they are (a template we have)."""
    adapter = f"adapter_name_or_path: {adapter_dir}\n" if adapter_dir else ""
    path.write_text(f"model_name_or_path: {model_dir}\n{adapter}template: chatml\n"
                    f"infer_backend: huggingface  # choices: [huggingface, vllm, sglang, ktransformers]\n"
                    f"trust_remote_code: true\n{extra}")
    return str(path)


def test_inference_config_settings_and_command_line_precedence(tiny_model_dir, tmp_path):
    config = _inference_config(tmp_path / "infer.yaml", tiny_model_dir, "saves/lora/sft",
                               "do_sample: false\ntemperature: 0.5\ntop_p: 0.9\nmax_new_tokens: 7\n"
                               "vllm_maxlen: 4096\nvllm_enforce_eager: true\n")  # settings of another backend
    settings = chat_settings(config, {"max_new_tokens": 3})
    model_args = settings.pop("model_args")
    assert settings == dict(model_path=str(tiny_model_dir), adapter="saves/lora/sft", template="chatml", system=None,
                            enable_thinking=True, max_new_tokens=3, temperature=0.5, top_p=0.9, top_k=50,
                            repetition_penalty=1.0, greedy=True, seed=42, device="auto", trust_remote_code=True)
    assert model_args.model_name_or_path == str(tiny_model_dir) and model_args.infer_dtype == "auto"
    assert chat_settings(str(tiny_model_dir), {"greedy": True}) == {"model_path": str(tiny_model_dir), "greedy": True}


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_other_inference_backends_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys, backend):
    config = tmp_path / "infer.yaml"
    _inference_config(config, tiny_model_dir, extra="vllm_gpu_util: 0.9\n")
    config.write_text(config.read_text().replace("infer_backend: huggingface", f"infer_backend: {backend}"))
    assert main(["chat", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"infer_backend: {backend} is not supported" in error and "huggingface" in error


def test_chat_from_an_inference_config_with_an_adapter(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter_dir = tmp_path / "sft"
    random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 3).save_pretrained(adapter_dir)
    config = _inference_config(tmp_path / "infer.yaml", tiny_model_dir, adapter_dir,
                               f"do_sample: false\nmax_new_tokens: {MAX_NEW_TOKENS}\ndevice: cpu\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    expected = greedy_reply(merged.merge_and_unload().eval(), tokenizer, [{"role": "user", "content": "hello"}],
                            MAX_NEW_TOKENS)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", config]) == 0
    output = capsys.readouterr().out
    assert f"Chatting with {tiny_model_dir} + {adapter_dir}" in output
    assert f"Assistant: {expected}\n" in output


def test_inference_config_model_and_template_keys_reach_the_chat(tiny_model_dir, tmp_path, monkeypatch):
    """default_system, enable_thinking and the model keys (infer_dtype here) of an inference config are
    used, not dropped: the session the chat loop gets has them."""
    config = _inference_config(tmp_path / "infer.yaml", tiny_model_dir,
                               extra="default_system: Be brief.\nenable_thinking: false\ninfer_dtype: bfloat16\n"
                                     "device: cpu\n")
    config_path = Path(config)
    config_path.write_text(config_path.read_text().replace("template: chatml", "template: qwen3"))
    sessions = []
    monkeypatch.setattr("rlhfkit.commands.chat.chat_loop", sessions.append)
    assert main(["chat", config]) == 0
    (session,) = sessions
    assert session.system == "Be brief." and session.template.enable_thinking is False
    assert next(session.model.parameters()).dtype == torch.bfloat16
    # the prompt as LLaMA-Factory's qwen3 writes it with thinking off: the system turn, and an empty thought
    prompt = session.tokenizer.decode(session.prompt_ids("hi")[0])
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_inference_config_model_keys_are_checked(tiny_model_dir, tmp_path, capsys):
    """A model key of the inference config reaches the loader: flash_attn fa2 without flash-attn is one line."""
    config = _inference_config(tmp_path / "infer.yaml", tiny_model_dir, extra="flash_attn: fa2\ndevice: cpu\n")
    assert main(["chat", config]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "flash_attn: fa2 needs the flash-attn package" in error
