"""Stage `sft`: causal-LM loss on response tokens.

1. data      read, template, tokenize; split off validation
2. model     tokenizer, base, LoRA / full / freeze
3. optimizer `optim` (AdamW by default) + LR schedule with warm-up
4. loop      per optimizer step: micro-batches (grad accumulation), loss normalised by the step's
             label-token count so accumulation equals one large batch; clip; step; log; evaluate
5. save      adapter or full model plus tokenizer
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from rlhfkit.accelerator.transfer import batch_to_device
from rlhfkit.config import Config
from rlhfkit.data import collate_sft
from rlhfkit.models.forward import causal_lm_forward, chunkable_head, head_returns_input
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.rl.head_logprobs import head_logprobs
from rlhfkit.stages.common import load_stage_data, load_trainable_model, save_trained, trainable_named_parameters
from rlhfkit.stages.setup import Training, prepare_training, start_run
from rlhfkit.training.batches import micro_batches, rank_share, step_batches
from rlhfkit.training.distributed import global_sums, micro_batch_context
from rlhfkit.training.optim import total_optimizer_steps

logger = logging.getLogger(__name__)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices ``(n,)`` into ``(b, T)`` of the positions whose next token is a label (that token is
    at the index + 1). Computed where `labels` are made (the host), a device selects them without
    waiting to learn n."""
    predicts = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    predicts[:, :-1] = labels[:, 1:] != -100
    return predicts.reshape(-1).nonzero().squeeze(-1)


def sft_batch_to_device(batch: dict[str, torch.Tensor], device, logits_chunk_size: int) -> dict[str, torch.Tensor]:
    """A collated (host) batch on `device`, with its `label_positions` when the LM head runs in chunks."""
    if logits_chunk_size > 0:
        batch = {**batch, "label_positions": label_positions(batch["labels"])}
    return batch_to_device(batch, device)


