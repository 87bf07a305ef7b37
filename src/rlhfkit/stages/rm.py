"""Stage `rm`: a pairwise reward model, a value head on the language model's last hidden state.

1. data      pairwise rows -> (prompt + chosen, prompt + rejected) token ids; split off validation
2. model     tokenizer, base, LoRA / full / freeze, value head (hidden -> 1): the one saved with the last
             adapter (else the model) when that is a reward model, as LLaMA-Factory does; else fresh
3. optimizer `optim` (AdamW by default) over the trainable LM weights and the head
4. loop      loss = -log sigmoid(r_chosen - r_rejected), scores read at the last real token;
             micro-batches accumulate to the step's pair count; accuracy logged
5. save      adapter or full model, tokenizer and value_head.safetensors (what PPO loads); with LoRA,
             base_model.json: the base's structure and weight fingerprint, which PPO checks its base by
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from rlhfkit.accelerator.transfer import batch_to_device
from rlhfkit.config import Config
from rlhfkit.data import collate_pairwise
from rlhfkit.models.adapters import merged_adapter_paths, split_paths
from rlhfkit.models.fingerprint import write_base_fingerprint
from rlhfkit.models.forward import sequence_scores
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.value_head import ModelWithValueHead, ValueHead, has_value_head, value_head_folder
from rlhfkit.stages.common import load_stage_data, load_trainable_model, save_trained, trainable_named_parameters
from rlhfkit.stages.setup import Training, prepare_training, start_run
from rlhfkit.training.batches import micro_batches, rank_share, step_batches
from rlhfkit.training.distributed import global_sums, micro_batch_context
from rlhfkit.training.optim import total_optimizer_steps

logger = logging.getLogger(__name__)


def pair_scores(model, batch: dict[str, torch.Tensor], value_head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected halves of a pairwise batch. ``(n,)`` each.

    `value_head` None: `model` is a `ModelWithValueHead`.
    """
    scores = sequence_scores(model, value_head, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def evaluate_rm(model, items: list[dict], batch_size: int, pad_token_id: int, device, value_head=None) -> dict:
    """Mean pairwise loss and accuracy (chosen scored strictly higher) over `items`."""
    model.eval()
    losses, correct = [], []
    for begin in range(0, len(items), batch_size):
        batch = collate_pairwise(items[begin:begin + batch_size], pad_token_id)
        chosen, rejected = pair_scores(model, {k: v.to(device) for k, v in batch.items()}, value_head)
        losses.append(-F.logsigmoid(chosen - rejected).float())
        correct.append((chosen > rejected).float())
    model.train()
    return {"eval_loss": float(torch.cat(losses).mean()), "eval_accuracy": float(torch.cat(correct).mean())}


def initial_value_head(config: Config, hidden_size: int) -> ValueHead:
    """The head training starts from: the trained one of the reward model it continues (`value_head_folder`:
    the last adapter, resumed or merged, else the model folder), else a small random one."""
    m = config.model
    folder = value_head_folder(m.model_name_or_path, split_paths(m.adapter_name_or_path))
    if not has_value_head(folder):
        return ValueHead(hidden_size, zero_init=False)
    head = ValueHead.load(folder, hidden_size)
    logger.info("rm: value head loaded from %s, whose weights this run continues", folder)
    return head


def run_rm(config: Config) -> dict[str, float]:
    """Train a pairwise reward model; return the final statistics."""
    t = config.training
    accelerator, output_dir = start_run(config)
    # 1. data
    tokenizer = load_tokenizer(config.model)
    data = load_stage_data(config, tokenizer)
    # 2. model
    lm = load_trainable_model(config, tokenizer, accelerator.device)
    hidden_size = lm.config.get_text_config().hidden_size
    scorer = ModelWithValueHead(lm, initial_value_head(config, hidden_size).to(accelerator.device))
    # 3. optimizer
    pairs_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    total_steps = total_optimizer_steps(t, len(data.train), pairs_per_step)
    modules = {"model": scorer.model, "value_head": scorer.value_head}
    with prepare_training(config, accelerator, output_dir, scorer,  # the LM and its head as one module
                          trainable_named_parameters(scorer.model, scorer.value_head), modules, tokenizer,
                          total_steps, console_keys=("loss", "accuracy", "eval_accuracy")) as run:
        logger.info("rm: %d train / %d eval pairs, %d steps of %d pairs", len(data.train), len(data.eval),
                    total_steps, pairs_per_step)
        def evaluate() -> dict[str, float]:
            return evaluate_rm(run.model, data.eval, t.per_device_eval_batch_size, tokenizer.pad_token_id,
                               accelerator.device)

        # 4. loop
        run.model.train()
        for batch_plan in step_batches(len(data.train), pairs_per_step, t.seed, start_step=run.resumed["step"]):
            if batch_plan.step >= total_steps:
                break
            step = batch_plan.step + 1
            loss, accuracy, margin, tokens = rm_step(run, data.train, batch_plan.indices, tokenizer.pad_token_id)
            grad_norm, _ = run.optimizer_step(loss, step)
            stats = {"loss": loss, "accuracy": accuracy, "margin": margin, "grad_norm": grad_norm,
                     "lr": run.scheduler.get_last_lr()[0], "epoch": round(batch_plan.epoch, 4),
                     "skipped_steps": run.guard.total, **tokens}
            run.end_step(step, total_steps, stats, evaluate=evaluate if data.eval else None)
        # 5. evaluate and save
        run.log.close()  # progress bar, TensorBoard, plots
        final = {"train_loss": run.log.history[-1]["loss"] if run.log.history else float("nan")}
        if data.eval:
            final.update(evaluate())
            logger.info("eval_loss=%.4f eval_accuracy=%.4f", final["eval_loss"], final["eval_accuracy"])
        save_trained(accelerator, run.model, modules, tokenizer, output_dir, config)
        if config.finetuning.finetuning_type == "lora" and accelerator.is_main_process:  # what PPO checks the base by
            m = config.model
            write_base_fingerprint(output_dir, m.model_name_or_path,
                                   merged_adapter_paths(config.finetuning, split_paths(m.adapter_name_or_path)),
                                   m.trust_remote_code)
    return final


def rm_step(run: Training, items: list[dict], indices: list[int], pad_token_id: int
            ) -> tuple[float, float, float, dict]:
    """Accumulate one optimizer step's gradients over this process's micro-batches of pairs; the
    step's mean loss, accuracy and margin over all processes, and `Training.count_input_tokens`'s
    statistic (chosen and rejected sequences both count).

    Each pair's loss is divided by the step's pair count, so accumulation (and several processes)
    equal one large batch; a process's padding rows (`rank_share`) weigh 0.
    """
    accelerator, t = run.accelerator, run.config.training
    world = accelerator.num_processes
    step_pairs = float(len(indices))
    rank_indices, real = rank_share(indices, accelerator.process_index, world)
    weights = (torch.arange(len(rank_indices)) < real).float().to(accelerator.device)  # 0: padding
    micros = micro_batches(list(range(len(rank_indices))), t.per_device_train_batch_size)
    # The sums stay on the device (float64) and are read once, at the end of the step.
    loss_sum, correct, margin = (torch.zeros((), dtype=torch.float64, device=accelerator.device) for _ in range(3))
    positions = 0
    for index, micro in enumerate(micros):
        batch = collate_pairwise([items[rank_indices[i]] for i in micro], pad_token_id)
        positions += batch["input_ids"].numel()
        batch = batch_to_device(batch, accelerator.device)
        weight = weights[micro[0]:micro[-1] + 1]
        with micro_batch_context(accelerator, run.model, index == len(micros) - 1), accelerator.autocast():
            chosen, rejected = pair_scores(run.model, batch)
            pair_loss = (-F.logsigmoid(chosen - rejected) * weight).sum()
            accelerator.backward(pair_loss * world / step_pairs)  # DDP averages over processes
        loss_sum += pair_loss.detach().double()
        correct += ((chosen > rejected).float() * weight).sum().double()
        margin += ((chosen - rejected).detach() * weight).sum().double()
    loss, accuracy, margin = (value / step_pairs for value in global_sums(accelerator, loss_sum, correct, margin))
    real_tokens = sum(len(items[i]["chosen_input_ids"]) + len(items[i]["rejected_input_ids"])
                      for i in rank_indices[:real])
    return loss, accuracy, margin, run.count_input_tokens(real_tokens, positions)
