"""Stage `sft`: causal-LM loss on response tokens.

1. data      read, template, tokenize; split off validation
2. model     tokenizer, base, LoRA / full / freeze
3. optimizer AdamW + LR schedule with warm-up
4. loop      per optimizer step: micro-batches (grad accumulation), loss normalised by the step's
             label-token count so accumulation equals one large batch; clip; step; log; evaluate
5. save      adapter or full model plus tokenizer
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from rlhfkit.checkpoint import RunCheckpoints
from rlhfkit.config import Config
from rlhfkit.data import collate_sft
from rlhfkit.models.forward import causal_lm_forward
from rlhfkit.models.loading import load_tokenizer
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


def token_nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over label tokens, and their count."""
    logits = causal_lm_forward(model, batch["input_ids"], batch["attention_mask"]).logits  # (b, T, v)
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll, (shift_labels != -100).sum()


@torch.no_grad()
def evaluate_sft(model, items: list[dict], batch_size: int, pad_token_id: int, device) -> float:
    """Mean token loss over `items`."""
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for begin in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate_sft(items[begin:begin + batch_size], pad_token_id).items()}
        nll, n = token_nll_sum(model, batch)
        total, count = total + nll.float(), count + n
    model.train()
    return float(total / count.clamp(min=1))


def run_sft(config: Config) -> dict[str, float]:
    """Train with the SFT loss; return the final statistics."""
    accelerator = build_accelerator(config)
    t = config.training
    seed_everything(t.seed)  # the same initial weights on every process
    output_dir = check_output_dir(config)
    # 1. data
    tokenizer = load_tokenizer(config.model)
    data = load_stage_data(config, tokenizer)
    # 2. model
    model = load_trainable_model(config, tokenizer, accelerator.device)
    named_params = trainable_named_parameters(model)
    # 3. optimizer
    world = accelerator.num_processes
    samples_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    total_steps = total_optimizer_steps(t, len(data.train), samples_per_step)
    optimizer = build_optimizer(named_params, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces the parameters
    keep_gradients = allocate_gradients(accelerator, params)  # one block, before any pass
    if keep_gradients:
        sparse_embedding_gradients(accelerator, model)  # token rows added into that block
    seed_per_process(t.seed, accelerator.process_index)
    modules = {"model": accelerator.unwrap_model(model)}
    checkpoints = RunCheckpoints(config, accelerator, output_dir, modules, optimizer, scheduler, tokenizer,
                                 modules["model"], prepared=model)
    guard = NonFiniteGuard(t.max_bad_steps)
    resumed = checkpoints.resume()
    guard.load_state_dict(resumed.get("guard", guard.state_dict()))
    log = TrainerLog(output_dir, total_steps, enabled=accelerator.is_main_process, console_keys=("loss", "eval_loss"),
                     start_step=resumed["step"], config=config)
    logger.info("sft: %d train / %d eval samples, %d steps of %d samples", len(data.train), len(data.eval),
                total_steps, samples_per_step)
    # 4. loop
    model.train()
    signals = active_signals()
    for batch_plan in step_batches(len(data.train), samples_per_step, t.seed, start_step=resumed["step"]):
        if batch_plan.step >= total_steps:
            break
        rank_indices, real = rank_share(batch_plan.indices, accelerator.process_index, world)
        micros = micro_batches(rank_indices, t.per_device_train_batch_size)
        batches = [collate_sft([data.train[i] for i in m], tokenizer.pad_token_id) for m in micros]
        padding_rows(batches, real)
        # The step's label-token count over all processes normalises every micro-batch's sum.
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        (step_tokens,) = global_sums(accelerator, local_tokens)
        step_tokens = max(step_tokens, 1.0)
        step_loss = 0.0
        for index, batch in enumerate(batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with micro_batch_context(accelerator, model, index == len(batches) - 1), accelerator.autocast():
                nll, _ = token_nll_sum(model, batch)
                loss = nll * world / step_tokens  # DDP averages over processes
                accelerator.backward(loss)
            step_loss += float(nll.detach()) / step_tokens
        (step_loss,) = global_sums(accelerator, step_loss)
        step = batch_plan.step + 1
        skip = not guard.ok(step_loss, what="loss", step=step)
        grad_norm = clip_and_step(accelerator, model, optimizer, scheduler, t.max_grad_norm, params, skip=skip,
                                   keep_gradients=keep_gradients)
        if not skip:  # a non-finite norm was dropped by clip_and_step; count it once
            guard.ok(grad_norm, what="gradients", step=step)
        stats = {"loss": step_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                 "epoch": round(batch_plan.epoch, 4), "skipped_steps": guard.total}
        if data.eval and t.eval_steps and step % t.eval_steps == 0 and step < total_steps:
            stats["eval_loss"] = evaluate_sft(model, data.eval, t.per_device_eval_batch_size,
                                              tokenizer.pad_token_id, accelerator.device)
        log.advance(step)
        if step % config.output.logging_steps == 0 or step in (1, total_steps) or "eval_loss" in stats:
            log.log(step, stats)
        checkpoints.after_step(step, total_steps, signals, {"guard": guard.state_dict()})
    # 5. evaluate and save
    log.close()  # progress bar, TensorBoard, plots
    final = {"train_loss": log.history[-1]["loss"] if log.history else float("nan")}
    if data.eval:
        final["eval_loss"] = evaluate_sft(model, data.eval, t.per_device_eval_batch_size,
                                          tokenizer.pad_token_id, accelerator.device)
        logger.info("eval_loss=%.4f", final["eval_loss"])
    save_trained(accelerator, model, modules, tokenizer, output_dir)
    return final


def padding_rows(batches: list[dict[str, torch.Tensor]], real: int) -> None:
    """In place: no label tokens in the rows after the first `real` (a process's padding, see `rank_share`)."""
    seen = 0
    for batch in batches:
        rows = batch["labels"].shape[0]
        first_padding = max(real - seen, 0)
        batch["labels"][first_padding:] = -100
        seen += rows
