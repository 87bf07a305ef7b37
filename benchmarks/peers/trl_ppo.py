"""Run TRL 0.24's PPOTrainer on a benchmark workload; print one JSON line (inside .venv-trl).

Policy, reference and value model come from the workload's checkpoint, the reward model from
its own copy of it (AutoModelForSequenceClassification with one label, TRL's design; the value
model too): workloads.py's `rewards/full-trl`, the weights and head of our full side's reward
model. Settings match ours: rollout batch 16 = one mini-batch, 4 PPO epochs, 32-token responses
(stop_token None: TRL then always generates response_length tokens), temperature 1, fp32. The
update runs micro-batches of `--micro-batch` rows (default: all 16, as ours-full's MICRO_BATCH);
generation, the reward, reference and value passes run on all 16 rows at once
(`local_rollout_forward_batch_size`, as ours-full's EVAL_CHUNK). `rows_per_pass` in the JSON
records both.

Phases are timed by wrapping TRL's own functions: rollout = batch_generation; evaluate = the
no-grad reference forward and the value model's pass; score = the reward model's pass; update =
the rest of the step.

Usage: python trl_ppo.py WORKLOAD_FOLDER [--lora] [--micro-batch M] [--threads 2] [--steps 3] [--out file]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import StepClock, driver_setup, emit, prompts, reward_folder  # noqa: E402


def main() -> None:
    args, work = driver_setup(__doc__.splitlines()[0], lora_flag=True, micro_batch_flag=True)
    micro = args.micro_batch or work["rollout_batch"]
    if work["rollout_batch"] % micro:
        raise SystemExit(f"--micro-batch {micro} must divide the rollout batch {work['rollout_batch']}")

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    import trl.trainer.ppo_trainer as ppo_module
    from trl import PPOConfig, PPOTrainer

    clock = StepClock()
    ppo_module.batch_generation = clock.timed("rollout", ppo_module.batch_generation)
    forward, get_reward = ppo_module.forward, ppo_module.get_reward

    def timed_forward(model, *rest):
        if torch.is_grad_enabled():
            return forward(model, *rest)
        return clock.timed("evaluate", forward)(model, *rest)

    reward_models = []

    def timed_get_reward(model, *rest):
        phase = "score" if any(model is m for m in reward_models) else "evaluate"
        return clock.timed(phase, get_reward)(model, *rest)

    ppo_module.forward, ppo_module.get_reward = timed_forward, timed_get_reward

    tokenizer = AutoTokenizer.from_pretrained(work["model"], padding_side="left")
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True) for text in prompts(work)]
    rows = [row["input_ids"] if isinstance(row, dict) else row for row in rows]
    dataset = Dataset.from_dict({"input_ids": rows})
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(work["model"], **load)
    reference = None if args.lora else AutoModelForCausalLM.from_pretrained(work["model"], **load)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_folder(work, "trl-full"), num_labels=1,
                                                                **load)
    value = AutoModelForSequenceClassification.from_pretrained(work["model"], num_labels=1, **load)
    for model in (reward, value):
        model.config.pad_token_id = tokenizer.pad_token_id
    reward_models.append(reward)
    peft_config = None
    if args.lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=work["lora_rank"], lora_alpha=work["lora_alpha"], target_modules="all-linear",
                                 lora_dropout=0.0, task_type="CAUSAL_LM")

    class Steps(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tokens.append(work["rollout_batch"] * work["response_tokens"])
            clock.step_done()

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as output_dir:
        config = PPOConfig(
            output_dir=output_dir, per_device_train_batch_size=micro,
            gradient_accumulation_steps=work["rollout_batch"] // micro,
            num_mini_batches=1, local_rollout_forward_batch_size=work["rollout_batch"],
            num_ppo_epochs=work["ppo_epochs"], total_episodes=work["rollout_batch"] * (1 + args.steps),
            response_length=work["response_tokens"], stop_token=None, temperature=work["temperature"],
            learning_rate=work["learning_rate"], seed=work["seed"], logging_steps=1, save_strategy="no",
            report_to="none", num_sample_generations=0, bf16=False, fp16=False, use_cpu=True,
            dataloader_num_workers=0)
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward, value_model=value, train_dataset=dataset,
                             peft_config=peft_config, callbacks=[Steps()])
        clock.start = __import__("time").perf_counter()
        trainer.train()
    forward_rows = config.local_rollout_forward_batch_size
    result = clock.result("trl-0.24.0", work, "lora" if args.lora else "full", args.threads, args.steps,
                          micro_batch=micro, reward_source="full",
                          rows_per_pass={"rollout": forward_rows, "score": forward_rows, "evaluate": forward_rows,
                                         "update": micro})
    # The update is what the step spends outside the other phases.
    other = sum(result["phases"].get(name, 0.0) for name in ("rollout", "evaluate", "score"))
    result["phases"]["update"] = round(result["seconds_per_update"] - other, 3)
    emit(result, args.out)


if __name__ == "__main__":
    main()
