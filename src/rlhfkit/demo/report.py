"""The demo's report: SFT vs PPO policy on held-out prompts, judged by the gold judge and the RM."""

from __future__ import annotations

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


def write_report(work: Path, model_dir: Path, sft_dir: Path, rm_dir: Path, ppo_dir: Path, prompts: list[str],
                 max_new_tokens: int, timings: dict[str, float]) -> Path:
    """Sample both policies on `prompts` with the same seed, score, and write report.md + PNG."""
    logger.info("== report: sampling SFT and PPO policies on %d held-out prompts", len(prompts))
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    sft_policy = load_policy(model_dir, sft_dir)
    sft = sample(sft_policy, None, tokenizer, prompts, max_new_tokens, 1.0, SAMPLING_SEED, label="report, SFT policy")
    ppo_policy = load_policy(model_dir, ppo_dir)
    ppo = sample(ppo_policy, sft_policy, tokenizer, prompts, max_new_tokens, 1.0, SAMPLING_SEED,
                 label="report, PPO policy")
    del ppo_policy, sft_policy
    gold = {"sft": task.gold_score(sft.responses), "ppo": task.gold_score(ppo.responses)}
    proxy = {"sft": reward_model_scores(model_dir, rm_dir, prompts, sft.responses),
             "ppo": reward_model_scores(model_dir, rm_dir, prompts, ppo.responses)}
    difference = [b - a for a, b in zip(gold["sft"], gold["ppo"])]
    rows = []
    for name, samples in (("SFT", sft), ("PPO", ppo)):
        key = name.lower()
        low, high = bootstrap_interval(gold[key])
        rows.append(f"| {name} | {_mean(gold[key]):+.3f} [{low:+.3f}, {high:+.3f}] | {_mean(proxy[key]):+.3f} | "
                    f"{_mean(samples.kl_to_reference):.2f} | {_mean(samples.lengths):.1f} | "
                    f"{_mean(samples.ended):.0%} |")
    diff_low, diff_high = bootstrap_interval(difference)
    rm_log = (rm_dir / "demo_stage_done.json")
    rm_accuracy = None
    if rm_log.is_file():
        import json

        rm_accuracy = json.loads(rm_log.read_text()).get("eval_accuracy")
    train_pairs, heldout_pairs = (_count_lines(work / "data" / PAIR_FILES[split]) for split in ("train", "heldout"))
    plot = plot_rewards(ppo_dir, work / "gold_vs_proxy.png")
    lines = [
        "# rlhfkit demo report",
        "",
        task.TASK_DESCRIPTION,
        "",
        f"Held-out prompts: {len(prompts)} (never used in training); both policies sampled with seed "
        f"{SAMPLING_SEED}, temperature 1.0, at most {max_new_tokens} new tokens.",
        "",
        "| policy | gold score (95% CI) | proxy (RM) score | KL to reference (nats) | length (tokens) | ended with EOS |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"**PPO − SFT gold score: {_mean(difference):+.3f}** (95% bootstrap CI [{diff_low:+.3f}, {diff_high:+.3f}]"
        f"{', excludes 0' if diff_low > 0 or diff_high < 0 else ', includes 0'}).",
        "",
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
        lines += [f"**{prompts[index]}**", "",
                  f"- SFT ({gold['sft'][index]:+.2f}): {sft.responses[index].strip()}",
                  f"- PPO ({gold['ppo'][index]:+.2f}): {ppo.responses[index].strip()}", ""]
    report = work / "report.md"
    report.write_text("\n".join(lines) + "\n")
    summary = (f"gold SFT {_mean(gold['sft']):+.3f} -> PPO {_mean(gold['ppo']):+.3f} "
               f"(diff {_mean(difference):+.3f}, CI [{diff_low:+.3f}, {diff_high:+.3f}]); "
               f"proxy {_mean(proxy['sft']):+.3f} -> {_mean(proxy['ppo']):+.3f}; "
               f"KL {_mean(ppo.kl_to_reference):.2f}; RM accuracy {rm_accuracy}")
    logger.info("== report: %s", summary)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return report
