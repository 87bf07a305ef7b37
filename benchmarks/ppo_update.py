"""Time rlhfkit's PPO step on a named workload and print one JSON line.

Runs the real `ppo` stage (`rlhfkit.stages.run_stage`) for 1 warm-up + N measured steps, reads
the per-phase timings it logs, and counts the real tokens each phase processed by wrapping the
stage's own step functions (nothing of the step is re-implemented here). Reports:

    seconds_per_update     median over the measured steps of the whole PPO step
    warmup_seconds         the first (unmeasured) step, which also compiles with torch_compile
    phases                 median seconds of rollout, score, evaluate, update
    tokens_per_second      generated tokens / rollout seconds (median)
    peak_rss_gb            the process's peak resident memory (loading included)
    matmul_gflops          this machine's fp32 matmul speed, measured in this run
                           (2048 x 2048 @ 2048 x 2048, the same thread count; best of the
                           medians taken before and after the run)
    update_gflops, update_fraction_of_peak
                           FLOPs the update needs (forward + backward over the real tokens,
                           see flops.py) / update seconds, and that against matmul_gflops
    step_gflop, step_bound_seconds, step_over_bound
                           FLOPs the whole step needs (generation, the reward model's and
                           the reference's forward, the update) / matmul_gflops = the fastest this step could be, and
                           the measured step time over it
    rows_per_pass          rows per forward pass of each phase (rollout, score, evaluate, update),
                           as the peers' drivers report theirs
    rlhfkit_src, rlhfkit_commit
                           the source tree timed (``PYTHONPATH`` can point at another one)

Benchmark settings (see workloads.py): responses of exactly 32 tokens (`min_new_tokens` =
`max_new_tokens`, which keeps stop tokens out of the first 32), temperature 1, no top-k/top-p,
one mini-batch of 16 per step. The reward is a reward model of the peer's design, built by
workloads.py from the workload's base weights: with LoRA the reward adapter + value head on the
policy's base (`reward_model_type: lora`, as LLaMA-Factory's), for full fine-tuning a separate
full model + value head (`reward_model_type: full`, as TRL's); `--reward function` scores with
reward.py instead (a Python function, the score phase then costs ~nothing).

Only configuration keys that older rlhfkit versions know are used, so the same script can time
another source tree: ``PYTHONPATH=/path/to/src python benchmarks/ppo_update.py W1``.

Usage: python benchmarks/ppo_update.py W1 [--lora] [--threads N] [--steps 3] [--micro-batch M]
       [--reward model|function] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# As the `rlhfkit` command does before torch is imported (cpu_speedups: auto): transparent huge pages
# for large CPU tensors. (Older trees set it on `import rlhfkit`; setdefault leaves a user's value.)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import rlhfkit  # noqa: E402
import torch  # noqa: E402
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402
import workloads  # noqa: E402

REWARD_FILE = Path(__file__).resolve().parent / "reward.py"
# Rows per forward/backward pass of the update (the mini-batch is always the 16 rows of the step,
# so the gradient is the same): smaller passes bound the activations and vocabulary-sized logits
# that set the peak memory; larger ones run each layer's products on more rows at once (measured:
# W1 LoRA 16 -> 8 rows 2.93 -> 3.03 s, 0.88 -> 0.75 GB; W2 LoRA, compiled, with gradients kept
# in one buffer, 2 -> 4 rows 16.0 -> 14.1 s, 1.32 -> 1.47 GB; W2 full 4 -> 8 -> 16 rows 19.6 ->
# 18.7 -> 17.0 s, 3.69 -> 4.02 -> 4.58 GB, where TRL peaks at ~9.9 GB).
MICRO_BATCH = {("W1", "full"): 16, ("W1", "lora"): 8, ("W2", "full"): 16, ("W2", "lora"): 4}
# `torch_compile_memory_budget`: the compiled blocks recompute their cheapest operations in the
# backward pass to save less (W2 LoRA, 4-row passes: 1.47 -> 1.41 GB, step time +1%; W2 full,
# 16-row passes: 4.58 -> 4.18 GB, 17.0 -> 17.5 s).
MEMORY_BUDGET = {("W2", "full"): 0.6, ("W2", "lora"): 0.6}
# Rows per no-grad forward of the evaluate phase (`per_device_eval_batch_size`): the reference's
# vocabulary logits of one chunk are rows x 32 x 49,152 floats, 100 MB for all 16 rows. W2 LoRA
# runs 4-row chunks: peak memory 1.47 (16 rows) / 1.41 (8) / 1.37 GB (4), step time within noise.
EVAL_CHUNK = {("W1", "full"): 16, ("W1", "lora"): 16, ("W2", "full"): 16, ("W2", "lora"): 4}
# `torch_compile` where it pays (measured, 2 threads): W2 full 23.2 -> 19.9 s, W2 LoRA 18.4 -> 17.0 s
# and 1.60 -> 1.41 GB; W1 within the noise (full 1.81 -> 1.78 s), so W1 runs eagerly.
# Compilation happens in the unmeasured warm-up step (`warmup_seconds`).
TORCH_COMPILE = {("W1", "full"): False, ("W1", "lora"): False, ("W2", "full"): True, ("W2", "lora"): True}


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Median fp32 GFLOP/s of ``size x size`` matmuls with the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(seconds) / 1e9


def stage_config(work: dict, lora: bool, steps: int, output_dir: str, micro_batch: int | None = None,
                 eval_chunk: int | None = None, reward: str = "model", generations: int = 1) -> dict:
    """The `ppo` stage configuration of the workload.

    One mini-batch of `rollout_batch` rows per step, accumulated over micro-batches of
    `micro_batch` rows (the same gradient: the loss is normalised by the mini-batch's tokens).
    `reward`: "model" (the workload's LoRA reward model with `lora`, else its full one; scored in
    chunks of `eval_chunk` rows) or "function" (reward.py). `generations`: responses per prompt;
    the rows (responses) per step and per pass stay the same, the prompts are that many fewer.
    """
    micro = micro_batch or work["rollout_batch"]
    if work["rollout_batch"] % micro or micro % generations:
        raise SystemExit(f"--micro-batch {micro} must divide the rollout batch {work['rollout_batch']} and be a "
                         f"multiple of --generations {generations}")
    if reward == "function":
        reward_model, reward_type = f"{REWARD_FILE}:reward", "function"
    else:
        reward_type = "lora" if lora else "full"
        reward_model = work["reward_models"][f"ours-{reward_type}"]
    values = {
        "stage": "ppo", "model_name_or_path": work["model"], "dataset": work["prompts_file"],
        "output_dir": output_dir, "overwrite_output_dir": True,
        "finetuning_type": "lora" if lora else "full",
        "lora_rank": work["lora_rank"], "lora_alpha": work["lora_alpha"], "lora_target": "all",
        "reward_model": reward_model, "reward_model_type": reward_type,
        "per_device_train_batch_size": micro // generations,
        "gradient_accumulation_steps": work["rollout_batch"] // micro,
        **({"num_generations": generations} if generations > 1 else {}),  # a key older trees do not know
        "per_device_eval_batch_size": eval_chunk or work["rollout_batch"], "ppo_buffer_size": 1,
        "ppo_epochs": work["ppo_epochs"], "learning_rate": work["learning_rate"], "max_steps": steps,
        "max_new_tokens": work["response_tokens"], "min_new_tokens": work["response_tokens"],
        "temperature": work["temperature"], "top_k": 0, "top_p": 1.0, "do_sample": True,
        "torch_dtype": "float32", "seed": work["seed"], "logging_steps": 1, "save_steps": 0,
        # Explicit since checkpointing became the default: the results in README.md were measured
        # without it (as TRL's PPO runs; LLaMA-Factory's checkpoints by default).
        "gradient_checkpointing": False,
    }
    return values


class TokenCounter:
    """Wraps the stage's step functions to record each step's real prompt and response lengths."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def install(self) -> None:
        import rlhfkit.stages.ppo as stage
        import rlhfkit.stages.ppo_steps as steps
        from rlhfkit.rollout.generation import HFGenerator

        counter = self
        generate, update = HFGenerator.generate, steps.ppo_update_minibatch

        def counted_generate(generator, model, input_ids, attention_mask, **kwargs):
            batch = generate(generator, model, input_ids, attention_mask, **kwargs)
            counter.steps.append({"prompt": attention_mask.sum(1).tolist(),
                                  "response": batch.response_mask.sum(1).tolist(),
                                  "padded": [int(input_ids.shape[1]), int(batch.response_ids.shape[1])],
                                  "updates": []})
            return batch

        def counted_update(accelerator, policy, value_head, loss_fn, minibatch, *args, **kwargs):
            counter.steps[-1]["updates"].append((minibatch.query_mask.sum(1).tolist(),
                                                 minibatch.response_mask.sum(1).tolist()))
            return update(accelerator, policy, value_head, loss_fn, minibatch, *args, **kwargs)

        HFGenerator.generate = counted_generate
        # The update loop calls it from ppo_steps (or, in older trees, from the stage module): patch both.
        steps.ppo_update_minibatch = stage.ppo_update_minibatch = counted_update


def step_flops(shape: flops.ModelShape, step: dict, reward_model: bool) -> dict[str, int]:
    """FLOPs each phase of one step needs, from its real token counts.

    `reward_model`: the score phase runs a forward pass of the reward model (the base, with the
    reward adapter of the same rank under LoRA) over every sequence; it needs no logits.
    """
    lora = shape.lora_rank > 0
    prompt, response = step["prompt"], step["response"]
    # Generation: the last response token is sampled, never fed back in.
    generated = flops.forward_flops(shape, [p + r - 1 for p, r in zip(prompt, response)], sum(response), lora)
    sequences = [p + r for p, r in zip(prompt, response)]
    # The reference forward (without LoRA: the base); the policy's old log-probs and values could
    # come from the generation's own forward passes, so they are not counted as necessary.
    reference = flops.forward_flops(shape, sequences, sum(response), lora=False)
    score = flops.forward_flops(shape, sequences, 0, lora) if reward_model else 0
    update = sum(flops.forward_backward_flops(shape, [p + r for p, r in zip(ps, rs)], sum(rs))
                 for ps, rs in step["updates"])
    return {"rollout": generated, "score": score, "evaluate": reference, "update": update}


def source_tree() -> dict:
    """Where the rlhfkit being timed comes from (``PYTHONPATH`` may point at another tree)."""
    src = Path(rlhfkit.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"rlhfkit_src": str(src), "rlhfkit_commit": commit, "rlhfkit_uncommitted_changes": dirty}


def run(name: str, lora: bool, steps: int, threads: int, micro_batch: int | None = None,
        overrides: dict | None = None, eval_chunk: int | None = None, reward: str = "model",
        generations: int = 1) -> dict:
    torch.set_num_threads(threads)
    work = workloads.load(name)
    peak_before = matmul_gflops()
    counter = TokenCounter()
    counter.install()
    from rlhfkit.config import build_config
    from rlhfkit.stages import run_stage
    from rlhfkit.tracking.trainer_log import read_trainer_log

    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-") as output_dir:
        values = stage_config(work, lora, 1 + steps, output_dir, micro_batch, eval_chunk, reward, generations)
        values.update(overrides or {})
        run_stage(build_config(values))
        records = read_trainer_log(output_dir)
    peak = max(peak_before, matmul_gflops())
    measured = [r for r in records if r.get("current_steps", r.get("step", 0)) > 1][-steps:]
    if len(measured) != steps:
        measured = records[-steps:]
    median = lambda key: statistics.median(float(r[key]) for r in measured)  # noqa: E731
    model_config = json.loads((Path(work["model"]) / "config.json").read_text())
    shape = flops.ModelShape.from_config(model_config, work["lora_rank"] if lora else 0)
    counted = [step_flops(shape, step, values["reward_model_type"] != "function") for step in counter.steps[1:]]
    update_flop = statistics.median(c["update"] for c in counted)
    step_flop = statistics.median(sum(c.values()) for c in counted)
    seconds = median("seconds_per_step")
    update_seconds = median("time/update")
    tokens = counter.steps[-1]
    chunk = values["per_device_eval_batch_size"]
    micro_rows = values["per_device_train_batch_size"] * generations
    return {
        "side": "rlhfkit", "workload": name, "variant": "lora" if lora else "full", "threads": threads,
        "micro_batch": micro_rows, "eval_chunk": chunk,
        "advantage_estimator": values.get("advantage_estimator", "gae"), "num_generations": generations,
        "reward_source": values["reward_model_type"],
        # The rollout decodes the whole batch at once; reward models score in evaluate-sized chunks.
        "rows_per_pass": {"rollout": work["rollout_batch"],
                          "score": work["rollout_batch"] if values["reward_model_type"] == "function" else chunk,
                          "evaluate": chunk, "update": micro_rows},
        "steps_measured": len(measured), "seconds_per_update": round(seconds, 3),
        "seconds_per_update_all": [round(float(r["seconds_per_step"]), 3) for r in measured],
        "warmup_seconds": round(float(records[0]["seconds_per_step"]), 3),  # includes torch_compile's compilation
        "phases": {phase: round(median(f"time/{phase}"), 3) for phase in ("rollout", "score", "evaluate", "update")},
        "tokens_per_second": round(median("tokens_per_second"), 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
        "matmul_gflops": round(peak, 1),
        "update_gflop": round(update_flop / 1e9, 2),
        "update_gflops": round(update_flop / 1e9 / update_seconds, 1),
        "update_fraction_of_peak": round(update_flop / 1e9 / update_seconds / peak, 3),
        "step_gflop": round(step_flop / 1e9, 2),
        "step_bound_seconds": round(step_flop / 1e9 / peak, 3),
        "step_over_bound": round(seconds / (step_flop / 1e9 / peak), 2),
        "prompt_tokens_mean": round(statistics.mean(tokens["prompt"]), 1),
        "response_tokens_mean": round(statistics.mean(tokens["response"]), 1),
        "reward": round(float(measured[-1].get("reward", float("nan"))), 4),
        "overrides": overrides or {},
        **source_tree(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=workloads.WORKLOADS)
    parser.add_argument("--lora", action="store_true", help="LoRA rank 8 on every linear layer (default: full)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--micro-batch", type=int, help="rows per forward/backward pass of the update "
                        "(default: MICRO_BATCH); the gradient is the same")
    parser.add_argument("--reward", choices=("model", "function"), default="model",
                        help="score with the workload's reward model of the peer's design (default) or reward.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a stage setting, e.g. --set logprobs_from_rollout=false (YAML value)")
    parser.add_argument("--estimator", default="gae", help="advantage_estimator (e.g. grpo); with --generations")
    parser.add_argument("--generations", type=int, default=1,
                        help="responses per prompt: the same responses per step from that many fewer prompts")
    parser.add_argument("--out", help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    variant = (args.workload, "lora" if args.lora else "full")
    overrides = {"torch_compile": TORCH_COMPILE[variant]}
    if variant in MEMORY_BUDGET:
        overrides["torch_compile_memory_budget"] = MEMORY_BUDGET[variant]
    if args.estimator != "gae":
        overrides["advantage_estimator"] = args.estimator
    overrides.update({key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)})
    result = run(args.workload, args.lora, args.steps, args.threads, args.micro_batch or MICRO_BATCH[variant],
                 overrides, EVAL_CHUNK[variant], args.reward, args.generations)
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
