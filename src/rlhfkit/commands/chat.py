"""`rlhfkit chat MODEL [--adapter DIR]` or `rlhfkit chat CONFIG.yaml`: an interactive terminal chat
using the chat template.

CONFIG.yaml is LLaMA-Factory's inference config: `model_name_or_path`, `adapter_name_or_path`,
`template`, `infer_backend: huggingface` (another backend is refused), `trust_remote_code`, the
generation keys (`do_sample`, `temperature`, `top_p`, `top_k`, `max_new_tokens`,
`repetition_penalty`), `default_system` and `enable_thinking`, and every model key a training
config has (`infer_dtype`, `quantization_bit`, `rope_scaling`, `flash_attn`, the hub keys, ...);
options given on the command line win over it.

Each user message is appended to the conversation, the whole conversation is encoded with the
template (the tokenizer's own unless `--template`), and the reply streams to the terminal as it
is generated, up to the template's first stop token. `/reset` clears the conversation, `/exit`
(or Ctrl-D) leaves. When the conversation outgrows the model's context, the oldest exchanges
are dropped.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from rlhfkit.commands.inference import inference_device, load_for_inference
from rlhfkit.config import ModelArguments, build_config, read_yaml
from rlhfkit.config.validation import check_infer_backend
from rlhfkit.data import get_template
from rlhfkit.errors import fail
from rlhfkit.models.adapters import split_paths
from rlhfkit.rl import truncate_after_stop

PROMPT = "User: "
REPLY = "Assistant: "
BANNER = "Chatting with {model}. /reset clears the conversation, /exit (or Ctrl-D) leaves."


class TextPrinter(BaseStreamer):
    """A `generate` streamer that writes each new piece of decoded text as soon as it is complete.

    `generate` first puts the prompt (skipped here), then each new token ``(1,)``. Decoding the
    whole reply each time keeps multi-token characters intact: text ending in an incomplete
    UTF-8 sequence is held back until the sequence completes.
    """

    def __init__(self, tokenizer, write: Callable[[str], object]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)


class ChatSession:
    """A conversation with one model: history, template encoding and streamed replies."""

    def __init__(self, model, tokenizer, template, generation: GenerationConfig, system: str | None = None) -> None:
        self.model, self.tokenizer, self.template, self.system = model, tokenizer, template, system
        self.generation = generation
        self.stop_token_ids = sorted(set(template.stop_token_ids(tokenizer)))
        self.history: list[dict[str, str]] = []
        self.context = getattr(model.config.get_text_config(), "max_position_embeddings", None)

    def prompt_ids(self, user_text: str) -> tuple[list[int], int]:
        """Token ids of the conversation plus `user_text` and the generation prompt; exchanges dropped to fit."""
        history = list(self.history)
        while True:
            ids = self.template.encode_prompt(self.tokenizer, history + [{"role": "user", "content": user_text}],
                                              self.system)
            fits = self.context is None or len(ids) + self.generation.max_new_tokens <= self.context
            if fits or not history:
                return ids, (len(self.history) - len(history)) // 2
            history = history[2:]

    def reset(self) -> None:
        """Forget the conversation."""
        self.history = []

    @torch.no_grad()
    def reply(self, user_text: str, write: Callable[[str], object]) -> str:
        """Generate the reply to `user_text`, streaming it through `write`; remember the exchange."""
        ids, dropped = self.prompt_ids(user_text)
        if dropped:
            self.history = self.history[2 * dropped:]
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)  # (1, P)
        streamer = TextPrinter(self.tokenizer, write)
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     generation_config=self.generation, streamer=streamer)
        response_ids, response_mask, _ = truncate_after_stop(output[:, input_ids.shape[1]:], self.stop_token_ids,
                                                             self.tokenizer.pad_token_id)  # (1, R)
        text = self.tokenizer.decode(response_ids[0][response_mask[0]], skip_special_tokens=True)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text


def generation_config(tokenizer, stop_token_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                      top_k: int, repetition_penalty: float, greedy: bool) -> GenerationConfig:
    """Sampling (or greedy) settings for chat replies."""
    if max_new_tokens <= 0:
        raise fail(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    common = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                  eos_token_id=sorted(set(stop_token_ids)), pad_token_id=tokenizer.pad_token_id)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    if temperature <= 0:
        raise fail(f"--temperature must be > 0 (use --greedy for greedy decoding), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise fail(f"--top-p must be in (0, 1], got {top_p}")
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, **common)


def chat_loop(session: ChatSession, read: Callable[[str], str] = input,
              write: Callable[[str], object] | None = None) -> int:
    """Read user lines until /exit or end of input; print each reply as it streams. Returns the turns."""
    if write is None:
        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
    turns = 0
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            write("\n")
            return turns
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return turns
        if command == "/reset":
            session.reset()
            write("(conversation cleared)\n")
            continue
        write(REPLY)
        session.reply(line, write)
        write("\n")
        turns += 1


# Settings of other inference engines, which LLaMA-Factory's inference configs may carry.
OTHER_BACKEND_PREFIXES = ("vllm_", "sglang_", "kt_")


def is_config_file(target: str) -> bool:
    """Whether `rlhfkit chat TARGET` names a YAML config rather than a model."""
    return Path(target).suffix.lower() in (".yaml", ".yml") or Path(target).is_file()


def settings_from_config(path: str) -> dict[str, Any]:
    """`run_chat`'s arguments from an inference config in LLaMA-Factory's format."""
    values = read_yaml(path)
    check_infer_backend(path, str(values.get("infer_backend", "huggingface")))
    values = {k: v for k, v in values.items() if not str(k).startswith(OTHER_BACKEND_PREFIXES)}
    config = build_config(values, source=path, check=False)
    m, g = config.model, config.generation
    if not m.model_name_or_path:
        raise fail(f"{path}: model_name_or_path is required; set it to the model folder to chat with")
    return dict(model_path=m.model_name_or_path, adapter=m.adapter_name_or_path, template=config.data.template,
                system=config.data.default_system, enable_thinking=config.data.enable_thinking,
                max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                repetition_penalty=g.repetition_penalty, greedy=not g.do_sample, seed=config.training.seed,
                device=m.device, trust_remote_code=m.trust_remote_code, model_args=m)


def chat_settings(target: str, given: dict[str, Any]) -> dict[str, Any]:
    """`run_chat`'s arguments for `rlhfkit chat TARGET`: a model folder or a config, then the options `given`."""
    settings = settings_from_config(target) if is_config_file(target) else {"model_path": target}
    return {**settings, **given}


