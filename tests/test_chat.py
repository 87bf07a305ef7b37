"""`rlhfkit chat`: two turns through a pseudo-terminal, the conversation fed back through the template,
streaming, /reset and /exit, and the context limit."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import greedy_reply, pseudo_terminal, read_terminal
from rlhfkit.commands.chat import ChatSession, TextPrinter, chat_loop, generation_config
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
