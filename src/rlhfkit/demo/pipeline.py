"""`rlhfkit demo`: SFT -> preference pairs -> RM -> PPO (and GRPO) -> report, on the movie-review task.

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
from rlhfkit.demo.pairs import PAIR_FILES, label_pairs, write_jsonl, written_pairs
from rlhfkit.demo.report import write_report
from rlhfkit.errors import fail
from rlhfkit.stages import run_stage

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[3] / "examples" / "demo"
GOLD_FUNCTION = "rlhfkit.demo.task:gold_reward"

FULL = {"sft_examples": 480, "pair_prompts": 384, "heldout": 120, "max_new_tokens": 40, "overrides": {}}
QUICK = {
    "sft_examples": 48, "pair_prompts": 48, "heldout": 16, "max_new_tokens": 12,
    "overrides": {
        "sft": {"max_steps": 6, "learning_rate": 3e-2},
        "rm": {"max_steps": 6, "learning_rate": 3e-2},
        "ppo": {"max_steps": 3, "per_device_train_batch_size": 8, "ppo_buffer_size": 1, "max_new_tokens": 12,
                "learning_rate": 1e-2},
        "grpo": {"max_steps": 3, "per_device_train_batch_size": 2, "ppo_buffer_size": 1, "max_new_tokens": 12,
                 "learning_rate": 1e-2},
    },
}


def _stage(name: str, model_dir: Path, data_dir: Path, output_dir: Path, extra: dict[str, Any],
           fresh: bool, device: str) -> Path:
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
                  overwrite_output_dir=True, device=device, **extra)
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
    write_jsonl(data_dir / "sft.jsonl", task.sft_examples(num_examples=sizes["sft_examples"]))
    write_jsonl(data_dir / "prompts.jsonl", [{"instruction": p} for p in train_prompts])
    info = {
        "demo_sft": {"file_name": "sft.jsonl"},
        "demo_prompts": {"file_name": "prompts.jsonl"},
        **{name: {"file_name": PAIR_FILES[split], "ranking": True,
                  "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}
           for name, split in (("demo_pairs", "train"), ("demo_pairs_heldout", "heldout"))},
    }
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return train_prompts, heldout_prompts[: sizes["heldout"]]


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


def run_demo(output_dir: str | Path = "demo_output", quick: bool = False, fresh: bool = False,
             algo: str = "ppo", device: str = "auto") -> Path:
    """Run the whole pipeline; return the path of report.md. `algo` grpo also trains a GRPO policy
    (examples/demo/grpo.yaml, as many generated responses as PPO) and compares it in the report.
    `device`: the stages' `device` key (auto or cpu); sampling for the pairs and the report runs on
    the device `rlhfkit chat` would pick for it."""
    from rlhfkit.commands.inference import inference_device

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
    sft_dir = _stage("sft", model_dir, data_dir, work / "sft", overrides.get("sft", {}), fresh, device)
    timings["sft"] = time.time() - tick
    tick = time.time()
    if quick:
        new_pairs = written_pairs(sizes["pair_prompts"], data_dir, fresh)
    else:
        new_pairs = label_pairs(model_dir, sft_dir, {"train": train_prompts[: sizes["pair_prompts"]],
                                                      "heldout": heldout_prompts}, data_dir,
                                 sizes["max_new_tokens"], fresh, inference_device(device))
    timings["pairs"] = time.time() - tick
    tick = time.time()
    rm_dir = _stage("rm", model_dir, data_dir, work / "rm", overrides.get("rm", {}), fresh or new_pairs, device)
    timings["rm"] = time.time() - tick
    tick = time.time()
    reward_models = [{"path": str(rm_dir), "type": "lora", "weight": 1.0, "name": "rm"},
                     {"path": GOLD_FUNCTION, "type": "function", "weight": 0.0, "name": "gold"}]
    ppo_extra = {"adapter_name_or_path": str(sft_dir), "reward_models": reward_models, **overrides.get("ppo", {})}
    policies = {"PPO": _stage("ppo", model_dir, data_dir, work / "ppo", ppo_extra, fresh or new_pairs, device)}
    timings["ppo"] = time.time() - tick
    if algo == "grpo":
        tick = time.time()
        grpo_extra = {**ppo_extra, **overrides.get("grpo", {})}
        policies["GRPO"] = _stage("grpo", model_dir, data_dir, work / "grpo", grpo_extra, fresh or new_pairs, device)
        timings["grpo"] = time.time() - tick
    tick = time.time()
    report = write_report(work, model_dir, sft_dir, rm_dir, policies, heldout_prompts, sizes["max_new_tokens"],
                          timings, inference_device(device))
    timings["report"] = time.time() - tick
    logger.info("demo finished in %.1f min; report: %s", (time.time() - started) / 60, report)
    return report
