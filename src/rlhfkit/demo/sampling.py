"""Batch sampling from a (base + adapter) policy, and scoring with a saved reward model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlhfkit.data import collate_prompts, get_template
from rlhfkit.models.forward import sequence_scores
from rlhfkit.models.value_head import ValueHead
from rlhfkit.rl import truncate_after_stop
from rlhfkit.stages.ppo_steps import response_forward
from rlhfkit.tracking.progress import Progress, console_line


@dataclass
class Samples:
    """Responses to prompts, with what the report needs about each."""

    prompts: list[str]
    responses: list[str]
    lengths: list[int]
    ended: list[bool]
    kl_to_reference: list[float]
    """Sum over response tokens of log pi(y) - log ref(y) (k1), nats per response."""


def load_policy(base_dir: str | Path, adapter_dir: str | Path | None, device: torch.device = torch.device("cpu")):
    """The base model with an optional LoRA adapter, for inference on `device` (float32)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(device).eval()
    return model


@torch.no_grad()
def sample(model, reference, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int,
           batch_size: int = 48, label: str = "sampling") -> Samples:
    """Sample one response per prompt (same seed, same prompts: comparable across policies).

    Progress (batches done, ETA) goes to the console under `label`.
    """
    template = get_template(None, tokenizer)
    stops = template.stop_token_ids(tokenizer)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=stops,
                              pad_token_id=tokenizer.pad_token_id)
    out = Samples([], [], [], [], [])
    torch.manual_seed(seed)
    total = -(-len(prompts) // batch_size)
    progress = Progress(total, description=label)
    started = time.time()
    for batch_index, begin in enumerate(range(0, len(prompts), batch_size), 1):
        chunk = prompts[begin:begin + batch_size]
        rows = [{"input_ids": template.encode_prompt(tokenizer, [{"role": "user", "content": p}])} for p in chunk]
        batch = {k: v.to(model.device) for k, v in collate_prompts(rows, tokenizer.pad_token_id).items()}
        generated = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]
        response_ids, mask, ended = truncate_after_stop(generated, stops, tokenizer.pad_token_id)
        ids = torch.cat([batch["input_ids"], response_ids], 1)
        full_mask = torch.cat([batch["attention_mask"], mask.long()], 1)
        if reference is None:  # the policy is its own reference
            kl = torch.zeros(len(chunk))
        else:
            logprobs, _, _ = response_forward(model, value_head=None, ids=ids, mask=full_mask,
                                              response_ids=response_ids, temperature=temperature, with_values=False)
            ref_logprobs, _, _ = response_forward(reference, value_head=None, ids=ids, mask=full_mask,
                                                  response_ids=response_ids, temperature=temperature,
                                                  with_values=False)
            kl = ((logprobs - ref_logprobs) * mask).sum(-1)
        out.prompts += chunk
        out.responses += tokenizer.batch_decode(response_ids.masked_fill(~mask, tokenizer.pad_token_id),
                                                skip_special_tokens=True)
        out.lengths += mask.sum(-1).tolist()
        out.ended += ended.tolist()
        out.kl_to_reference += kl.tolist()
        progress.advance(batch_index)
        elapsed = time.time() - started
        per_batch = elapsed / batch_index
        progress.line(console_line(batch_index, total, label, per_batch, elapsed, per_batch * (total - batch_index)))
    progress.close()
    return out


@torch.no_grad()
def reward_model_scores(base_dir: str | Path, rm_dir: str | Path, prompts: list[str], responses: list[str],
                        batch_size: int = 16, device: torch.device = torch.device("cpu")) -> list[float]:
    """Scores of a LoRA reward model (RM-stage output) on prompt/response pairs, computed on `device`."""
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = load_policy(base_dir, rm_dir, device)
    head = ValueHead.load(rm_dir).to(device)
    template = get_template(None, tokenizer)
    scores: list[float] = []
    for begin in range(0, len(prompts), batch_size):
        rows = []
        for prompt, response in zip(prompts[begin:begin + batch_size], responses[begin:begin + batch_size]):
            turns = template.encode_turns(tokenizer, [{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": response}])
            rows.append({"input_ids": [t for p, r in turns for t in p + r]})
        batch = collate_prompts(rows, tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        scores += sequence_scores(model, head, ids, mask).tolist()
    return scores


