"""Stage `ppo`: align the policy with reward sources under a KL penalty to the reference.

Per PPO step (one rollout batch of per_device_train_batch_size x gradient_accumulation_steps x
ppo_buffer_size prompts per process; with several processes each holds its own share, and the
statistics that span the batch -- reward normalisation, whitening, the KL controller, the token
count that normalises the loss, logged means -- are taken over all processes):
1. rollout     sample responses; truncate after the first stop token; masks
2. score       reward sources on the truncated text; EOS penalty, normalisation, clipping
3. evaluate    old log-probs, values and reference log-probs (logits / temperature)
4. shape       per-token reward = -beta * KL, plus the score on the last real token
5. advantages  GAE(gamma, lambda) -> returns; whitened advantages
6. update      ppo_epochs x shuffled mini-batches x micro-batches; clipped losses; clip; step
7. control     KL controller; statistics; log
Then save the policy (adapter or full model) with its value head beside it.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from rlhfkit.checkpoint import RunCheckpoints
from rlhfkit.config import Config
from rlhfkit.data import collate_prompts
from rlhfkit.errors import fail
from rlhfkit.models.head import LOGITS_BUFFER, reuse_head_output
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.ppo_models import build_ppo_models, trainable_policy_parameters
from rlhfkit.models.value_head import ModelWithValueHead
from rlhfkit.rewards.base import ScoringBatch, build_scoring_batch
from rlhfkit.rewards.model import SharedBaseReward
from rlhfkit.rl import (
    AdaptiveKLController,
    FixedKLController,
    PPOLoss,
    RunningMoments,
    apply_missing_eos_penalty,
    explained_variance,
    kl_penalty,
)
from rlhfkit.rollout import HFGenerator, check_generation_supported, full_weights_for_generation
from rlhfkit.stages.common import load_stage_data, save_trained
from rlhfkit.stages.ppo_steps import (
    LOG_SOFTMAX_BUFFER,
    Rollout,
    compute_advantages,
    evaluate_rollout,
    ppo_update_minibatch,
)
from rlhfkit.tracking.trainer_log import TrainerLog
from rlhfkit.training.batches import step_batches
from rlhfkit.training.distributed import global_sums, is_sharded
from rlhfkit.training.optim import (
    allocate_gradients,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    sparse_embedding_gradients,
)
from rlhfkit.training.control import NonFiniteGuard, active_signals
from rlhfkit.training.runtime import build_accelerator, check_output_dir, seed_everything, seed_per_process

logger = logging.getLogger(__name__)


def rollout_sizes(config: Config) -> tuple[int, int, int]:
    """(micro-batch, mini-batch, rollout batch) per process; rollout = mini x ppo_buffer_size."""
    t = config.training
    micro = t.per_device_train_batch_size
    mini = micro * t.gradient_accumulation_steps
    return micro, mini, mini * config.ppo.ppo_buffer_size


def score_batch(models, batch: ScoringBatch, config: Config, ended: torch.Tensor, moments: RunningMoments,
                accelerator, raw_scores: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the reward sources, then EOS penalty, running normalisation and clipping.

    `raw_scores`, if given, receives each source's raw scores ``(b,)`` by source name.
    """
    p = config.ppo
    total = torch.zeros(len(batch.responses))
    sums: dict[str, tuple[float, float]] = {}  # per source: sum and sum of squares over the rows
    for source, weight in models.rewards:
        raw = source.score(batch)
        if raw_scores is not None:
            raw_scores[source.name] = raw
        sums[source.name] = (float(raw.double().sum()), float((raw.double() ** 2).sum()))
        total += weight * raw
    # Means and standard deviations over every process's rows, in one all-reduce.
    names = list(sums)
    count, reward_sum, *source_sums = global_sums(accelerator, total.numel(), float(total.double().sum()),
                                              *(value for name in names for value in sums[name]))
    stats: dict[str, float] = {}
    for index, name in enumerate(names):
        mean = source_sums[2 * index] / count
        var = max(source_sums[2 * index + 1] / count - mean * mean, 0.0) * count / max(count - 1, 1)
        stats[f"score/{name}"], stats[f"score_std/{name}"] = mean, math.sqrt(var)
    stats["reward"] = reward_sum / count
    total = apply_missing_eos_penalty(total, ended.cpu(), p.missing_eos_penalty)
    if p.ppo_score_norm:
        count, score_sum = global_sums(accelerator, total.numel(), float(total.double().sum()))
        mean = score_sum / count
        (squares,) = global_sums(accelerator, float(((total.double() - mean) ** 2).sum()))
        moments.update_from_moments(mean, squares / count, int(count))
        total = (total - moments.mean) / (moments.std + 1e-8)
    if p.reward_clip is not None:
        total = total.clamp(-p.reward_clip, p.reward_clip)
    return total, stats