def run_chat(model_path: str, adapter: str | None = None, template: str | None = None, system: str | None = None,
             max_new_tokens: int = 512, temperature: float = 0.95, top_p: float = 0.7, top_k: int = 50,
             repetition_penalty: float = 1.0, greedy: bool = False, seed: int = 42, device: str = "auto",
             trust_remote_code: bool = False, enable_thinking: bool | None = True,
             model_args: ModelArguments | None = None) -> int:
    """Load the model (adapters merged) and chat on stdin/stdout. `model_args`: an inference config's
    model keys (quantization, dtype, hub, ...), with `model_path`, `adapter` and `trust_remote_code` winning."""
    model_args = dataclasses.replace(model_args or ModelArguments(), model_name_or_path=model_path,
                                     adapter_name_or_path=adapter, trust_remote_code=trust_remote_code)
    adapters = split_paths(adapter)
    model, tokenizer = load_for_inference(model_args, adapters, inference_device(device))
    chat_template = get_template(template, tokenizer, enable_thinking=enable_thinking)
    config = generation_config(tokenizer, chat_template.stop_token_ids(tokenizer), max_new_tokens, temperature,
                               top_p, top_k, repetition_penalty, greedy)
    torch.manual_seed(seed)
    name = model_path + (f" + {', '.join(adapters)}" if adapters else "")
    print(BANNER.format(model=name), flush=True)
    chat_loop(ChatSession(model, tokenizer, chat_template, config, system))
    return 0
