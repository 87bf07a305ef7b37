"""Stage `rm`: a pairwise reward model, a value head on the language model's last hidden state.

1. data      pairwise rows -> (prompt + chosen, prompt + rejected) token ids; split off validation
2. model     tokenizer, base, LoRA / full / freeze, value head (hidden -> 1)
3. optimizer AdamW over the trainable LM weights and the head
4. loop      loss = -log sigmoid(r_chosen - r_rejected), scores read at the last real token;
             micro-batches accumulate to the step's pair count; accuracy logged
5. save      adapter or full model, tokenizer and value_head.safetensors (what PPO loads)
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from rlhfkit.checkpoint import RunCheckpoints
from rlhfkit.config import Config
from rlhfkit.data import collate_pairwise
from rlhfkit.models.forward import sequence_scores
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.value_head import ModelWithValueHead, ValueHead
from rlhfkit.stages.common import load_stage_data, load_trainable_model, save_trained, trainable_named_parameters
from rlhfkit.tracking.trainer_log import TrainerLog
from rlhfkit.training.batches import micro_batches, rank_share, step_batches
from rlhfkit.training.distributed import global_sums, micro_batch_context
from rlhfkit.training.optim import (
    allocate_gradients,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    sparse_embedding_gradients,
    total_optimizer_steps,
)
from rlhfkit.training.control import NonFiniteGuard, active_signals
from rlhfkit.training.runtime import build_accelerator, check_output_dir, seed_everything, seed_per_process

logger = logging.getLogger(__name__)


def pair_scores(model, value_head, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected halves of a pairwise batch. ``(n,)`` each.

    `value_head` None: `model` is a `ModelWithValueHead`.
    """
    scores = sequence_scores(model, value_head, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def evaluate_rm(model, value_head, items: list[dict], batch_size: int, pad_token_id: int, device) -> dict:
    """Mean pairwise loss and accuracy (chosen scored strictly higher) over `items`."""
    model.eval()
    losses, correct = [], []
    for begin in range(0, len(items), batch_size):
        batch = collate_pairwise(items[begin:begin + batch_size], pad_token_id)
        chosen, rejected = pair_scores(model, value_head, {k: v.to(device) for k, v in batch.items()})
        losses.append(-F.logsigmoid(chosen - rejected).float())
        correct.append((chosen > rejected).float())
    model.train()
    return {"eval_loss": float(torch.cat(losses).mean()), "eval_accuracy": float(torch.cat(correct).mean())}


def run_rm(config: Config) -> dict[str, float]:
    """Train a pairwise reward model; return the final statistics."""
    accelerator = build_accelerator(config)
    t = config.training
    seed_everything(t.seed)  # the same initial weights (LoRA, value head) on every process
    output_dir = check_output_dir(config)
    # 1. data
    tokenizer = load_tokenizer(config.model)
    data = load_stage_data(config, tokenizer)
    # 2. model
    lm = load_trainable_model(config, tokenizer, accelerator.device)
    hidden_size = lm.config.get_text_config().hidden_size
    scorer = ModelWithValueHead(lm, ValueHead(hidden_size, zero_init=False).to(accelerator.device))
    named_params = trainable_named_parameters(scorer.model, scorer.value_head)
    # 3. optimizer
    world = accelerator.num_processes
    pairs_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    total_steps = total_optimizer_steps(t, len(data.train), pairs_per_step)
    optimizer = build_optimizer(named_params, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    model, optimizer = accelerator.prepare(scorer, optimizer)  # `model`: the LM and its head as one module
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces the parameters
    keep_gradients = allocate_gradients(accelerator, params)  # one block, before any pass
    if keep_gradients:
        sparse_embedding_gradients(accelerator, model)  # token rows added into that block
    seed_per_process(t.seed, accelerator.process_index)
    modules = {"model": scorer.model, "value_head": scorer.value_head}
    checkpoints = RunCheckpoints(config, accelerator, output_dir, modules, optimizer, scheduler, tokenizer,
                                 modules["model"], modules["value_head"], prepared=model)
    guard = NonFiniteGuard(t.max_bad_steps)
    resumed = checkpoints.resume()
    guard.load_state_dict(resumed.get("guard", guard.state_dict()))
    signals = active_signals()
    log = TrainerLog(output_dir, total_steps, enabled=accelerator.is_main_process,
                     console_keys=("loss", "accuracy", "eval_accuracy"), start_step=resumed["step"], config=config)
    logger.info("rm: %d train / %d eval pairs, %d steps of %d pairs", len(data.train), len(data.eval),
                total_steps, pairs_per_step)
    # 4. loop
    model.train()
    step_pairs = float(pairs_per_step)
    for batch_plan in step_batches(len(data.train), pairs_per_step, t.seed, start_step=resumed["step"]):
        if batch_plan.step >= total_steps:
            break
        step_pairs = float(len(batch_plan.indices))
        rank_indices, real = rank_share(batch_plan.indices, accelerator.process_index, world)
        weights = (torch.arange(len(rank_indices)) < real).float().to(accelerator.device)  # 0: padding
        micros = micro_batches(list(range(len(rank_indices))), t.per_device_train_batch_size)
        loss_sum, correct, margin = 0.0, 0.0, 0.0
        for index, micro in enumerate(micros):
            batch = collate_pairwise([data.train[rank_indices[i]] for i in micro], tokenizer.pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            weight = weights[micro[0]:micro[-1] + 1]
            with micro_batch_context(accelerator, model, index == len(micros) - 1), accelerator.autocast():
                chosen, rejected = pair_scores(model, None, batch)
                pair_loss = (-F.logsigmoid(chosen - rejected) * weight).sum()
                accelerator.backward(pair_loss * world / step_pairs)  # DDP averages over processes
            loss_sum += float(pair_loss.detach())
            correct += float(((chosen > rejected).float() * weight).sum())
            margin += float(((chosen - rejected).detach() * weight).sum())
        totals = [value / step_pairs for value in global_sums(accelerator, loss_sum, correct, margin)]
        step = batch_plan.step + 1
        skip = not guard.ok(float(totals[0]), what="loss", step=step)
        grad_norm = clip_and_step(accelerator, model, optimizer, scheduler, t.max_grad_norm, params, skip=skip,
                                   keep_gradients=keep_gradients)
        if not skip:  # a non-finite norm was dropped by clip_and_step; count it once
            guard.ok(grad_norm, what="gradients", step=step)
        stats = {"loss": float(totals[0]), "accuracy": float(totals[1]), "margin": float(totals[2]),
                 "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "epoch": round(batch_plan.epoch, 4),
                 "skipped_steps": guard.total}
        if data.eval and t.eval_steps and step % t.eval_steps == 0 and step < total_steps:
            stats.update(evaluate_rm(model, None, data.eval, t.per_device_eval_batch_size,
                                     tokenizer.pad_token_id, accelerator.device))
        log.advance(step)
        if step % config.output.logging_steps == 0 or step in (1, total_steps) or "eval_loss" in stats:
            log.log(step, stats)
        checkpoints.after_step(step, total_steps, signals, {"guard": guard.state_dict()})
    # 5. evaluate and save
    log.close()  # progress bar, TensorBoard, plots
    final = {"train_loss": log.history[-1]["loss"] if log.history else float("nan")}
    if data.eval:
        final.update(evaluate_rm(model, None, data.eval, t.per_device_eval_batch_size,
                                 tokenizer.pad_token_id, accelerator.device))
        logger.info("eval_loss=%.4f eval_accuracy=%.4f", final["eval_loss"], final["eval_accuracy"])
    save_trained(accelerator, model, modules, tokenizer, output_dir)
    return final