def run_ppo(config: Config) -> dict[str, float]:
    """Train the policy with PPO; return the final statistics."""
    accelerator = build_accelerator(config)
    check_generation_supported(accelerator)
    t, g, p = config.training, config.generation, config.ppo
    seed_everything(t.seed)  # the same initial weights (new LoRA adapter) on every process
    output_dir = check_output_dir(config)
    device = accelerator.device
    world = accelerator.num_processes
    # Set-up: prompts, models, optimizer.
    tokenizer = load_tokenizer(config.model)
    data = load_stage_data(config, tokenizer)
    micro_size, mini_size, rollout_size = rollout_sizes(config)
    global_rollout = rollout_size * world
    if len(data.train) < global_rollout:
        raise fail(f"dataset {config.data.dataset} yields {len(data.train)} prompts, fewer than one rollout batch "
                   f"({global_rollout} = per_device_train_batch_size x gradient_accumulation_steps x "
                   f"ppo_buffer_size x processes); add prompts or lower those sizes")
    total_steps = t.max_steps if t.max_steps > 0 else max(
        1, math.ceil(t.num_train_epochs * math.ceil(len(data.train) / global_rollout)))
    models = build_ppo_models(config, tokenizer, device)
    named_params = trainable_policy_parameters(models)
    optimizer = build_optimizer(named_params, t)
    optimizer_steps = total_steps * p.ppo_epochs * p.ppo_buffer_size
    scheduler = build_scheduler(optimizer, t, optimizer_steps)
    # The policy and its value head are one module for accelerate (DeepSpeed and FSDP2 take one model).
    policy, optimizer = accelerator.prepare(ModelWithValueHead(models.policy, models.value_head), optimizer)
    params = [param for param in policy.parameters() if param.requires_grad]  # FSDP replaces the parameters
    keep_gradients = allocate_gradients(accelerator, params)  # one block, before any pass
    if keep_gradients:
        sparse_embedding_gradients(accelerator, policy)  # token rows added into that block
    # Forward passes on the shared base go through the prepared module, which DDP/FSDP/DeepSpeed watch.
    reference = policy if models.reference is models.policy else models.reference
    if not is_sharded(accelerator):  # logits into kept memory; the head's gradient into its buffer
        reuse_head_output(models.policy, accumulate=keep_gradients and world == 1)
        if models.reference is not models.policy:
            reuse_head_output(models.reference, accumulate=False)
    for source, _ in models.rewards:
        if isinstance(source, SharedBaseReward):
            source.forward_model = policy
    seed_per_process(t.seed, accelerator.process_index)
    generator = HFGenerator(tokenizer, g, data.template.stop_token_ids(tokenizer))
    loss_fn = PPOLoss(p.cliprange, p.cliprange_value, p.vf_coef, p.entropy_coef)
    kl_controller = (AdaptiveKLController(p.kl_coef, p.ppo_target, p.kl_horizon) if p.adaptive_kl
                     else FixedKLController(p.kl_coef))
    score_moments = RunningMoments()
    guard = NonFiniteGuard(t.max_bad_steps)
    modules = {"policy": models.policy, "value_head": models.value_head}
    checkpoints = RunCheckpoints(config, accelerator, output_dir, modules, optimizer, scheduler, tokenizer,
                                 modules["policy"], modules["value_head"], prepared=policy)
    resumed = checkpoints.resume()
    if resumed["step"]:
        kl_controller.load_state_dict(resumed["kl_controller"])
        score_moments.load_state_dict(resumed["score_moments"])
        guard.load_state_dict(resumed["guard"])
    signals = active_signals()
    log = TrainerLog(output_dir, total_steps, enabled=accelerator.is_main_process,
                     console_keys=("reward", "kl", "loss", "response_length", "seconds_per_step"),
                     start_step=resumed["step"], config=config)
    logger.info("ppo: %d prompts, %d steps; rollout batch %d (x%d processes), mini-batch %d, micro-batch %d, "
                "%d epochs", len(data.train), total_steps, rollout_size, world, mini_size, micro_size, p.ppo_epochs)
    final: dict[str, float] = {}
    for plan in step_batches(len(data.train), global_rollout, t.seed, start_step=resumed["step"], fill_last=True):
        if plan.step >= total_steps:
            break
        step_start = time.time()
        timings: dict[str, float] = {}
        items = [data.train[i] for i in plan.indices[accelerator.process_index::world]]
        # 1. rollout
        tick = time.time()
        prompts = collate_prompts(items, tokenizer.pad_token_id)
        query_ids, query_mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
        with full_weights_for_generation(accelerator, policy) as unwrapped:
            generated = generator.generate(unwrapped.model, query_ids, query_mask, record=p.logprobs_from_rollout,
                                           value_head=unwrapped.value_head)
        response_ids, response_mask = generated.response_ids, generated.response_mask
        timings["time/rollout"] = time.time() - tick
        # 2. score
        tick = time.time()
        scoring = build_scoring_batch(tokenizer, items, query_ids, query_mask, response_ids, response_mask)
        responses, ids, mask = scoring.responses, scoring.sequence_ids, scoring.sequence_mask
        raw_scores: dict[str, torch.Tensor] = {}
        scores, score_stats = score_batch(models, scoring, config, generated.ended_with_stop, score_moments,
                                          accelerator, raw_scores)
        scores = scores.to(device)
        timings["time/score"] = time.time() - tick
        # 3. evaluate
        tick = time.time()
        evaluated = evaluate_rollout(policy, None, reference, models.reference_context, ids, mask,
                                     response_ids, g.temperature, t.per_device_eval_batch_size,
                                     recorded=generated if p.logprobs_from_rollout else None)
        timings["time/evaluate"] = time.time() - tick
        # 4. shape and 5. advantages
        float_mask = response_mask.float()
        rewards, advantages, returns, kl = compute_advantages(
            scores, evaluated["logprobs"], evaluated["ref_logprobs"], evaluated["values"], float_mask,
            kl_controller.value, p.kl_estimator, p.gamma, p.lam, p.ppo_whiten_rewards, p.whiten_advantages,
            accelerator)
        rollout = Rollout(query_ids, query_mask, response_ids, response_mask, scores, evaluated["logprobs"],
                          evaluated["ref_logprobs"], evaluated["values"] * float_mask, advantages, returns)
        # 6. update
        tick = time.time()
        update_stats: dict[str, float] = {}
        updates = 0
        shuffle = torch.Generator().manual_seed(t.seed * 7919 + plan.step)
        rewards_ok = guard.ok(global_sums(accelerator, scores.sum())[0], what="rewards", step=plan.step + 1)
        for _ in range(p.ppo_epochs if rewards_ok else 0):
            order = torch.randperm(len(items), generator=shuffle)  # seeded by step: resumable
            for begin in range(0, len(items), mini_size):
                minibatch = rollout.select(order[begin:begin + mini_size])
                stats = ppo_update_minibatch(accelerator, policy, None, loss_fn, minibatch, micro_size,
                                             g.temperature, world)
                skip = not guard.ok(stats["loss"], what="loss", step=plan.step + 1)
                stats["grad_norm"] = clip_and_step(accelerator, policy, optimizer, scheduler, t.max_grad_norm,
                                                   params, skip=skip, keep_gradients=keep_gradients)
                if skip or not guard.ok(stats["grad_norm"], what="gradients", step=plan.step + 1):
                    continue
                for key, value in stats.items():
                    update_stats[key] = update_stats.get(key, 0.0) + value
                updates += 1
        timings["time/update"] = time.time() - tick
        # 7. control and statistics
        k1 = kl_penalty(evaluated["logprobs"], evaluated["ref_logprobs"], "k1")
        k3 = kl_penalty(evaluated["logprobs"], evaluated["ref_logprobs"], "k3")
        # Per-response means over every process's rows, in one all-reduce.
        rows, kl_sum, k1_sum, k3_sum, shaped_sum, length_sum, ended_sum, entropy_sum = global_sums(
            accelerator, len(items), (kl * float_mask).sum(), (k1 * float_mask).sum(), (k3 * float_mask).sum(),
            (rewards * float_mask).sum(), response_mask.sum(), generated.ended_with_stop.sum(),
            (evaluated["entropy"] * float_mask).sum())
        beta = kl_controller.value
        kl_controller.update(kl_sum / rows, global_rollout)
        step = plan.step + 1
        elapsed = time.time() - step_start
        generated_tokens = float(response_mask.sum())
        record = {
            **{key: value / max(updates, 1) for key, value in update_stats.items()},
            "skipped_updates": guard.total,
            **score_stats,
            "kl": k1_sum / rows, "kl_k3": k3_sum / rows,
            "kl_coef": beta, "shaped_reward": shaped_sum / rows,
            "entropy_rollout": entropy_sum / max(length_sum, 1.0),
            "explained_variance": float(explained_variance(rollout.values, returns, float_mask)),  # this process's
            "response_length": length_sum / rows,
            "ended_with_eos": ended_sum / rows,
            "lr": scheduler.get_last_lr()[0], "epoch": round(plan.epoch, 4),
            **timings, "seconds_per_step": elapsed,
            "tokens_per_second": generated_tokens / max(timings["time/rollout"], 1e-9),
        }
        log.advance(step)
        if step % config.output.logging_steps == 0 or step == total_steps or step == 1:
            log.log(step, record)
            log.log_samples(step, scoring.prompts, responses, raw_scores, scores, (k1 * float_mask).sum(-1))
        final = record
        checkpoints.after_step(step, total_steps, signals, {
            "kl_controller": kl_controller.state_dict(), "score_moments": score_moments.state_dict(),
            "guard": guard.state_dict()})
    log.close()  # progress bar, TensorBoard, plots
    LOGITS_BUFFER.release()
    LOG_SOFTMAX_BUFFER.release()
    # Save the policy without the value head; the head goes beside it for further training.
    save_trained(accelerator, policy, modules, tokenizer, output_dir)
    return final
