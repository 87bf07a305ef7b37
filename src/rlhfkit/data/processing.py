"""Per-stage tokenisation of `Example`s with truncation to `cutoff_len`.

Truncation rule (the same idea for every stage): prompts are never cut, only replies.

* SFT: turns are kept whole from the start while they fit in `cutoff_len`. The first turn
  that does not fit keeps its whole prompt and as many of its response tokens as fit (the
  response is cut from the right, losing its terminator); it and all later turns are
  dropped if not even one response token fits. A sample is dropped (and counted in
  `TokenizeStats.dropped_too_long`) when no trained response token is left: with
  `mask_history` that means the final turn must keep at least one response token.
* Pairwise: the prompt is kept whole; each reply is cut from the right to
  `cutoff_len - prompt_length` tokens; the pair is dropped if that is less than one token.
* Prompts: a prompt longer than `cutoff_len` is dropped (`overlong="drop"`) or raises
  (`overlong="error"`).

If every example of a non-empty input is dropped, `RlhfkitError` is raised (raise
`cutoff_len`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rlhfkit.data.example import Example
from rlhfkit.data.jinja_template import check_tool_template
from rlhfkit.data.templates import Template
from rlhfkit.errors import RlhfkitError, fail

IGNORE_INDEX = -100


@dataclass
class TokenizeStats:
    """How many examples survived tokenisation and why the others did not."""

    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    cutoff_len: int | None = None

    def summary(self) -> str:
        """One line such as "98 kept (3 truncated), 2 dropped as longer than cutoff_len=512"."""
        limit = f"cutoff_len={self.cutoff_len}" if self.cutoff_len is not None else "cutoff_len"
        dropped = f"{self.dropped_too_long} dropped as longer than {limit}"
        return f"{self.kept} kept ({self.truncated} truncated), {dropped}"


@contextmanager
def _about(example: Example) -> Iterator[None]:
    """Prefix template errors with the row they came from."""
    try:
        yield
    except RlhfkitError as error:
        if example.source and not str(error).startswith(example.source):
            raise fail(f"{example.source}: {error}") from None
        raise


def _check_cutoff(cutoff_len: int) -> None:
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
        raise fail(f"cutoff_len must be a positive integer, got {cutoff_len!r}")


def _finish(stats: TokenizeStats, total: int, what: str) -> None:
    if total and not stats.kept:
        raise fail(
            f"all {total} {what} are longer than cutoff_len={stats.cutoff_len} and were dropped; "
            "raise cutoff_len or use shorter data"
        )


def tokenize_sft(
    examples: Sequence[Example],
    tokenizer: Any,
    template: Template,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """`input_ids` and `labels` (-100 where no loss is taken) for supervised fine-tuning.

    Every assistant reply is trained, or only the last one with `mask_history`; prompt
    tokens of trained turns are trained too with `train_on_prompt`. Tool-call examples
    (`Example.tools`) need the tokenizer's own template, able to render tools.
    """
    _check_cutoff(cutoff_len)
    if train_on_prompt and template.efficient_eos:
        raise fail(f"template {template.name!r} does not support train_on_prompt (LLaMA-Factory refuses it too); "
                   "set train_on_prompt: false or use another template")
    stats = TokenizeStats(cutoff_len=cutoff_len)
    samples: list[dict[str, list[int]]] = []
    with_tools = next((example for example in examples if example.tools is not None), None)
    if with_tools is not None:
        check_tool_template(template, tokenizer, with_tools.source or "dataset")
    for example in examples:
        with _about(example):
            if example.tools is None:
                turns = template.encode_turns(tokenizer, example.messages, example.system, mask_history=mask_history)
            else:
                turns = template.encode_tool_turns(tokenizer, example.messages, example.system, example.tools)
        if not turns:
            raise fail(f"{example.source or 'example'}: has no assistant reply; SFT needs one")
        input_ids: list[int] = []
        labels: list[int] = []
        trained_tokens = 0
        cut = False
        for index, (prompt, response) in enumerate(turns):
            room = cutoff_len - len(input_ids)
            if len(prompt) + len(response) > room:
                cut = True
                response = response[: max(room - len(prompt), 0)]
                if not response:
                    break
            trained = not mask_history or index == len(turns) - 1
            prompt_labels = prompt if trained and train_on_prompt else [IGNORE_INDEX] * len(prompt)
            if template.efficient_eos and prompt and index > 0 and not (mask_history and trained):
                # LLaMA-Factory: the reply before this prompt is trained to end with EOS, which the input omits.
                prompt_labels = [template.eos_id(tokenizer)] + prompt_labels[1:]
            input_ids += prompt + response
            labels += prompt_labels
            labels += response if trained else [IGNORE_INDEX] * len(response)
            trained_tokens += len(response) if trained else 0
            if cut:
                break
        if not trained_tokens:
            stats.dropped_too_long += 1
            continue
        stats.kept += 1
        stats.truncated += cut
        samples.append({"input_ids": input_ids, "labels": labels})
    _finish(stats, len(examples), "SFT examples")
    return samples, stats


def tokenize_pairwise(
    examples: Sequence[Example], tokenizer: Any, template: Template, cutoff_len: int
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """`chosen_input_ids`/`rejected_input_ids` (prompt + reply each) and `prompt_length`."""
    _check_cutoff(cutoff_len)
    stats = TokenizeStats(cutoff_len=cutoff_len)
    samples: list[dict[str, Any]] = []
    for example in examples:
        where = example.source or "example"
        if not example.is_pairwise:
            raise fail(f"{where}: has no chosen/rejected replies; reward modelling needs pairwise data")
        with _about(example):
            prompt, chosen = _prompt_and_reply(tokenizer, template, example, example.chosen)
            prompt_r, rejected = _prompt_and_reply(tokenizer, template, example, example.rejected)
        if prompt != prompt_r:
            raise fail(f"{where}: the template encodes the prompt differently for the two replies; use another template")
        room = cutoff_len - len(prompt)
        if room < 1:
            stats.dropped_too_long += 1
            continue
        stats.kept += 1
        stats.truncated += len(chosen) > room or len(rejected) > room
        samples.append(
            {
                "chosen_input_ids": prompt + chosen[:room],
                "rejected_input_ids": prompt + rejected[:room],
                "prompt_length": len(prompt),
            }
        )
    _finish(stats, len(examples), "preference pairs")
    return samples, stats


def _prompt_and_reply(
    tokenizer: Any, template: Template, example: Example, reply: str | None
) -> tuple[list[int], list[int]]:
    messages = list(example.messages) + [{"role": "assistant", "content": reply or ""}]
    return template.encode_reply(tokenizer, messages, example.system)


def tokenize_prompts(
    examples: Sequence[Example], tokenizer: Any, template: Template, cutoff_len: int, overlong: str = "drop"
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """`input_ids` of each prompt (ending with the generation prompt), plus its `messages`, `system` and
    `answer`.

    A final assistant reply, if present, is removed first and kept as `answer` (None without one):
    the reference answer that rule-checked rewards compare with. Prompts longer than `cutoff_len`
    are dropped (`overlong="drop"`) or raise `RlhfkitError` (`overlong="error"`).
    """
    _check_cutoff(cutoff_len)
    if overlong not in ("drop", "error"):
        raise fail(f"overlong must be 'drop' or 'error', got {overlong!r}")
    stats = TokenizeStats(cutoff_len=cutoff_len)
    samples: list[dict[str, Any]] = []
    for number, example in enumerate(examples, start=1):
        messages = [dict(m) for m in example.messages]
        answer = None
        if messages and messages[-1]["role"] == "assistant":
            answer = messages.pop()["content"]
        with _about(example):
            input_ids = template.encode_prompt(tokenizer, messages, example.system)
        if len(input_ids) > cutoff_len:
            if overlong == "error":
                raise fail(
                    f"{example.source or f'prompt {number}'}: prompt is {len(input_ids)} tokens, longer than "
                    f"cutoff_len={cutoff_len}; raise cutoff_len or shorten or remove the row"
                )
            stats.dropped_too_long += 1
            continue
        stats.kept += 1
        samples.append({"input_ids": input_ids, "messages": messages, "system": example.system, "answer": answer})
    _finish(stats, len(examples), "prompts")
    return samples, stats
