"""`rlhfkit demo`: SFT -> preference pairs -> RM -> PPO -> report, on the movie-review task.

Each training stage runs through the same configs a user would write (examples/demo/*.yaml),
with the paths of this run filled in. A stage whose output folder is complete is reused unless
`fresh`; `quick` swaps SmolLM2 for a tiny model and shrinks every size, for CI.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import build_config, read_yaml
from rlhfkit.demo import task
from rlhfkit.demo.report import write_report
from rlhfkit.demo.sampling import load_policy, sample
from rlhfkit.errors import fail
from rlhfkit.stages import run_stage

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[3] / "examples" / "demo"
GOLD_FUNCTION = "rlhfkit.demo.task:gold_reward"
TIE_MARGIN = 0.1
"""Pairs whose gold scores differ by less than this are ties and dropped."""

FULL = {"sft_examples": 480, "pair_prompts": 288, "heldout": 120, "max_new_tokens": 40, "overrides": {}}
QUICK = {
    "sft_examples": 48, "pair_prompts": 48, "heldout": 16, "max_new_tokens": 12,
    "overrides": {
        "sft": {"max_steps": 6, "learning_rate": 3e-2},
        "rm": {"max_steps": 6, "learning_rate": 3e-2},
        "ppo": {"max_steps": 3, "per_device_train_batch_size": 8, "ppo_buffer_size": 1, "max_new_tokens": 12,
                "learning_rate": 1e-2},
    },
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _stage(name: str, model_dir: Path, data_dir: Path, output_dir: Path, extra: dict[str, Any],
           fresh: bool) -> Path:
    """Run examples/demo/<name>.yaml with this run's paths, unless its result already exists."""
    done_marker = output_dir / "demo_stage_done.json"
    if done_marker.is_file() and not fresh:
        logger.info("== %s: reusing %s", name, output_dir)
        return output_dir
    config_path = CONFIG_DIR / f"{name}.yaml"
    if not config_path.is_file():
        raise fail(f"demo config {config_path} is missing; run the demo from a source checkout (make demo)")
    values = read_yaml(config_path)
    values.update(model_name_or_path=str(model_dir), dataset_dir=str(data_dir), output_dir=str(output_dir),
                  overwrite_output_dir=True, **extra)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    logger.info("== %s: %s", name, config_path)
    started = time.time()
    final = run_stage(build_config(values, source=str(config_path)))
    done_marker.write_text(json.dumps({"seconds": round(time.time() - started, 1), **final}, default=float))
    return output_dir


