"""A decode loop that records what PPO needs while it samples: log-probs, values, entropies.

Sampling with `model.generate` and then running the policy again over prompt + response (for
the "old" log-probs and values) computes every response position twice. This loop keeps the
policy's log-probability of each sampled token under ``softmax(logits / temperature)``, the
value head's estimate and the entropy at each position as it goes, so PPO's evaluate phase only
needs the reference model. They equal a separate full forward pass up to float rounding (a
KV-cached pass sums in another order); tests/test_rollout_sampler.py checks that.

Logits processing reuses transformers' processors in `generate`'s order (repetition penalty,
minimum length, temperature, top-k, top-p), so the sampling distribution is `generate`'s.
Tokens are drawn with ``torch.multinomial`` by default; the stage passes the CPU's faster
inverse-CDF draw (`cpu.sampling`) where it pays.

Shapes: ``b`` rows, ``P`` prompt length (left-padded), ``R`` new tokens, ``v`` vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhfkit.models.forward import cache_keyword, capture_head_input, position_ids_from_mask, values_at_logits


Draw = Callable[[torch.Tensor], torch.Tensor]  # (b, v) unnormalised probabilities -> (b,) token ids


@dataclass
class SamplingSettings:
    """What the loop needs of the generation configuration."""

    max_new_tokens: int
    stop_token_ids: list[int]
    pad_token_id: int
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0


@dataclass
class SampledBatch:
    """Raw loop output, before truncation at stop tokens; every tensor ``(b, R)``."""

    tokens: torch.Tensor      # long; pad after a row's first stop token
    logprobs: torch.Tensor    # float32 log p(token) under softmax(logits / temperature)
    values: torch.Tensor | None   # float32 value estimate at the position predicting the token
    entropy: torch.Tensor     # float32 entropy of softmax(logits / temperature)


def logits_processors(settings: SamplingSettings, prompt_length: int) -> LogitsProcessorList | None:
    """transformers' processors for these settings, in `generate`'s order.

    None when sampling needs none but the temperature and the minimum length: then the sampling
    probabilities are the recorded ``softmax(logits / temperature)`` with the stop tokens zeroed
    below the minimum length, which is what those two processors give.
    """
    if settings.do_sample and settings.repetition_penalty == 1.0 and settings.top_k <= 0 \
            and settings.top_p >= 1.0:
        return None
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, settings.min_new_tokens,
                                                            settings.stop_token_ids))
    if settings.do_sample:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


# Below this much probability left after a ban, entries that underflowed to 0 could matter: such
# rows are renormalised in log space instead. Above it, whatever underflowed (each < 1e-38) weighs
# less than 1e-8 of what is left, below float32's resolution.
MIN_REMAINING_MASS = 1e-30


def recorded_distribution(logits: torch.Tensor, temperature: float, stop_ids: torch.Tensor, ban_stops: bool,
                          host_sync: bool = True):
    """From raw logits ``(b, v)``: ``log_softmax(logits / temperature)``, its exponential, and the
    (unnormalised) sampling probabilities when no processor but temperature and minimum length
    applies: the same with the stop tokens zeroed while `ban_stops` (what `generate`'s
    minimum-length processor gives after normalisation). A row whose stop tokens held all but
    `MIN_REMAINING_MASS` of the probability is recomputed as the softmax with their logits at
    -inf, as the zeroed probabilities of the other tokens may have underflowed. `host_sync` False:
    that softmax is computed for every row and selected on the device, instead of asking the host
    whether any row needs it (a synchronisation per token).
    """
    scaled = logits / temperature if temperature != 1.0 else logits
    lsm = torch.log_softmax(scaled, dim=-1)  # (b, v)
    probs = torch.exp(lsm)  # (b, v)
    sampling = probs
    if ban_stops:
        sampling = probs.clone()
        sampling[:, stop_ids] = 0.0
        starved = sampling.sum(-1) < MIN_REMAINING_MASS  # (b,)
        if not host_sync:
            banned = torch.softmax(scaled.index_fill(-1, stop_ids, float("-inf")), dim=-1)
            sampling = torch.where(starved.unsqueeze(-1), banned, sampling)
        elif bool(starved.any()):
            banned = torch.softmax(scaled[starved].index_fill(-1, stop_ids, float("-inf")), dim=-1)
            sampling[starved] = banned
    return lsm, probs, sampling


def next_token(logits: torch.Tensor, sequence: torch.Tensor, generated: int, settings: SamplingSettings,
               processors: LogitsProcessorList | None, stop_ids: torch.Tensor, draw: Draw,
               host_sync: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step's choice from the raw logits ``(b, v)`` of the last position.

    `sequence` ``(b, P + generated)``: prompt and tokens so far (read by the repetition penalty and
    the minimum length's processor). Returns the token ``(b,)`` and the recorded ``log_softmax(logits
    / temperature)`` and its exponential ``(b, v)``; every engine draws through here, so their
    sampling distributions are the same (`generate`'s).
    """
    temperature = settings.temperature if settings.do_sample else 1.0
    lsm, probs, sampling = recorded_distribution(logits, temperature, stop_ids,
                                                 ban_stops=generated < settings.min_new_tokens, host_sync=host_sync)
    if processors is None:
        return draw(sampling), lsm, probs
    scores = processors(sequence, logits.clone())
    token = draw(torch.softmax(scores, -1)) if settings.do_sample else scores.argmax(-1)
    return token, lsm, probs


