"""Stage `ppo`: align the policy with reward sources under a KL penalty to the reference.

Per PPO step (one rollout batch of per_device_train_batch_size x gradient_accumulation_steps x
ppo_buffer_size prompts per process; with several processes each holds its own share, and the
statistics that span the batch -- reward normalisation, whitening, the KL controller, the token
count that normalises the loss, logged means -- are taken over all processes):
1. rollout     sample responses (the rollout engine: `rollout.engine`); truncate after the first stop
               token; masks
2. score       reward sources on the truncated text; EOS penalty, normalisation, clipping
3. evaluate    old log-probs, values and reference log-probs (logits / temperature)
4. shape       per-token reward = -beta * KL, plus the score on the last real token
5. advantages  GAE(gamma, lambda) -> returns; whitened advantages (or a critic-free estimator:
               advantage_estimator, over num_generations responses per prompt; no value head)
6. update      ppo_epochs x shuffled mini-batches x micro-batches; clipped losses; clip; step
7. control     KL controller; statistics; log
Then save the policy (adapter or full model) with its value head, if any, beside it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch

from rlhfkit.config import Config
from rlhfkit.data import collate_prompts
from rlhfkit.errors import fail
from rlhfkit.models.loading import load_tokenizer
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
from rlhfkit.rollout import GeneratedBatch, build_rollout_engine, check_generation_supported, full_weights_for_generation
from rlhfkit.stages.common import load_stage_data, save_trained
from rlhfkit.stages.ppo_models import PPOModels, build_ppo_models, trainable_policy_parameters
from rlhfkit.stages.ppo_advantages import estimate_advantages, informative_groups
from rlhfkit.stages.ppo_steps import Evaluation, Rollout, evaluate_rollout, group_rows, ppo_update
from rlhfkit.stages.setup import Training, prepare_training, start_run
from rlhfkit.training.batches import step_batches
from rlhfkit.training.distributed import global_sums, is_sharded

logger = logging.getLogger(__name__)


@dataclass
class RolloutSizes:
    """Prompts per process: micro-batch (one forward/backward pass), mini-batch (one optimizer step) and
    rollout batch (one PPO step) = mini-batch x ppo_buffer_size, each x num_generations responses;
    `steps`: PPO steps of the run."""

    micro: int
    mini: int
    rollout: int
    steps: int


def rollout_sizes(config: Config, processes: int, prompts: int) -> RolloutSizes:
    """The run's batch sizes; fails when the data holds fewer prompts than one rollout batch."""
    t = config.training
    micro = t.per_device_train_batch_size
    mini = micro * t.gradient_accumulation_steps
    rollout = mini * config.ppo.ppo_buffer_size
    if prompts < rollout * processes:
        raise fail(f"dataset {config.data.dataset} yields {prompts} prompts, fewer than one rollout batch "
                   f"({rollout * processes} = per_device_train_batch_size x gradient_accumulation_steps x "
                   f"ppo_buffer_size x processes); add prompts or lower those sizes")
    steps = t.max_steps if t.max_steps > 0 else max(
        1, math.ceil(t.num_train_epochs * math.ceil(prompts / (rollout * processes))))
    return RolloutSizes(micro, mini, rollout, steps)


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str):
    """Add the seconds spent inside to ``timings[f"time/{phase}"]``."""
    start = time.time()
    yield
    timings[f"time/{phase}"] = time.time() - start


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
    t, g, p = config.training, config.generation, config.ppo
    accelerator, output_dir = start_run(config)
    check_generation_supported(accelerator)
    device, world = accelerator.device, accelerator.num_processes
    tokenizer = load_tokenizer(config.model)
    data = load_stage_data(config, tokenizer)
    sizes = rollout_sizes(config, world, len(data.train))
    models = build_ppo_models(config, tokenizer, device)
    critic = {"value_head": models.value_head} if models.value_head is not None else {}
    modules = {"policy": models.policy, **critic}
    group = p.num_generations
    # The policy and its value head are one module for accelerate (DeepSpeed and FSDP2 take one model).
    with prepare_training(config, accelerator, output_dir, ModelWithValueHead(models.policy, models.value_head),
                          trainable_policy_parameters(models), modules, tokenizer, sizes.steps,
                          console_keys=("reward", "kl", "loss", "response_length", "seconds_per_step"),
                          optimizer_steps=sizes.steps * p.ppo_epochs * p.ppo_buffer_size) as run:
        policy = run.model
        reference = attach_models(run, models)
        engine = build_rollout_engine(g, tokenizer, data.template.stop_token_ids(tokenizer), p.logprobs_from_rollout,
                                      models.policy, device, is_sharded(accelerator), run.speedups, config.source,
                                      compute_dtype=torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else None)
        loss_fn = PPOLoss(p.cliprange_low, p.cliprange_value, p.vf_coef, p.entropy_coef, p.cliprange_high,
                          p.kl_loss_coef, p.kl_estimator, p.loss_aggregation, g.max_new_tokens)
        kl_controller = (AdaptiveKLController(p.kl_coef, p.ppo_target, p.kl_horizon) if p.adaptive_kl
                         else FixedKLController(p.kl_coef))
        score_moments = RunningMoments()
        if run.resumed["step"]:
            kl_controller.load_state_dict(run.resumed["kl_controller"])
            score_moments.load_state_dict(run.resumed["score_moments"])
        logger.info("ppo (%s): %d prompts, %d steps; rollout batch %d prompts (x%d processes) x %d responses, "
                    "mini-batch %d, micro-batch %d, %d epochs", p.advantage_estimator, len(data.train), sizes.steps,
                    sizes.rollout, world, group, sizes.mini, sizes.micro, p.ppo_epochs)
        final: dict[str, float] = {}
        for plan in step_batches(len(data.train), sizes.rollout * world, t.seed, start_step=run.resumed["step"],
                                 fill_last=True):
            if plan.step >= sizes.steps:
                break
            step, step_start, timings = plan.step + 1, time.time(), {}
            items = [data.train[i] for i in plan.indices[accelerator.process_index::world] for _ in range(group)]
            # 1. rollout
            with timed(timings, "rollout"):
                prompts = collate_prompts(items, tokenizer.pad_token_id)
                query_ids, query_mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
                with full_weights_for_generation(accelerator, policy) as unwrapped:
                    engine.sync_weights(unwrapped.model, unwrapped.value_head)
                    generated = engine.generate(query_ids, query_mask)
            # 2. score
            with timed(timings, "score"):
                scoring = build_scoring_batch(tokenizer, data.template, items, query_ids, query_mask,
                                              generated.response_ids, generated.response_mask)
                raw_scores: dict[str, torch.Tensor] = {}
                scores, score_stats = score_batch(models, scoring, config, generated.ended_with_stop, score_moments,
                                                  accelerator, raw_scores)
                scores = scores.to(device)
            # 3. evaluate (in the update's precision: old and new log-probs from the same computation)
            with timed(timings, "evaluate"), accelerator.autocast():
                evaluated = evaluate_rollout(policy, value_head=None, reference=reference,
                                             reference_context=models.reference_context, ids=scoring.sequence_ids,
                                             mask=scoring.sequence_mask, response_ids=generated.response_ids,
                                             temperature=g.temperature, chunk_size=t.per_device_eval_batch_size,
                                             recorded=generated if engine.records else None,
                                             with_values=models.value_head is not None,
                                             logits_chunk_size=t.logits_chunk_size)
            # 4. shape and 5. advantages
            mask = generated.response_mask.float()
            rewards, advantages, returns, kl = estimate_advantages(p, scores, evaluated, mask, kl_controller.value,
                                                                   accelerator)
            values = None if evaluated.values is None else evaluated.values * mask
            rollout = Rollout(query_ids, query_mask, generated.response_ids, generated.response_mask, scores,
                              evaluated.logprobs, evaluated.ref_logprobs, values, advantages, returns)
            # 6. update (none when a reward is not finite)
            with timed(timings, "update"):
                rewards_ok = run.guard.ok(global_sums(accelerator, scores.sum())[0], what="rewards", step=step)
                kept, group_stats = kept_groups(rollout, group, p.filter_groups, accelerator)
                update_stats = ppo_update(run, loss_fn, kept, sizes.mini * group, sizes.micro * group,
                                          p.ppo_epochs if rewards_ok else 0, g.temperature, step, group)
            # 7. control and statistics
            record = step_statistics(run, generated, evaluated, rollout, rewards, kl, returns, kl_controller,
                                     sizes.rollout * group * world)
            # the prompt and response tokens of this process's rollout, once (not per PPO epoch)
            tokens = run.count_input_tokens(int(query_mask.sum() + generated.response_mask.sum()),
                                            query_ids.numel() + generated.response_ids.numel())
            record.update(update_stats, **group_stats, **score_stats, **tokens, epoch=round(plan.epoch, 4), **timings,
                          seconds_per_step=time.time() - step_start,
                          tokens_per_second=float(generated.response_mask.sum()) / max(timings["time/rollout"], 1e-9))
            run.log.advance(step)
            if step % config.output.logging_steps == 0 or step == sizes.steps or step == 1:
                run.log.log(step, record)
                run.log.log_samples(step, scoring.prompts, scoring.responses, raw_scores, scores,
                                    (kl_penalty(evaluated.logprobs, evaluated.ref_logprobs, "k1") * mask).sum(-1))
            final = record
            run.after_step(step, sizes.steps, {"kl_controller": kl_controller.state_dict(),
                                               "score_moments": score_moments.state_dict()})
        run.log.close()  # progress bar, TensorBoard, plots
        # Save the policy without the value head; the head goes beside it for further training.
        save_trained(accelerator, policy, modules, tokenizer, output_dir, config)
    return final


