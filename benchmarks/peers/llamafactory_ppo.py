"""Run LLaMA-Factory 0.9.5's `stage: ppo` on a benchmark workload; print one JSON line.

Runs inside .venv-llamafactory. Its PPO takes a LoRA reward model (an adapter plus a value head
on the policy's base), so the policy trains LoRA (rank 8 on every linear layer) and the reward is
workloads.py's `rewards/lora-llamafactory`: the adapter and head of our LoRA side's reward model
in its format; critic = its value head on the policy. Settings match ours: rollout batch 16 = one
mini-batch, 4 PPO epochs, temperature 1, no top-k/top-p, fp32, responses of exactly 32 tokens
(`min_new_tokens` set on its generation config, as we do), template smollm2 (the same tokens as
the tokenizer's chat template).

Rows per pass: its trainer generates, scores and runs every forward pass (no-grad and update) in
slices of `per_device_train_batch_size` rows, so smaller update passes would also cut the rollout
and the reward into slices; it runs all 16 rows per pass, recorded in `rows_per_pass` beside ours.

Phases are timed by wrapping its own methods: rollout = get_inputs; score = get_rewards; evaluate
= the no-grad batched_forward_pass calls (old log-probs, values, reference); update = the rest.

Usage: python llamafactory_ppo.py WORKLOAD_FOLDER [--threads 2] [--steps 3] [--out file]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Its PPO is written against TRL 0.9.6 (PPOTrainer.step), while its version check asks for >= 0.18.
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")

import torch  # noqa: E402

try:
    import torchaudio  # noqa: F401
except ImportError:
    # LLaMA-Factory imports torchaudio at module level for audio inputs; no torchaudio wheel is
    # built for torch 2.13, and this text-only workload never calls it.
    import importlib.machinery
    import types
    stub = types.ModuleType("torchaudio")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules["torchaudio"] = stub
from common import StepClock, driver_setup, emit, prompts, reward_folder  # noqa: E402


def main() -> None:
    args, work = driver_setup(__doc__.splitlines()[0])

    from transformers import TrainerCallback
    from llamafactory.hparams import get_train_args
    from llamafactory.train.ppo.trainer import CustomPPOTrainer
    from llamafactory.train.ppo.workflow import run_ppo

    clock = StepClock()
    get_inputs, forward_pass = CustomPPOTrainer.get_inputs, CustomPPOTrainer.batched_forward_pass

    def fixed_length_get_inputs(self, batch):
        self.generation_config.min_new_tokens = work["response_tokens"]
        clock.tokens.append(0)
        queries, responses = get_inputs(self, batch)
        clock.tokens[-1] = sum(len(r) for r in responses)
        return queries, responses

    def timed_forward_pass(self, *rest, **kwargs):
        if torch.is_grad_enabled():
            return forward_pass(self, *rest, **kwargs)
        return clock.timed("evaluate", forward_pass)(self, *rest, **kwargs)

    CustomPPOTrainer.get_inputs = clock.timed("rollout", fixed_length_get_inputs)
    CustomPPOTrainer.get_rewards = clock.timed("score", CustomPPOTrainer.get_rewards)
    CustomPPOTrainer.batched_forward_pass = timed_forward_pass

    class Steps(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            clock.step_done()

    with tempfile.TemporaryDirectory(prefix="llamafactory-bench-") as scratch:
        scratch = Path(scratch)
        rows = [{"instruction": text, "input": "", "output": ""} for text in prompts(work)]
        (scratch / "prompts.json").write_text(json.dumps(rows))
        (scratch / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "prompts.json"}}))
        run_ppo(*get_train_args({
            "stage": "ppo", "do_train": True, "model_name_or_path": work["model"],
            "reward_model": reward_folder(work, "llamafactory-lora"), "reward_model_type": "lora",
            "finetuning_type": "lora", "lora_rank": work["lora_rank"], "lora_alpha": work["lora_alpha"],
            "lora_target": "all", "template": "smollm2", "dataset": "bench", "dataset_dir": str(scratch),
            "cutoff_len": 1024, "output_dir": str(scratch / "out"), "overwrite_output_dir": True,
            "per_device_train_batch_size": work["rollout_batch"], "gradient_accumulation_steps": 1,
            "ppo_buffer_size": 1, "ppo_epochs": work["ppo_epochs"], "learning_rate": work["learning_rate"],
            "max_steps": 1 + args.steps, "max_new_tokens": work["response_tokens"], "do_sample": True,
            "temperature": work["temperature"], "top_k": 0, "top_p": 1.0, "seed": work["seed"],
            "logging_steps": 1, "save_steps": 100000, "report_to": "none", "plot_loss": False,
        }), callbacks=[Steps()])  # what `llamafactory-cli train` runs for stage ppo, minus its other stages
    rows = work["rollout_batch"]  # per_device_train_batch_size above: every slice of its trainer
    result = clock.result("llamafactory-0.9.5", work, "lora", args.threads, args.steps, micro_batch=rows,
                          reward_source="lora",
                          rows_per_pass={"rollout": rows, "score": rows, "evaluate": rows, "update": rows})
    other = sum(result["phases"].get(name, 0.0) for name in ("rollout", "evaluate", "score"))
    result["phases"]["update"] = round(result["seconds_per_update"] - other, 3)
    emit(result, args.out)


if __name__ == "__main__":
    main()
