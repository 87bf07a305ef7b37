"""Rollouts: sample responses to left-padded prompts, then cut each after its first stop token or
stop word.

`HFGenerator.generate` runs the recording decode loop (`rollout.sampler`, the default: PPO's
`logprobs_from_rollout: true`), which also returns the policy's log-probs, values and entropies,
or transformers' `model.generate` when nothing needs recording.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from accelerate.utils import DistributedType
from transformers import GenerationConfig

from rlhfkit.config import GenerationArguments
from rlhfkit.errors import fail
from rlhfkit.models.compile import eager_blocks
from rlhfkit.rl import truncate_after_stop
from rlhfkit.rollout.sampler import SamplingSettings, multinomial_draw, sample_with_records

if TYPE_CHECKING:
    from rlhfkit.cpu.speedups import CpuSpeedups


@dataclass
class GeneratedBatch:
    """Responses to a batch of left-padded prompts."""

    response_ids: torch.Tensor
    """``(b, R)`` tokens up to and including the first stop token, pad after it."""
    response_mask: torch.Tensor
    """``(b, R)`` bool, True on kept response tokens."""
    ended_with_stop: torch.Tensor
    """``(b,)`` bool, whether the response stopped by itself (EOS or a stop word)."""
    logprobs: torch.Tensor | None = None
    """``(b, R)`` the policy's log-probs of the tokens at sampling time (with `record`)."""
    values: torch.Tensor | None = None
    """``(b, R)`` the value head's estimates at sampling time (with `record` and a value head)."""
    entropy: torch.Tensor | None = None
    """``(b, R)`` the policy's entropies at sampling time (with `record`)."""


def cut_at_stop_words(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor,
                      stop_words: list[str], pad_token_id: int) -> None:
    """In place: end each response after the first token whose decoded prefix contains a stop word."""
    for row in range(response_ids.shape[0]):
        length = int(response_mask[row].sum())
        for end in range(1, length + 1):
            text = tokenizer.decode(response_ids[row, :end], skip_special_tokens=True)
            if any(word in text for word in stop_words):
                response_mask[row, end:] = False
                response_ids[row, end:] = pad_token_id
                ended[row] = True
                break


class HFGenerator:
    """Rollouts on the training model (KV cache, left-padded prompts): the recording decode loop or
    `model.generate`. `speedups`: the run's CPU speed-ups (lean LoRA decode, inverse-CDF draw)."""

    def __init__(self, tokenizer, args: GenerationArguments, stop_token_ids: list[int],
                 speedups: "CpuSpeedups | None" = None) -> None:
        self.tokenizer = tokenizer
        self.speedups = speedups
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.stop_words = [w for w in (args.stop_words or "").split(",") if w]
        self.config = GenerationConfig(
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens or None,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=self.stop_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        self.settings = SamplingSettings(
            max_new_tokens=args.max_new_tokens, stop_token_ids=self.stop_token_ids,
            pad_token_id=tokenizer.pad_token_id, do_sample=args.do_sample, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, min_new_tokens=args.min_new_tokens,
            repetition_penalty=args.repetition_penalty)

    @torch.no_grad()
    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, record: bool = False,
                 value_head=None) -> GeneratedBatch:
        """Sample one response per prompt row; ``input_ids`` ``(b, P)`` left-padded.

        `model` holds its full weights (`full_weights_for_generation`), so no process waits for the
        others: each generates until its own responses end. With `record`, our decode loop
        (`rollout.sampler`) samples and also returns the policy's log-probs, entropies and (with
        `value_head`) values at sampling time; otherwise `model.generate` samples.
        """
        was_training = model.training
        model.eval()
        records = None
        # Compiled blocks (torch_compile) would recompile for every cache length: decode eagerly.
        decoding = self.speedups.decoding(model) if self.speedups else contextlib.nullcontext()
        with eager_blocks(), decoding:
            if record:
                draw = self.speedups.draw if self.speedups else multinomial_draw
                records = sample_with_records(model, input_ids, attention_mask, self.settings, value_head, draw)
                generated = records.tokens
            else:
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        generation_config=self.config, synced_gpus=False)
                generated = output[:, input_ids.shape[1]:]
        if was_training:
            model.train()
        return finish_batch(generated, records, self.stop_token_ids, self.tokenizer, self.stop_words)


def finish_batch(generated: torch.Tensor, records, stop_token_ids: list[int], tokenizer,
                 stop_words: list[str]) -> GeneratedBatch:
    """Raw sampled tokens ``(b, R)`` (and a `SampledBatch` of records, or None) as a `GeneratedBatch`:
    each response cut after its first stop token or stop word, the columns that are padding in
    every row dropped."""
    response_ids, response_mask, ended = truncate_after_stop(generated, stop_token_ids, tokenizer.pad_token_id)
    if stop_words:
        cut_at_stop_words(tokenizer, response_ids, response_mask, ended, stop_words, tokenizer.pad_token_id)
    width = max(int(response_mask.sum(-1).max()), 1)
    batch = GeneratedBatch(response_ids[:, :width], response_mask[:, :width], ended)
    if records is not None:
        batch.logprobs, batch.entropy = records.logprobs[:, :width], records.entropy[:, :width]
        batch.values = None if records.values is None else records.values[:, :width]
    return batch


@contextlib.contextmanager
def full_weights_for_generation(accelerator, model) -> Iterator[torch.nn.Module]:
    """Yield the unwrapped `model` with its full weights present, gathered once for a whole rollout.

    `generate` runs many small forward passes of different counts on different processes, so it
    must not go through per-pass weight gathering. DDP and DeepSpeed ZeRO-1/2 keep full weights on
    every process already. FSDP2: every FSDP unit is unsharded once and kept unsharded until the
    rollout ends. DeepSpeed ZeRO-3: all parameters are gathered once and ZeRO-3's per-module
    gather/release hooks are lifted meanwhile (written against DeepSpeed's API, not run here).
    """
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        with _fsdp2_unsharded(model):
            yield unwrapped
    elif accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        with _zero3_gathered(model):
            yield unwrapped
    else:
        yield unwrapped


def check_generation_supported(accelerator) -> None:
    """Fail up front where PPO's rollouts cannot gather the weights once (FSDP1)."""
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise fail("stage ppo under FSDP needs fsdp_version: 2 in the accelerate config (FSDP1 cannot keep the "
                   "gathered weights through generate); see examples/accelerate/fsdp.yml")


@contextlib.contextmanager
def _fsdp2_unsharded(model) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    # FSDP picks its root on the first forward; generate calls the inner model, so settle it first.
    model._get_fsdp_state()._lazy_init()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # Remember each parameter group's resharding choice (accelerate mixes True and False), then
    # keep everything unsharded across the forward passes of generate.
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [(group, group.post_forward_mesh_info) for group in state._fsdp_param_groups]))
    for unit in units:
        unit.unshard()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, mesh_info in groups:
                group.post_forward_mesh_info = mesh_info
        for unit in units:
            unit.reshard()


@contextlib.contextmanager
def _zero3_gathered(engine) -> Iterator[None]:
    try:
        import deepspeed
    except ImportError:  # pragma: no cover - a ZeRO-3 run has DeepSpeed installed
        raise fail("DeepSpeed ZeRO-3 is configured but deepspeed is not installed; pip install deepspeed") from None
    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.forward_hooks, offload.backward_hooks = [], []
            offload.setup_zero_stage3_hooks()
