"""The accelerator's rollout engine: a static KV cache, a compiled per-token step, few host syncs.

The recording loop (`rollout.sampler`) grows a `DynamicCache` and a 2-D mask every token, runs
every kernel from Python and asks the host after each token whether a row still runs. On a GPU
that bounds a rollout by kernel launches, not by the weights it reads. Here:

1. the KV cache is preallocated (transformers' `StaticCache`) for prompt + `max_new_tokens`
   positions, rounded up to `CACHE_LENGTH_MULTIPLE` so that rollouts of other prompt widths reuse
   the same shapes, and kept from one rollout to the next (reset, same memory; a few shapes at once);
2. attention takes an additive 4-D mask over the whole cache (``(b, 1, q, L)``: causal, padding
   and not-yet-written positions masked) that this engine builds, so nothing depends on
   transformers' mask construction for a growing cache;
3. the prompt is prefilled eagerly; the one-token decode step (token, position, mask -> logits)
   has fixed shapes, so it can be compiled once: ``torch.compile(mode="reduce-overhead")``
   captures it in a CUDA graph on CUDA (`rollout_compile`);
4. tokens are chosen by `rollout.sampler.next_token` (the recording loop's own sampling, so the
   same distribution as `generate`, with `torch.multinomial` off the CPU) without host
   synchronisations; whether any row still runs is asked every `stop_check_interval` tokens;
5. a LoRA policy decodes on a merged generation copy (`rollout.generation_copy`), and a fully
   trained one under mixed precision on a copy in the compute dtype (its float32 weights would
   double the bytes read per token); either is refreshed in place by `sync_weights` once per PPO
   step. Otherwise the policy decodes on its own weights.

Nothing is recorded: in low precision the merged weights and the cached attention differ from
the training forward by more than rounding, so PPO's evaluate phase recomputes the old
log-probs, values and entropies with the training forward (the importance ratio is then 1 at
the first epoch). Supports causal LMs with sdpa or eager attention and transformers >= 5
(`static_engine_unsupported` says why not otherwise).

Shapes: ``b`` rows, ``P`` prompt width (left-padded), ``R`` new tokens, ``L`` cache length, ``v`` vocabulary.
"""

from __future__ import annotations

import logging

import torch
import transformers
from torch import nn

from rlhfkit.models.compile import eager_blocks
from rlhfkit.models.forward import cache_keyword, position_ids_from_mask
from rlhfkit.rollout.generation import GeneratedBatch, finish_batch
from rlhfkit.rollout.generation_copy import GenerationCopy, UnsupportedAdapter
from rlhfkit.rollout.sampler import Draw, SamplingSettings, logits_processors, multinomial_draw, next_token

logger = logging.getLogger(__name__)

CACHE_LENGTH_MULTIPLE = 64
KEPT_CACHES = 4
ATTENTION_KERNELS = ("sdpa", "eager")  # those that take an additive 4-D mask


def static_engine_unsupported(model: nn.Module) -> str | None:
    """Why the static engine cannot decode `model`, or None when it can."""
    if int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__} (its StaticCache needs cache positions; >= 5 tracks them)"
    config = getattr(model, "config", None)
    kernel = getattr(config, "_attn_implementation", None)
    if kernel not in ATTENTION_KERNELS:
        return f"attention kernel {kernel} (the static engine's 4-D masks need one of {', '.join(ATTENTION_KERNELS)})"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    windowed = any(kind != "full_attention" for kind in layer_types) if layer_types is not None \
        else bool(getattr(text, "sliding_window", None))
    if windowed:  # their static layers keep a window of keys, not the whole length the 4-D mask spans
        return "sliding-window or hybrid attention layers"
    return None


