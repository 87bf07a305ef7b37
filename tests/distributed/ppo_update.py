"""One PPO update from a fixed rollout, on however many processes this is launched with.

    torchrun --nproc_per_node 2 tests/distributed/ppo_update.py MODEL_DIR OUT.pt {full,lora}

Every process builds the same rollout of ROWS rows, keeps its share (rows rank::world, trimmed
to its own padding as the PPO stage does), computes advantages with whitening over all
processes, accumulates the PPO loss over micro-batches of MICRO rows and steps once. The first
process saves the updated trainable weights and the update's statistics to OUT.pt.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rlhfkit.models.value_head import ModelWithValueHead, ValueHead
from rlhfkit.rl import PPOLoss
from rlhfkit.stages.ppo_steps import Rollout, compute_advantages, ppo_update_minibatch, response_forward
from rlhfkit.training.optim import clip_and_step

ROWS, MICRO, TEMPERATURE, PAD = 8, 2, 0.9, 0


def fixed_batch(vocab: int) -> tuple[torch.Tensor, ...]:
    """Left-padded prompts and right-padded responses of varied lengths, the same on every process."""
    generator = torch.Generator().manual_seed(11)
    prompt_lengths = torch.randint(2, 9, (ROWS,), generator=generator).tolist()
    response_lengths = torch.randint(1, 8, (ROWS,), generator=generator).tolist()
    width_p, width_r = max(prompt_lengths), max(response_lengths)
    query = torch.full((ROWS, width_p), PAD)
    query_mask = torch.zeros_like(query)
    response = torch.full((ROWS, width_r), PAD)
    response_mask = torch.zeros_like(response, dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        query[row, width_p - p:] = torch.randint(3, vocab, (p,), generator=generator)
        query_mask[row, width_p - p:] = 1
        response[row, :r] = torch.randint(3, vocab, (r,), generator=generator)
        response_mask[row, :r] = True
    return query, query_mask, response, response_mask


def trimmed(rollout: Rollout) -> Rollout:
    """Drop the prompt columns that are padding in every row and the response columns after the longest."""
    keep_p = rollout.query_mask.any(0)
    first = int(keep_p.float().argmax())
    width = max(int(rollout.response_mask.sum(-1).max()), 1)
    fields = {name: getattr(rollout, name) for name in rollout.__dataclass_fields__}
    fields["query_ids"], fields["query_mask"] = fields["query_ids"][:, first:], fields["query_mask"][:, first:]
    for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values", "advantages", "returns"):
        fields[name] = fields[name][:, :width]
    return Rollout(**fields)


def main(model_dir: str, out: str, kind: str) -> None:
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    if kind == "lora":
        lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                           lora_dropout=0.0))
        with torch.no_grad():  # a non-identity adapter, so the update moves away from a real policy
            for name, param in lm.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.3)
    head = ValueHead(lm.config.hidden_size, zero_init=False)
    with torch.no_grad():
        head.summary.weight.normal_(std=0.5)
    model = ModelWithValueHead(lm, head)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.1)  # the update is the gradient, scaled
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    prepared, optimizer = accelerator.prepare(model, optimizer)

    # The whole rollout, identical on every process: old log-probs and values a little off the
    # current ones (so some ratios leave the clip range), reference log-probs, scores.
    query, query_mask, response, response_mask = fixed_batch(lm.config.vocab_size)
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, response_mask.long()], 1)
    with torch.no_grad():
        logprobs, values, _ = response_forward(model, None, ids, mask, response, TEMPERATURE)
    noise = torch.Generator().manual_seed(5)
    float_mask = response_mask.float()
    old_logprobs = (logprobs + 0.3 * torch.randn(logprobs.shape, generator=noise)) * float_mask
    ref_logprobs = (logprobs + 0.2 * torch.randn(logprobs.shape, generator=noise)) * float_mask
    old_values = (values + 0.3 * torch.randn(values.shape, generator=noise)) * float_mask
    scores = torch.randn(ROWS, generator=noise)

    # This process's share, padded to its own widths, advantages whitened over all processes.
    rows = list(range(ROWS))[rank::world]
    share = trimmed(Rollout(query[rows], query_mask[rows], response[rows], response_mask[rows], scores[rows],
                            old_logprobs[rows], ref_logprobs[rows], old_values[rows], old_values[rows],
                            old_values[rows]))
    share_mask = share.response_mask.float()
    _, advantages, returns, _ = compute_advantages(share.scores, share.logprobs, share.ref_logprobs, share.values,
                                                   share_mask, 0.05, "k1", 1.0, 0.95, True, True, accelerator)
    share.advantages, share.returns = advantages, returns

    loss_fn = PPOLoss(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.01)
    stats = ppo_update_minibatch(accelerator, prepared, None, loss_fn, share, MICRO, TEMPERATURE, world)
    params = [p for p in prepared.parameters() if p.requires_grad]
    stats["grad_norm"] = clip_and_step(accelerator, prepared, optimizer, scheduler, 1.0, params)
    if accelerator.is_main_process:
        updated = {n: p.detach().clone() for n, p in accelerator.unwrap_model(prepared).named_parameters()
                   if p.requires_grad}
        torch.save({"weights": updated, "stats": stats}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    torch.distributed.destroy_process_group()
