"""`CpuSpeedups`: the one switch the stages call for every CPU speed-up (see the package docstring)."""


from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from rlhfkit.cpu.allocator import keep_freed_memory
from rlhfkit.cpu.gradients import allocate_gradients, sparse_embedding_gradients
from rlhfkit.cpu.head import LOGITS_BUFFER, reuse_head_output
from rlhfkit.cpu.logprobs import LOG_SOFTMAX_BUFFER, buffered_logprobs_from_logits
from rlhfkit.cpu.lora_decoding import lean_lora_decoding
from rlhfkit.cpu.sampling import sample_from_probs
from rlhfkit.rl import logprobs_from_logits
from rlhfkit.rollout.sampler import multinomial_draw
from rlhfkit.training.distributed import is_sharded


def speedups_apply(setting: str, accelerator) -> bool:
    """Whether `setting` (auto | off) switches the CPU speed-ups on for this run."""
    return setting == "auto" and accelerator.device.type == "cpu" and accelerator.num_processes == 1 \
        and not is_sharded(accelerator)


@dataclass
class CpuSpeedups:
    """The speed-ups of one run; every method is the plain path when `enabled` is False."""

    enabled: bool
    keep_gradients: bool = False
    """True once `gradient_block` has allocated the gradients (`clip_and_step` zeroes them in place)."""
    _kept: list = field(default_factory=list)

    @classmethod
    def for_sampling(cls, setting: str, device) -> "CpuSpeedups":
        """The decoding speed-ups (lean LoRA, inverse-CDF draw) for sampling alone on one process's
        `device`; no process-wide setting is changed."""
        return cls(setting == "auto" and device.type == "cpu")

    @classmethod
    def for_run(cls, setting: str, accelerator) -> "CpuSpeedups":
        """The speed-ups for `accelerator`'s run; applies the malloc settings when they are on."""
        enabled = speedups_apply(setting, accelerator)
        if enabled:
            keep_freed_memory()
        return cls(enabled)

    def gradient_block(self, prepared: nn.Module, params: list[nn.Parameter]) -> bool:
        """Allocate the gradients of `params` as one block, with sparse embedding gradients into it."""
        if self.enabled:
            self.keep_gradients = allocate_gradients(params)
            sparse_embedding_gradients(prepared)
        return self.keep_gradients

    def head_buffers(self, policy: nn.Module, *frozen: nn.Module) -> None:
        """Logits of the policy's (and the frozen models') LM heads into the kept buffer; the
        policy head's weight gradient added in place when the gradient block exists."""
        if not self.enabled:
            return
        reuse_head_output(policy, accumulate=self.keep_gradients)
        for model in frozen:
            reuse_head_output(model, accumulate=False)
        self._kept += [LOGITS_BUFFER, LOG_SOFTMAX_BUFFER]

    @property
    def logprobs(self) -> Callable[..., torch.Tensor]:
        """The update's log-probs function: `logprobs_from_logits`, or its buffered twin."""
        if self.enabled and self._kept:
            return buffered_logprobs_from_logits
        return logprobs_from_logits

    def decoding(self, model: nn.Module):
        """Context for a rollout of `model`: the lean LoRA decode inside, when enabled."""
        return lean_lora_decoding(model) if self.enabled else contextlib.nullcontext()

    @property
    def draw(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Token sampler for the decode loop: inverse-CDF on CPU, else torch's multinomial kernel."""
        return sample_from_probs if self.enabled else multinomial_draw

    def release(self) -> None:
        """Drop the kept buffers (call in a ``finally``)."""
        for buffer in self._kept:
            buffer.release()
        self._kept.clear()


PLAIN = CpuSpeedups(enabled=False)
"""The plain path everywhere, for callers with no run (tests, commands on another device)."""