def attach_models(run: Training, models: PPOModels):
    """Route the reference and the shared-base reward sources through the prepared module (which
    DDP/FSDP/DeepSpeed watch), install the CPU's head buffers; returns the reference to run."""
    frozen = [] if models.reference is models.policy else [models.reference]
    run.model.eval()  # outside the update (`ppo_update` trains with checkpointing): the same mode everywhere
    run.speedups.head_buffers(models.policy, *frozen)
    for source, _ in models.rewards:
        if isinstance(source, SharedBaseReward):
            source.forward_model = run.model
    return models.reference if frozen else run.model


def step_statistics(run: Training, generated: GeneratedBatch, evaluated: Evaluation, rollout: Rollout,
                    rewards: torch.Tensor, kl: torch.Tensor, returns: torch.Tensor, kl_controller,
                    global_rollout: int) -> dict[str, float]:
    """Per-response means over every process's rows (one all-reduce); updates the KL controller
    with the step's KL. `rewards` and `kl` ``(b, R)`` are the shaped rewards and the penalty's KL."""
    mask = generated.response_mask.float()
    k1 = kl_penalty(evaluated.logprobs, evaluated.ref_logprobs, "k1")
    k3 = kl_penalty(evaluated.logprobs, evaluated.ref_logprobs, "k3")
    rows, kl_sum, k1_sum, k3_sum, shaped_sum, length_sum, ended_sum, entropy_sum = global_sums(
        run.accelerator, len(mask), (kl * mask).sum(), (k1 * mask).sum(), (k3 * mask).sum(),
        (rewards * mask).sum(), generated.response_mask.sum(), generated.ended_with_stop.sum(),
        (evaluated.entropy * mask).sum())
    beta = kl_controller.value
    kl_controller.update(kl_sum / rows, global_rollout)
    record = {
        "skipped_updates": run.guard.total,
        "kl": k1_sum / rows, "kl_k3": k3_sum / rows, "kl_coef": beta, "shaped_reward": shaped_sum / rows,
        "entropy_rollout": entropy_sum / max(length_sum, 1.0),
        "response_length": length_sum / rows,
        "ended_with_eos": ended_sum / rows,
        "lr": run.scheduler.get_last_lr()[0],
    }
    if returns is not None:  # meaningless without a critic: absent, not zero
        record["explained_variance"] = float(explained_variance(rollout.values, returns, mask))  # this process's
    return record


def kept_groups(rollout: Rollout, group: int, filter_groups: bool, accelerator) -> tuple[Rollout, dict[str, float]]:
    """The rollout the update trains on: with `filter_groups`, without the groups whose scores are all
    equal (no signal for a group baseline); their count over every process is logged."""
    if not filter_groups:
        return rollout, {}
    if accelerator.num_processes > 1:  # processes would run different numbers of mini-batches
        raise fail("filter_groups runs on one process only; turn it off for a multi-process launch")
    keep = informative_groups(rollout.scores, group)
    (dropped,) = global_sums(accelerator, float((~keep).sum()))
    return rollout.select(group_rows(keep.nonzero().squeeze(-1), group)), {"filtered_groups": dropped}
