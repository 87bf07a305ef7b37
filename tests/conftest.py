"""Shared fixtures and stand-ins: a tiny character-level Llama built once per session, data and config
writers, a one-process accelerator, random adapters and heads, and the float tolerances.

Choosing a tolerance
--------------------
A tolerance is derived from the arithmetic, so the comparison passes on any CPU or GPU and still
fails on a real error:

1. Exact numbers compare exactly. Small integers, binary fractions (0.25, 1.5) and their sums and
   products are exact in float32, so ``torch.equal`` / ``atol=0`` (or a hand value computed the
   same way, e.g. ``1 / sqrt(1 + 1e-8)``, not rounded to ``1``).
2. Two computations of the same algebra in another order (padding, chunking, batching, gradient
   accumulation, another kernel) run in float64 wherever the code path takes float64 (raw
   transformers / peft models and rlhfkit's functions on them: ``model.double()``), and compare with
   `float64_tolerance`. Results rlhfkit returns as float32 by design (log-probs, entropies, rollout
   tensors) are then rounded once to float32 and compare with `float32_tolerance` of that rounding.
3. Where float32 is the only path (a stage run, `build_ppo_models`, a merged export), the
   tolerance is `float32_tolerance(magnitude, terms)`::

       atol = safety * eps32 * sqrt(terms) * magnitude,   eps32 = 2**-23 ~= 1.19e-7, safety = 4

   ``terms`` is the length of the longest sum that produced the compared values (a network's widest
   layer, e.g. the MLP's intermediate size; the vocabulary for a softmax) and ``magnitude`` the size of
   what was summed, taken from the actual tensors: ``sum_i |w_i h_i|`` for a dot product ``w . h``
   (rounding is relative to the summands, not to a result that cancels), ``max |z|`` of the logits
   for a log-softmax (`log_softmax_tolerance`), the largest gradient of the pass for gradients
   (`gradient_tolerances`). Rounding errors of n terms add like a random walk, so ``sqrt(terms)``; the
   safety factor 4 covers both sides of the comparison rounding independently and the tail.
   An upstream network's rounding reaches a value through its last sum (the head's, over the
   hidden size), each summand carrying a relative error of a few eps32 from the layers beneath:
   the same formula, with the widest layer's length, covers it.
   Helpers for the common cases: `log_softmax_tolerance` (log-probs, entropies), `gradient_tolerances`,
   `statistic_tolerances`, `adamw_weight_tolerance` (weights after optimizer steps),
   `untrained_kl_tolerance` (a policy against itself as reference).
4. Every tolerance is checked against the effect the test guards against: next to it the test
   asserts (or its docstring shows) that the real difference (an adapter switched on, another
   temperature, padding attended to) is many times larger.
5. Statistical checks (sampling frequencies, bootstrap intervals) allow a few standard errors,
   derived in a comment.
6. Comparisons between runs, or with computations on the CPU, pin the run to the CPU (`cpu_config`,
   `write_cpu_config`, ``device: cpu``): another device's kernels round differently, and some of
   them (atomic adds) differently each time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.models.tiny import build_tiny_model

torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves

EPS32 = torch.finfo(torch.float32).eps  # 2**-23
EPS64 = torch.finfo(torch.float64).eps  # 2**-52
SAFETY = 4.0

CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SRC = str(Path(__file__).resolve().parents[1] / "src")  # PYTHONPATH of the processes tests start

# The tiny model of `tiny_model_dir` (build_tiny_model's defaults and its character tokenizer).
TINY_VOCAB = 100  # the length of each log-softmax's sum
TINY_HIDDEN = 64
TINY_WIDEST = 128  # the MLP's intermediate size: the longest sum within a layer
PAD_ID, EOS_ID = 0, 2  # <|endoftext|>, <|im_end|>


# --------------------------------------------------------------------------------- tolerances


def _largest(magnitude) -> float:
    if torch.is_tensor(magnitude):
        return float(magnitude.detach().abs().max())
    return abs(float(magnitude))


def float32_tolerance(magnitude, terms: int = 1, safety: float = SAFETY) -> float:
    """Absolute tolerance between two float32 computations of the same values (rule 3 above).

    `magnitude`: the size of what was summed (a number, or a tensor whose largest |entry| is used);
    `terms`: the length of the longest sum. Returns ``safety * eps32 * sqrt(terms) * magnitude``.
    """
    return safety * EPS32 * math.sqrt(terms) * _largest(magnitude)


def float64_tolerance(magnitude, terms: int = 1, safety: float = SAFETY) -> float:
    """`float32_tolerance` for two float64 computations: ``safety * eps64 * sqrt(terms) * magnitude``."""
    return safety * EPS64 * math.sqrt(terms) * _largest(magnitude)


def log_softmax_tolerance(logits, vocab: int | None = None, temperature: float = 1.0) -> float:
    """`float32_tolerance` of a float32 log-softmax over `vocab` entries (rlhfkit's log-probs, entropies).

    `logits`: the logits (a tensor, the last dimension the vocabulary) or their largest |entry|. The
    summands' size is the larger of ``max |z / temperature|`` (the shifted logits) and ``log vocab``
    (the log of the sum of exponentials).
    """
    vocab = vocab if vocab is not None else logits.shape[-1]
    return float32_tolerance(max(_largest(logits) / temperature, math.log(vocab)), vocab)


@torch.no_grad()
def logit_bound(model) -> float:
    """A bound on every |logit| of a Llama-style `model`, from its weights alone: the final RMSNorm's
    output h has ||h|| <= max |norm weight| * sqrt(hidden), so |h . e_k| <= that times max_k ||e_k||."""
    norm = model.get_decoder().norm.weight
    head = model.get_output_embeddings().weight  # (v, H)
    return float(norm.abs().max()) * math.sqrt(head.shape[-1]) * float(head.norm(dim=-1).max())


def untrained_kl_tolerance(model_dir, max_new_tokens: int) -> float:
    """The KL a PPO run logs while its policy still is its reference (before the first update): each
    response token's log-prob comes from the sampling pass (KV cache, lean LoRA) and from the
    reference pass, two float32 log-softmaxes of the same logits; a response sums up to
    `max_new_tokens` of them. (LoRA adapters leave the final norm and the LM head alone.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    vocab = model.get_output_embeddings().weight.shape[0]
    return max_new_tokens * log_softmax_tolerance(logit_bound(model), vocab)


def gradient_tolerances(grads, terms: int, tolerance=float32_tolerance) -> tuple[float, float]:
    """(rtol, atol) between two computations of the same gradients, `grads` (tensors, or a dict of them).

    A gradient element is a sum of products over the batch's positions, each carried back through
    layers that sum up to the widest layer's size: `terms` = positions x widest layer. It is rounded
    relative to its own size (rtol) and, where it cancels to near zero, relative to the largest
    gradient of the pass, whose magnitudes it was summed from (atol). `tolerance`: `float32_tolerance`
    or `float64_tolerance`, by the arithmetic's precision.
    """
    tensors = grads.values() if isinstance(grads, dict) else grads
    largest = max(float(g.detach().abs().max()) for g in tensors)
    return tolerance(1.0, terms), tolerance(largest, terms)


def statistic_tolerances(stats: dict[str, float], terms: int) -> tuple[float, float]:
    """(rel, abs) for logged statistics of two computations of one training step (float32 sums over
    `terms`): each relative to its own size and, where terms cancel (a loss made of several parts),
    relative to the largest statistic."""
    return float32_tolerance(1.0, terms), float32_tolerance(max(abs(v) for v in stats.values()), terms)


# AdamW epsilon for tests that compare weights after training steps (see `adamw_weight_tolerance`).
COMPARABLE_ADAM_EPSILON = 0.1


def adamw_weight_tolerance(learning_rate: float, steps: int, terms: int, adam_epsilon: float = COMPARABLE_ADAM_EPSILON,
                           max_gradient: float = 1.0) -> float:
    """Absolute tolerance between weights after `steps` AdamW steps whose gradients differ by float32
    rounding (another batching, another process count).

    Clipping (max_grad_norm, `max_gradient`) keeps every gradient element below `max_gradient`, so the
    gradients' rounding over `terms` summands (positions x widest layer) is at most
    ``float32_tolerance(max_gradient, terms)``. AdamW's step ``m / (sqrt(v) + adam_epsilon)`` changes by
    at most about ``2 / adam_epsilon`` times a change of the gradients (its slope is steepest at a zero
    gradient), and each step is scaled by the learning rate::

        atol = steps * learning_rate * (2 / adam_epsilon) * float32_tolerance(max_gradient, terms)

    With the default adam_epsilon (1e-8) that exceeds a whole step: a gradient that cancels to ~0 turns
    its rounding into a step of either sign. Tests that compare weights therefore train with
    `COMPARABLE_ADAM_EPSILON` (0.1, the gradients' own size), where a step still moves a weight by up to
    the learning rate and the bound stays below a percent of that (4.5e-6 for 3 steps of lr 1e-3 over
    4 sequences of 48 tokens, 128 wide).
    """
    return steps * learning_rate * (2.0 / adam_epsilon) * float32_tolerance(max_gradient, terms)


# ------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with a character vocabulary (about 0.1M parameters)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def tiny_llama(vocab_size: int, seed: int, tied: bool = True):
    """A 1-layer Llama (hidden 16) built in memory on the CPU, for kernel-level tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(config).to(CPU)


def random_lora(model, seed: int, targets=("q_proj", "v_proj", "up_proj"), std: float = 0.3):
    """`model` with a rank-4 LoRA adapter whose B is drawn from N(0, std), so it is not the identity."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)
    return peft


def random_value_head(hidden: int, seed: int, std: float, bias: float):
    """A value head with weights from N(0, std) and a constant bias."""
    from rlhfkit.models.value_head import ValueHead

    torch.manual_seed(seed)
    head = ValueHead(hidden, zero_init=False)
    with torch.no_grad():
        head.summary.weight.normal_(std=std)
        head.summary.bias.fill_(bias)
    return head


# ------------------------------------------------------------------ sequences and raw models


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """The chat prompt of one user message, rendered by the tokenizer's own chat template."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The reply by definition: the tokenizer's chat template, transformers' greedy `generate`, cut at
    EOS, special tokens not decoded."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def pad_prompts_and_responses(prompts: list[list[int]], responses: list[list[int]], pad: int = 0):
    """Left-padded prompts and right-padded responses, as the rollout builds them.

    Returns query ``(b, P)``, query_mask ``(b, P)``, response ``(b, R)``, response_mask ``(b, R)``
    bool, and their concatenations ids ``(b, P + R)`` and mask ``(b, P + R)``.
    """
    width_p, width_r = max(map(len, prompts)), max(map(len, responses))
    query = torch.full((len(prompts), width_p), pad)
    query_mask = torch.zeros_like(query)
    response = torch.full((len(responses), width_r), pad)
    response_mask = torch.zeros_like(response, dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        query[row, width_p - len(p):] = torch.tensor(p)
        query_mask[row, width_p - len(p):] = 1
        response[row, :len(r)] = torch.tensor(r)
        response_mask[row, :len(r)] = True
    ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask.long()], dim=1)
    return query, query_mask, response, response_mask, ids, mask


class RawStats(NamedTuple):
    """What `raw_response_stats` computes for one response, all float64 ``(n,)``, and the magnitudes
    its tolerances are derived from."""

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor
    logit_scale: float
    """Largest |logit / temperature| at the response's positions (a log-softmax's summands)."""
    value_scale: float
    """Largest ``sum_i |w_i h_i| + |b|`` over the response's positions (the value head's summands)."""


@torch.no_grad()
def raw_response_stats(model, head, prompt: list[int], response: list[int], temperature: float) -> RawStats:
    """Log-probs, values and entropies of one unpadded prompt + response, by definition from a plain
    forward pass of the raw model (`log_softmax` of its logits, the head's linear map of its last
    hidden states), in float64. `head` None: no values."""
    ids = torch.tensor([prompt + response])
    out = model(input_ids=ids, output_hidden_states=head is not None, use_cache=False)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    logits = out.logits[0, positions].double() / temperature  # (n, v)
    logp = F.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    values, value_scale = None, 0.0
    if head is not None:
        hidden = out.hidden_states[-1][0, positions].double()  # (n, h)
        weight, bias = head.summary.weight[0].double(), head.summary.bias[0].double()
        values = hidden @ weight + bias
        value_scale = float(((hidden * weight).abs().sum(-1) + bias.abs()).max())
    return RawStats(logprobs, values, entropy, float(logits.abs().max()), value_scale)


@torch.no_grad()
def raw_scores(model, head, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head on the last hidden state of each unpadded sequence, from the raw model, in float64;
    and each score's summand magnitude ``sum_i |w_i h_i| + |b|`` (for `float32_tolerance`)."""
    weight, bias = head.summary.weight[0].double(), head.summary.bias[0].double()
    scores, magnitudes = [], []
    for sequence in sequences:
        out = model(input_ids=torch.tensor([sequence]), output_hidden_states=True, use_cache=False)
        last = out.hidden_states[-1][0, -1].double()  # (h,)
        scores.append(float(last @ weight + bias))
        magnitudes.append(float((last * weight).abs().sum() + bias.abs()))
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(magnitudes, dtype=torch.float64)