def _prepare_data(data_dir: Path, sizes: dict) -> tuple[list[str], list[str]]:
    data_dir.mkdir(parents=True, exist_ok=True)
    train_prompts, heldout_prompts = task.demo_prompts()
    _write_jsonl(data_dir / "sft.jsonl", task.sft_examples(num_examples=sizes["sft_examples"]))
    _write_jsonl(data_dir / "prompts.jsonl", [{"instruction": p} for p in train_prompts])
    info = {
        "demo_sft": {"file_name": "sft.jsonl"},
        "demo_prompts": {"file_name": "prompts.jsonl"},
        "demo_pairs": {"file_name": "pairs.jsonl", "ranking": True,
                       "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
    }
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return train_prompts, heldout_prompts[: sizes["heldout"]]


def _label_pairs(model_dir: Path, sft_dir: Path, prompts: list[str], data_dir: Path, max_new_tokens: int,
                 fresh: bool) -> dict[str, float]:
    """Two SFT samples per prompt, ordered by the gold judge; near-ties dropped."""
    path = data_dir / "pairs.jsonl"
    if path.is_file() and not fresh:
        logger.info("== pairs: reusing %s", path)
        return {}
    from transformers import AutoTokenizer

    logger.info("== pairs: sampling 2 responses for %d prompts from the SFT policy", len(prompts))
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    policy = load_policy(model_dir, sft_dir)
    first = sample(policy, None, tokenizer, prompts, max_new_tokens, 1.0, seed=1, label="pairs, first samples")
    second = sample(policy, None, tokenizer, prompts, max_new_tokens, 1.0, seed=2, label="pairs, second samples")
    scores_a, scores_b = task.gold_score(first.responses), task.gold_score(second.responses)
    rows = []
    for prompt, a, b, score_a, score_b in zip(prompts, first.responses, second.responses, scores_a, scores_b):
        if abs(score_a - score_b) < TIE_MARGIN or not a.strip() or not b.strip():
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        rows.append({"instruction": prompt, "chosen": chosen, "rejected": rejected})
    if len(rows) < 8:
        raise fail(f"only {len(rows)} preference pairs survived the tie rule; the SFT policy's samples are too alike")
    _write_jsonl(path, rows)
    logger.info("== pairs: %d pairs kept of %d prompts (ties within %.2f dropped)", len(rows), len(prompts),
                TIE_MARGIN)
    return {"pairs": len(rows), "prompts": len(prompts)}


def _written_pairs(count: int, data_dir: Path) -> dict[str, float]:
    """Quick mode: pairs of written reviews (positive chosen over negative, as VADER confirms).

    A tiny random model writes gibberish that the gold judge scores 0, so its own samples would
    all be ties; the written reviews exercise the same RM stage.
    """
    import random

    rng = random.Random(0)
    rows = []
    for spec in task.demo_prompt_specs()[0][:count]:
        good, bad = task.write_review(spec, "positive", rng), task.write_review(spec, "negative", rng)
        if good and bad:
            rows.append({"instruction": spec.text, "chosen": good, "rejected": bad})
    _write_jsonl(data_dir / "pairs.jsonl", rows)
    return {"pairs": len(rows), "prompts": count}


def _base_model(quick: bool, work_dir: Path) -> Path:
    if quick:
        from rlhfkit.models.tiny import build_tiny_model

        model_dir = work_dir / "tiny-model"
        if not (model_dir / "config.json").is_file():
            build_tiny_model(model_dir)
        return model_dir
    from rlhfkit.demo.smollm2 import materialize_smollm2

    logger.info("== model: SmolLM2-135M-Instruct (converted once, then cached)")
    return materialize_smollm2()


def run_demo(output_dir: str | Path = "demo_output", quick: bool = False, fresh: bool = False) -> Path:
    """Run the whole pipeline; return the path of report.md."""
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    work = Path(output_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    started = time.time()
    timings: dict[str, float] = {}
    tick = time.time()
    model_dir = _base_model(quick, work)
    timings["model"] = time.time() - tick
    data_dir = work / "data"
    train_prompts, heldout_prompts = _prepare_data(data_dir, sizes)
    overrides = sizes["overrides"]
    tick = time.time()
    sft_dir = _stage("sft", model_dir, data_dir, work / "sft", overrides.get("sft", {}), fresh)
    timings["sft"] = time.time() - tick
    tick = time.time()
    if quick:
        pair_info = _written_pairs(sizes["pair_prompts"], data_dir)
    else:
        pair_info = _label_pairs(model_dir, sft_dir, train_prompts[: sizes["pair_prompts"]], data_dir,
                                 sizes["max_new_tokens"], fresh)
    timings["pairs"] = time.time() - tick
    tick = time.time()
    rm_dir = _stage("rm", model_dir, data_dir, work / "rm", overrides.get("rm", {}), fresh or bool(pair_info))
    timings["rm"] = time.time() - tick
    tick = time.time()
    reward_models = [{"path": str(rm_dir), "type": "lora", "weight": 1.0, "name": "rm"},
                     {"path": GOLD_FUNCTION, "type": "function", "weight": 0.0, "name": "gold"}]
    ppo_extra = {"adapter_name_or_path": str(sft_dir), "reward_models": reward_models, **overrides.get("ppo", {})}
    ppo_dir = _stage("ppo", model_dir, data_dir, work / "ppo", ppo_extra, fresh or bool(pair_info))
    timings["ppo"] = time.time() - tick
    tick = time.time()
    report = write_report(work, model_dir, sft_dir, rm_dir, ppo_dir, heldout_prompts, sizes["max_new_tokens"],
                          timings, pair_info)
    timings["report"] = time.time() - tick
    logger.info("demo finished in %.1f min; report: %s", (time.time() - started) / 60, report)
    return report
