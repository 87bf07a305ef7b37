"""The rollout engine interface PPO calls, its default implementation, and the choice between engines.

A rollout engine turns left-padded prompts into sampled responses with the policy's current
weights. The PPO stage calls only these two methods, once each per PPO step::

    engine.sync_weights(policy, value_head)    # the unwrapped policy LM (full weights present) and its critic
    batch = engine.generate(prompt_ids, prompt_mask)   # (b, P) left-padded -> GeneratedBatch

`GeneratedBatch` holds the responses cut after their first stop token or stop word, their masks
and whether each stopped; an engine whose `records` is True also fills in the policy's log-probs,
values and entropies at sampling time (equal to the training forward up to float rounding), and
PPO's evaluate phase then skips the policy's forward pass. An engine that cannot promise that
leaves them None and the evaluate phase recomputes them.

Engines (`rollout_engine`):

* `recording` (`RecordingEngine`): the decode loop of `rollout.sampler` on the training model
  itself (`records` = `logprobs_from_rollout`), with the CPU speed-ups; the default on a CPU.
* `static` (`rollout.static.StaticCacheEngine`): static KV cache, compiled decode step, LoRA on a
  merged copy (full policies under mixed precision on a copy in its dtype); the default on CUDA.

Adding a backend (vLLM, SGLang) means one more class with these two methods: `sync_weights` pushes
the policy's weights into the server (for LoRA: merged ones, or the adapter), `generate` sends the
prompts' token ids with the same sampling settings and returns the tokens as a `GeneratedBatch`
(`rollout.generation.finish_batch` cuts them), with `records = False`; then a name in
`build_rollout_engine` and in the `rollout_engine` key's choices. The stage does not change.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import torch

from rlhfkit.accelerator.defaults import rollout_engine_for
from rlhfkit.errors import fail
from rlhfkit.rollout.generation import GeneratedBatch, HFGenerator
from rlhfkit.rollout.sampler import multinomial_draw
from rlhfkit.rollout.static import StaticCacheEngine, static_engine_unsupported

if TYPE_CHECKING:
    from rlhfkit.config import GenerationArguments
    from rlhfkit.cpu.speedups import CpuSpeedups

logger = logging.getLogger(__name__)


class RolloutEngine(Protocol):
    """What PPO asks of a rollout engine (see the module docstring)."""

    records: bool
    """Whether `generate` returns the policy's log-probs, values and entropies, exact to float rounding."""

    def sync_weights(self, policy: torch.nn.Module, value_head: torch.nn.Module | None = None) -> None:
        """Take the policy's current weights (called once per PPO step, before `generate`)."""

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> GeneratedBatch:
        """One sampled response per row of the left-padded prompts ``(b, P)``."""


class RecordingEngine:
    """The recording decode loop (`HFGenerator` with ``record``) on the training model itself."""

    def __init__(self, generator: HFGenerator, record: bool) -> None:
        self.generator, self.records = generator, record
        self.policy = self.value_head = None

    def sync_weights(self, policy, value_head=None) -> None:
        self.policy, self.value_head = policy, value_head  # decodes the training weights: nothing to copy

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> GeneratedBatch:
        if self.policy is None:
            raise RuntimeError("call sync_weights(policy) before generate")
        return self.generator.generate(self.policy, prompt_ids, prompt_mask, record=self.records,
                                       value_head=self.value_head)


def build_rollout_engine(args: "GenerationArguments", tokenizer, stop_token_ids: list[int], record: bool,
                         policy: torch.nn.Module, device: torch.device, sharded: bool,
                         speedups: "CpuSpeedups | None" = None, source: str = "<config>",
                         compute_dtype: torch.dtype | None = None) -> RolloutEngine:
    """The engine `rollout_engine` names for `device` (`auto`: static on CUDA, recording elsewhere).

    `record`: `logprobs_from_rollout`. `policy`: the (unwrapped) policy LM, to check that the static
    engine supports it; `sharded`: FSDP/ZeRO-3 training, whose weights the static engine does not
    gather (`auto` then takes the recording loop; an explicit `static` is refused). `compute_dtype`:
    mixed precision's (bf16, fp16), in which the static engine decodes; None: the weights' own.
    """
    generator = HFGenerator(tokenizer, args, stop_token_ids, speedups=speedups)
    chosen = rollout_engine_for(args.rollout_engine, device.type)
    if chosen == "static":
        base = policy.get_base_model() if callable(getattr(policy, "get_base_model", None)) else policy  # PEFT
        reason = "sharded training (FSDP, ZeRO-3)" if sharded else static_engine_unsupported(base)
        if reason is not None:
            if args.rollout_engine == "static":
                raise fail(f"{source}: rollout_engine: static does not support {reason}; "
                           "use rollout_engine: recording (or auto)")
            logger.info("rollout engine: recording (the static engine does not support %s)", reason)
            chosen = "recording"
    if chosen == "recording":
        return RecordingEngine(generator, record)
    compile_step = args.rollout_compile == "on" or (args.rollout_compile == "auto" and device.type == "cuda")
    draw = speedups.draw if speedups is not None else multinomial_draw
    logger.info("rollout engine: static KV cache, decode step %s, stop checks every %d tokens",
                "compiled" if compile_step else "eager", args.stop_check_interval)
    return StaticCacheEngine(tokenizer, generator.settings, generator.stop_words, compile_step,
                             args.stop_check_interval, draw, compute_dtype)