# -------------------------------------------------------------------------- one-process runs


class OneProcessAccelerator:
    """The parts of accelerate.Accelerator the PPO steps use, on one process on the CPU."""

    device = CPU
    distributed_type = None

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def unwrap_model(self, model):
        return model

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def requires(*packages: str):
    """Skip the test where a package of the ``test`` extra is missing: CI installs ``.[test]``, so it runs
    there; an image without the extras (the GPU machine's) runs the rest of the suite."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (pip install -e .[test])")


# What `cpu_config` and `write_cpu_config` set unless the test's values say otherwise: the CPU (see
# `cpu_config`), and no gradient checkpointing (on by default, as in LLaMA-Factory), whose recomputed
# forward passes only cost the tiny models' runs time; tests/test_llamafactory_keys.py runs the default.
CPU_TEST_KEYS = {"device": "cpu", "gradient_checkpointing": False}


def cpu_config(values: dict, check: bool = True):
    """`build_config(values)` with the run pinned to the CPU (``device: cpu``) unless `values` names a
    device: tests compare runs with each other and with CPU computations, which another device's
    kernels (and their non-deterministic reductions) would change. Gradient checkpointing is off
    unless `values` sets it (`CPU_TEST_KEYS`)."""
    from rlhfkit.config import build_config

    return build_config({**CPU_TEST_KEYS, **values}, check=check)


# --------------------------------------------------------------------------------- files


@contextlib.contextmanager
def saved_for_backward():
    """Inside, the bytes autograd saves for backward add up in the yielded one-element list."""
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def write_jsonl(path: Path, rows: list) -> Path:
    """Write `rows` as JSON lines (UTF-8), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl():
    return write_jsonl