def multinomial_draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` ``(b, v)`` (rows need not be normalised) -> ``(b,)`` long,
    with torch's own sampling kernel."""
    return torch.multinomial(probs.float(), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_with_records(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: SamplingSettings,
                        value_head=None, draw: Draw = multinomial_draw) -> SampledBatch:
    """Sample up to ``max_new_tokens`` per row of the left-padded prompts ``(b, P)``.

    `model` is a causal LM (or a PEFT model around one) that takes a KV cache; `value_head`, if
    given, maps its last hidden state to values. `draw` picks one token per row from unnormalised
    probabilities ``(b, v)``. A row whose stop token came gets pad after it; the loop ends when
    every row has stopped.
    """
    rows, prompt_length = input_ids.shape
    device = input_ids.device
    processors = logits_processors(settings, prompt_length)
    stop_ids = torch.tensor(settings.stop_token_ids, device=device, dtype=torch.long)
    mask = attention_mask.long()
    positions = position_ids_from_mask(mask)
    sequence = input_ids
    cache = DynamicCache()  # updated in place by every forward pass
    cache_argument = {cache_keyword(model): cache}
    step_input, step_positions = input_ids, positions
    running = torch.ones(rows, dtype=torch.bool, device=device)
    tokens, logprobs, values, entropies = [], [], [], []
    # One hook for the whole loop: each step's LM-head input is the last hidden state, for the values.
    with capture_head_input(model) if value_head is not None else contextlib.nullcontext() as head_input:
        for _ in range(settings.max_new_tokens):
            output = model(input_ids=step_input, attention_mask=mask, position_ids=step_positions,
                           use_cache=True, logits_to_keep=1, **cache_argument)
            logits = output.logits[:, -1].float()  # (b, v) raw, finite
            token, lsm, probs = next_token(logits, sequence, len(tokens), settings, processors, stop_ids, draw)
            token = torch.where(running, token, torch.full_like(token, settings.pad_token_id))
            tokens.append(token)
            logprobs.append(lsm.gather(-1, token.unsqueeze(-1)).squeeze(-1))
            entropies.append(-(probs * lsm).sum(-1))  # raw logits are finite, so no 0 * -inf
            if value_head is not None:
                values.append(values_at_logits(head_input, value_head, output.logits, 1).squeeze(-1).float())
            running = running & ~torch.isin(token, stop_ids)
            if not bool(running.any()):
                break
            if processors is not None:  # the repetition penalty reads the tokens so far
                sequence = torch.cat([sequence, token.unsqueeze(-1)], dim=-1)
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], dim=-1)
            step_positions = step_positions[:, -1:] + 1
            step_input = token.unsqueeze(-1)
    return SampledBatch(torch.stack(tokens, 1), torch.stack(logprobs, 1),
                        torch.stack(values, 1) if value_head is not None else None, torch.stack(entropies, 1))