def token_nll_sum(model, batch: dict[str, torch.Tensor], logits_chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over label tokens, and their count.

    `logits_chunk_size` > 0: the LM head and log-softmax run only on the label positions, that many
    at a time (`rl.head_logprobs`), so the ``(b, T, v)`` logits never exist, wherever the head allows
    it (`chunkable_head`). The positions come from ``batch["label_positions"]`` (`label_positions`)
    when the batch has them.
    """
    shift_labels = batch["labels"][:, 1:]
    head = chunkable_head(model) if logits_chunk_size > 0 else None
    if head is not None:
        with head_returns_input(head):
            hidden = causal_lm_forward(model, batch["input_ids"], batch["attention_mask"]).logits  # (b, T, H)
        positions = batch.get("label_positions")
        if positions is None:
            positions = label_positions(batch["labels"])
        flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (n, H)
        targets = batch["labels"].reshape(-1).index_select(0, positions + 1)  # (n,)
        logprobs, _ = head_logprobs(flat_hidden, head.weight, targets, chunk_size=logits_chunk_size)  # (n,)
        return -logprobs.sum(), (shift_labels != -100).sum()
    logits = causal_lm_forward(model, batch["input_ids"], batch["attention_mask"]).logits  # (b, T, v)
    shift_logits = logits[:, :-1].float()
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll, (shift_labels != -100).sum()


@torch.no_grad()
def evaluate_sft(model, items: list[dict], batch_size: int, pad_token_id: int, device,
                 logits_chunk_size: int = 0) -> float:
    """Mean token loss over `items`."""
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for begin in range(0, len(items), batch_size):
        batch = sft_batch_to_device(collate_sft(items[begin:begin + batch_size], pad_token_id), device,
                                    logits_chunk_size)
        nll, n = token_nll_sum(model, batch, logits_chunk_size)
        total, count = total + nll.float(), count + n
    model.train()
    return float(total / count.clamp(min=1))


def run_sft(config: Config) -> dict[str, float]:
    """Train with the SFT loss; return the final statistics."""
    t = config.training
    accelerator, output_dir = start_run(config)
    world = accelerator.num_processes
    # 1. data
    tokenizer = load_tokenizer(config.model)
    data = load_stage_data(config, tokenizer)
    # 2. model
    model = load_trainable_model(config, tokenizer, accelerator.device)
    # 3. optimizer
    samples_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    total_steps = total_optimizer_steps(t, len(data.train), samples_per_step)
    with prepare_training(config, accelerator, output_dir, model, trainable_named_parameters(model),
                          {"model": model}, tokenizer, total_steps, console_keys=("loss", "eval_loss")) as run:
        logger.info("sft: %d train / %d eval samples, %d steps of %d samples", len(data.train), len(data.eval),
                    total_steps, samples_per_step)
        def evaluate() -> dict[str, float]:
            return {"eval_loss": evaluate_sft(run.model, data.eval, t.per_device_eval_batch_size,
                                              tokenizer.pad_token_id, accelerator.device, t.logits_chunk_size)}

        # 4. loop
        run.model.train()
        for batch_plan in step_batches(len(data.train), samples_per_step, t.seed, start_step=run.resumed["step"]):
            if batch_plan.step >= total_steps:
                break
            step = batch_plan.step + 1
            step_loss, tokens = sft_step(run, data.train, batch_plan.indices, tokenizer.pad_token_id)
            grad_norm, _ = run.optimizer_step(step_loss, step)
            stats = {"loss": step_loss, "grad_norm": grad_norm, "lr": run.scheduler.get_last_lr()[0],
                     "epoch": round(batch_plan.epoch, 4), "skipped_steps": run.guard.total, **tokens}
            run.end_step(step, total_steps, stats, evaluate=evaluate if data.eval else None)
        # 5. evaluate and save
        run.log.close()  # progress bar, TensorBoard, plots
        final = {"train_loss": run.log.history[-1]["loss"] if run.log.history else float("nan")}
        if data.eval:
            final.update(evaluate())
            logger.info("eval_loss=%.4f", final["eval_loss"])
        save_trained(accelerator, run.model, {"model": model}, tokenizer, output_dir, config)
    return final


def sft_step(run: Training, items: list[dict], indices: list[int], pad_token_id: int) -> tuple[float, dict]:
    """Accumulate one optimizer step's gradients over this process's micro-batches; the step's mean
    token loss over all processes, and `Training.count_input_tokens`'s statistic.

    The step's label-token count over all processes normalises every micro-batch's sum, so
    accumulation (and several processes) equal one large batch.
    """
    accelerator, t = run.accelerator, run.config.training
    world = accelerator.num_processes
    rank_indices, real = rank_share(indices, accelerator.process_index, world)
    micros = micro_batches(rank_indices, t.per_device_train_batch_size)
    batches = [collate_sft([items[i] for i in m], pad_token_id) for m in micros]
    padding_rows(batches, real)
    tokens = run.count_input_tokens(sum(len(items[i]["input_ids"]) for i in rank_indices[:real]),
                                    sum(b["input_ids"].numel() for b in batches))
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    (step_tokens,) = global_sums(accelerator, local_tokens)
    step_tokens = max(step_tokens, 1.0)
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # read once, at the end
    for index, batch in enumerate(batches):
        batch = sft_batch_to_device(batch, accelerator.device, t.logits_chunk_size)
        with micro_batch_context(accelerator, run.model, index == len(batches) - 1), accelerator.autocast():
            nll, _ = token_nll_sum(run.model, batch, t.logits_chunk_size)
            accelerator.backward(nll * world / step_tokens)  # DDP averages over processes
        step_loss += nll.detach().double() / step_tokens
    (step_loss,) = global_sums(accelerator, step_loss)
    return step_loss, tokens


def padding_rows(batches: list[dict[str, torch.Tensor]], real: int) -> None:
    """In place: no label tokens in the rows after the first `real` (a process's padding, see `rank_share`)."""
    seen = 0
    for batch in batches:
        rows = batch["labels"].shape[0]
        first_padding = max(real - seen, 0)
        batch["labels"][first_padding:] = -100
        seen += rows