def write_dataset_info(folder: Path, info: dict) -> Path:
    """`folder`/dataset_info.json holding `info` (dataset name -> entry)."""
    path = folder / "dataset_info.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info), encoding="utf-8")
    return path


def user(text: str) -> dict[str, str]:
    """A user message."""
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    """An assistant message."""
    return {"role": "assistant", "content": text}


def write_config(path: Path, values: dict) -> Path:
    """A YAML config with one ``key: value`` line per item (values written as JSON, which YAML reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    return path


def write_cpu_config(path: Path, values: dict) -> Path:
    """`write_config` with the run pinned to the CPU and no gradient checkpointing (see `cpu_config`)."""
    return write_config(path, {**CPU_TEST_KEYS, **values})


# Reward functions for `reward_model_type: function`, as `<file>:<name>`.
REWARD_FUNCTIONS = """
def letters(prompts, responses):
    \"\"\"Share of the letters a-m in each response (0 for an empty one).\"\"\"
    return [sum(c in 'abcdefghijklm' for c in r) / max(len(r), 1) for r in responses]

def length(prompts, responses):
    return [float(len(r)) for r in responses]

def prompt_number(prompts, responses):
    \"\"\"The number that ends each prompt ("rate 3" -> 3.0).\"\"\"
    return [float(p.split()[-1]) for p in prompts]