def _rounded_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def decode_step(model, cache, token: torch.Tensor, position: torch.Tensor, key_valid: torch.Tensor,
                mask_dtype: torch.dtype, keyword: str) -> torch.Tensor:
    """One token per row through `model` with `cache` (passed as `keyword`, `cache_keyword`'s): ``token``
    ``(b, 1)`` at ``position`` ``(b, 1)``, attending to the cache positions where ``key_valid`` ``(b, L)``
    is True. Returns float32 logits ``(b, v)``."""
    mask = torch.zeros(key_valid.shape, dtype=mask_dtype, device=key_valid.device)
    mask = mask.masked_fill(~key_valid, torch.finfo(mask_dtype).min)[:, None, None, :]  # (b, 1, 1, L)
    output = model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1,
                   **{keyword: cache})
    return output.logits[:, -1].float()


def prefill_mask(prompt_mask: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(b, 1, P, L)`` of the prompt's pass: query i sees real prompt keys j <= i."""
    rows, width = prompt_mask.shape
    causal = torch.ones(width, length, dtype=torch.bool, device=prompt_mask.device).tril()  # (P, L), j <= i
    allowed = causal[None] & torch.nn.functional.pad(prompt_mask.bool(), (0, length - width))[:, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


class StaticCacheEngine:
    """`RolloutEngine` with a static KV cache (see the module docstring).

    `compile_step`: compile the decode step (``mode="reduce-overhead"``: a CUDA graph on CUDA).
    `stop_check_interval`: tokens between the host's checks for rows still running.
    `draw`: token sampler from unnormalised probabilities (torch's multinomial by default).
    `dtype`: decode in this dtype (mixed precision's compute dtype), None: the weights' own.
    """

    records = False

    def __init__(self, tokenizer, settings: SamplingSettings, stop_words: list[str], compile_step: bool,
                 stop_check_interval: int = 8, draw: Draw = multinomial_draw,
                 dtype: torch.dtype | None = None) -> None:
        self.tokenizer, self.settings, self.stop_words = tokenizer, settings, stop_words
        self.compile_step, self.stop_check_interval, self.draw = compile_step, stop_check_interval, draw
        self.dtype = dtype
        self.policy = None
        self.copy: GenerationCopy | None = None
        self.no_copy = False  # decode on the policy itself: it needs no copy, or has layers a copy cannot hold
        self.caches: dict[tuple, object] = {}  # by (decoder, rows, length), most recently used last
        self._step = None
        self._compiled_ran = False

    def sync_weights(self, policy, value_head=None) -> None:
        """Decode with `policy`'s current weights: a generation copy (a LoRA policy's merged weights,
        weights cast to `dtype`) is built on the first call and refreshed in place on the next ones; a
        policy that needs neither decodes as it is."""
        if self.copy is not None and self.policy is policy:
            self.copy.refresh()
        elif not self.no_copy:
            try:
                copy = GenerationCopy(policy, self.dtype)
            except UnsupportedAdapter as reason:
                logger.info("static rollout engine: decoding on the policy itself (%s)", reason)
                copy, self.no_copy = None, True
            if copy is not None and copy.copies_anything:
                logger.info("static rollout engine: decoding on a generation copy (%d merged LoRA layers, %d weights "
                            "cast to %s)", len(copy.merges), len(copy.casts), self.dtype)
                self.copy = copy
            else:
                self.copy, self.no_copy = None, True
        self.policy = policy

    def _decoder(self) -> nn.Module:
        return self.copy.model if self.copy is not None else self.policy

    def _cache_for(self, model, rows: int, length: int):
        """A kept cache of this shape, reset; else a new one. Up to `KEPT_CACHES` are kept: a compiled
        step (and its CUDA graph) is specialised to its cache's memory, so alternating prompt widths
        reuse theirs instead of compiling again."""
        key = (id(model), rows, length)
        cache = self.caches.pop(key, None)
        if cache is not None:
            cache.reset()
        else:
            cache = transformers.StaticCache(config=model.config, max_cache_len=length)
            while len(self.caches) >= KEPT_CACHES:
                self.caches.pop(next(iter(self.caches)))
        self.caches[key] = cache
        return cache

    def _step_function(self, device: torch.device):
        if self._step is None:
            if self.compile_step:
                mode = "reduce-overhead" if device.type == "cuda" else "default"
                self._step = torch.compile(decode_step, mode=mode, dynamic=False)
            else:
                self._step = decode_step
        return self._step

    def _run_step(self, step, model, cache, token, position, key_valid, dtype, keyword) -> torch.Tensor:
        """One decode step; a compiled step that fails on its first call (compilation) is replaced by
        the eager one for the rest of the run, with the cache's write position put back."""
        if step is decode_step:
            with eager_blocks():  # compiled blocks (torch_compile) run their eager code
                return step(model, cache, token, position, key_valid, dtype, keyword)
        first = not self._compiled_ran
        written = [layer.cumulative_length.clone() for layer in cache.layers] if first else None
        try:
            if token.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            # .clone(): the graph's output is reused
            logits = step(model, cache, token, position, key_valid, dtype, keyword).clone()
        except Exception as error:  # noqa: BLE001 - any compiler failure: decode eagerly instead
            if not first:
                raise
            logger.warning("static rollout engine: compiling the decode step failed (%s: %s); decoding eagerly",
                           type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            for layer, length in zip(cache.layers, written):
                layer.cumulative_length.copy_(length)
            self._step = decode_step
            with eager_blocks():
                return decode_step(model, cache, token, position, key_valid, dtype, keyword)
        self._compiled_ran = True
        return logits

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> GeneratedBatch:
        """Sample one response per row of the left-padded prompts ``(b, P)`` (after `sync_weights`)."""
        if self.policy is None:
            raise RuntimeError("call sync_weights(policy) before generate")
        model, settings = self._decoder(), self.settings
        was_training = model.training
        model.eval()
        try:
            tokens = self._sample(model, prompt_ids, prompt_mask)
        finally:
            model.train(was_training)
        return finish_batch(tokens, None, settings.stop_token_ids, self.tokenizer, self.stop_words)

    def _sample(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        settings, device = self.settings, prompt_ids.device
        rows, width = prompt_ids.shape
        new = settings.max_new_tokens
        length = _rounded_up(width + new, CACHE_LENGTH_MULTIPLE)
        dtype = next(model.parameters()).dtype
        cache, keyword = self._cache_for(model, rows, length), cache_keyword(model)
        step = self._step_function(device)
        processors = logits_processors(settings, width)
        stop_ids = torch.tensor(settings.stop_token_ids, device=device, dtype=torch.long)
        key_valid = torch.zeros(rows, length, dtype=torch.bool, device=device)  # (b, L)
        key_valid[:, :width] = prompt_mask.bool()
        positions = position_ids_from_mask(prompt_mask)  # (b, P)
        # 1. prefill, eagerly (its shape changes with the prompts)
        with eager_blocks():
            output = model(input_ids=prompt_ids, attention_mask=prefill_mask(prompt_mask, length, dtype),
                           position_ids=positions, use_cache=True, logits_to_keep=1, **{keyword: cache})
        logits = output.logits[:, -1].float()  # (b, v)
        sequence = torch.cat([prompt_ids, torch.full((rows, new), settings.pad_token_id, device=device,
                                                     dtype=prompt_ids.dtype)], dim=1)  # (b, P + R)
        position = positions[:, -1:] + 1  # (b, 1)
        running = torch.ones(rows, dtype=torch.bool, device=device)
        pad = torch.full((rows,), settings.pad_token_id, dtype=torch.long, device=device)
        generated = new
        # 2. decode: one token per step, the host asked every stop_check_interval tokens
        for index in range(new):
            token, _, _ = next_token(logits, sequence[:, :width + index], index, settings, processors, stop_ids,
                                     self.draw, host_sync=False)
            token = torch.where(running, token, pad)
            sequence[:, width + index] = token
            running &= ~torch.isin(token, stop_ids)
            if index + 1 == new or ((index + 1) % self.stop_check_interval == 0 and not bool(running.any())):
                generated = index + 1
                break
            key_valid[:, width + index] = True
            logits = self._run_step(step, model, cache, token.unsqueeze(-1), position, key_valid, dtype, keyword)
            step = self._step
            position = position + 1
        return sequence[:, width:width + generated]
