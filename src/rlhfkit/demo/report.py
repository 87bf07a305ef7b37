"""The demo's report: SFT vs the trained policies on held-out prompts, judged by the gold judge and the RM."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer

from rlhfkit.demo import task
from rlhfkit.demo.pairs import PAIR_FILES, TIE_MARGIN
from rlhfkit.demo.sampling import load_policy, reward_model_scores, sample
from rlhfkit.tracking.summary import bootstrap_interval
from rlhfkit.tracking.trainer_log import read_trainer_log

logger = logging.getLogger(__name__)

SAMPLING_SEED = 1234


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def plot_rewards(ppo_dir: Path, path: Path) -> Path | None:
    """Gold and proxy (RM) score along the PPO steps, in one PNG."""
    records = [r for r in read_trainer_log(ppo_dir) if "score/rm" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["current_steps"] for r in records]
    fig, proxy_axis = plt.subplots(figsize=(7, 4))
    proxy_axis.plot(steps, [r["score/rm"] for r in records], color="tab:blue", label="proxy (reward model)")
    proxy_axis.set_xlabel("PPO step")
    proxy_axis.set_ylabel("reward model score", color="tab:blue")
    gold_axis = proxy_axis.twinx()
    gold_axis.plot(steps, [r["score/gold"] for r in records], color="tab:orange", label="gold (VADER)")
    gold_axis.set_ylabel("gold score (VADER compound)", color="tab:orange")
    fig.suptitle("Proxy vs gold reward during PPO (over-optimisation shows as a gap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _generated_tokens(policy_dir: Path) -> float:
    """Tokens the policy generated during training: rollout speed x rollout time, summed over the steps."""
    return sum(r.get("tokens_per_second", 0.0) * r.get("time/rollout", 0.0) for r in read_trainer_log(policy_dir))


def _stage_seconds(policy_dir: Path) -> float | None:
    done = policy_dir / "demo_stage_done.json"
    return json.loads(done.read_text())["seconds"] if done.is_file() else None


def write_report(work: Path, model_dir: Path, sft_dir: Path, rm_dir: Path, policies: dict[str, Path],
                 prompts: list[str], max_new_tokens: int, timings: dict[str, float],
                 device: torch.device = torch.device("cpu")) -> Path:
    """Sample the SFT policy and each trained policy (`policies`: name -> folder, PPO first) on `prompts`
    with the same seed on `device`, score them, and write report.md + PNG."""
    logger.info("== report: sampling SFT and %s on %d held-out prompts", ", ".join(policies), len(prompts))
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    sft_policy = load_policy(model_dir, sft_dir, device)
    samples = {"SFT": sample(sft_policy, reference=None, tokenizer=tokenizer, prompts=prompts,
                             max_new_tokens=max_new_tokens, temperature=1.0, seed=SAMPLING_SEED,
                             label="report, SFT policy")}
    for name, policy_dir in policies.items():
        policy = load_policy(model_dir, policy_dir, device)
        samples[name] = sample(policy, sft_policy, tokenizer, prompts, max_new_tokens, 1.0, SAMPLING_SEED,
                               label=f"report, {name} policy")
        del policy
    del sft_policy
    gold = {name: task.gold_score(s.responses) for name, s in samples.items()}
    proxy = {name: reward_model_scores(model_dir, rm_dir, prompts, s.responses, device=device)
             for name, s in samples.items()}
    rows = []
    for name, policy_samples in samples.items():
        low, high = bootstrap_interval(gold[name])
        rows.append(f"| {name} | {_mean(gold[name]):+.3f} [{low:+.3f}, {high:+.3f}] | {_mean(proxy[name]):+.3f} | "
                    f"{_mean(policy_samples.kl_to_reference):.2f} | {_mean(policy_samples.lengths):.1f} | "
                    f"{_mean(policy_samples.ended):.0%} |")
    differences = {name: [b - a for a, b in zip(gold["SFT"], gold[name])] for name in policies}
    verdicts = []
    for name, difference in differences.items():
        diff_low, diff_high = bootstrap_interval(difference)
        verdicts.append(f"**{name} − SFT gold score: {_mean(difference):+.3f}** (95% bootstrap CI "
                        f"[{diff_low:+.3f}, {diff_high:+.3f}]"
                        f"{', excludes 0' if diff_low > 0 or diff_high < 0 else ', includes 0'}).")
    training = ["| policy | training wall time | generated tokens | KL to reference (nats) |", "|---|---|---|---|"]
    for name, policy_dir in policies.items():
        seconds = _stage_seconds(policy_dir)
        training.append(f"| {name} | {'' if seconds is None else f'{seconds:.0f} s'} | "
                        f"{_generated_tokens(policy_dir):,.0f} | {_mean(samples[name].kl_to_reference):.2f} |")
    rm_log = (rm_dir / "demo_stage_done.json")
    rm_accuracy = json.loads(rm_log.read_text()).get("eval_accuracy") if rm_log.is_file() else None
    train_pairs, heldout_pairs = (_count_lines(work / "data" / PAIR_FILES[split]) for split in ("train", "heldout"))
    plot = plot_rewards(next(iter(policies.values())), work / "gold_vs_proxy.png")
    lines = [
        "# rlhfkit demo report",
        "",
        task.TASK_DESCRIPTION,
        "",
        f"Held-out prompts: {len(prompts)} (never used in training); every policy sampled with seed "
        f"{SAMPLING_SEED}, temperature 1.0, at most {max_new_tokens} new tokens.",
        "",
        "| policy | gold score (95% CI) | proxy (RM) score | KL to reference (nats) | length (tokens) | ended with EOS |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *verdicts,
        "",
        *(training + [""] if len(policies) > 1 else []),
        f"Reward model accuracy on {heldout_pairs} held-out pairs (prompts never trained on): {rm_accuracy:.1%}."
        if rm_accuracy is not None else "",
        f"Preference pairs: {train_pairs} for training, {heldout_pairs} held out (two SFT samples per prompt, "
        f"ordered by the gold judge; pairs within {TIE_MARGIN} gold points dropped as ties).",
        "",
        "Stage wall times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".",
        "",
        f"![gold vs proxy]({plot.name})" if plot else "",
        "",
        "## Samples (same prompt, same seed)",
        "",
    ]
    for index in range(min(5, len(prompts))):
        lines += [f"**{prompts[index]}**", ""]
        lines += [f"- {name} ({gold[name][index]:+.2f}): {s.responses[index].strip()}" for name, s in samples.items()]
        lines += [""]
    report = work / "report.md"
    report.write_text("\n".join(lines) + "\n")
    summary = "; ".join(f"gold SFT {_mean(gold['SFT']):+.3f} -> {name} {_mean(gold[name]):+.3f} "
                        f"(diff {_mean(differences[name]):+.3f}), KL {_mean(samples[name].kl_to_reference):.2f}"
                        for name in policies)
    logger.info("== report: %s; RM accuracy %s", summary, rm_accuracy)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return report