"""


@pytest.fixture(scope="session")
def reward_functions(tmp_path_factory) -> Path:
    """A module of reward functions (`REWARD_FUNCTIONS`): use ``f"{reward_functions}:letters"``."""
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(REWARD_FUNCTIONS)
    return path


def one_error_line(err: str) -> str:
    """The single `error:` line of a command that stopped with a message and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def hold_output_lock(folder: Path) -> subprocess.Popen:
    """Another process (without torch: cheap to start) holding the run lock of `folder` until its stdin
    closes; `holder.communicate("")` releases it, SIGKILL leaves a stale lock file."""
    code = ("import sys; from rlhfkit.run_lock import OutputLock; lock = OutputLock(sys.argv[1]); lock.acquire(); "
            "print('locked', flush=True); sys.stdin.read(); lock.release()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=SRC))
    assert holder.stdout.readline().strip() == "locked"
    return holder


@contextlib.contextmanager
def pseudo_terminal(command: list[str], interactive: bool = True):
    """Run `command` with its output (and, if `interactive`, its input) on a new pseudo-terminal.

    Yields ``(process, fd)``, `fd` the terminal's other end; afterwards a process still running is
    killed and the terminal closed.
    """
    main_fd, child_fd = os.openpty()
    process = subprocess.Popen(command, stdin=child_fd if interactive else subprocess.DEVNULL, stdout=child_fd,
                               stderr=child_fd, close_fds=True)
    os.close(child_fd)
    try:
        yield process, main_fd
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main_fd)


def read_terminal(fd: int, marker: str | None = None, count: int = 1, process=None, timeout: float = 120.0) -> str:
    """Read a pseudo-terminal until `marker` has appeared `count` times in what was read; with `marker`
    None, until the terminal closes or `process` has ended and nothing is left to read."""
    data = b""
    deadline = time.time() + timeout
    while marker is None or data.decode(errors="replace").count(marker) < count:
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {marker!r}; got {data.decode(errors='replace')!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        elif marker is None and process is not None and process.poll() is not None:
            break
    return data.decode(errors="replace")


def read_events(log_dir: Path):
    """TensorBoard's own reader over the event files in `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator
