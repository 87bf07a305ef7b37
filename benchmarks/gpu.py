"""Time rlhfkit's PPO step on one GPU: workloads G1 and G2, full and LoRA, one JSON line each.

    G1  SmolLM2-360M's shape: hidden 960, 32 layers, 15 heads (5 KV heads), MLP 2560
    G2  SmolLM2-1.7B's shape: hidden 2048, 24 layers, 32 heads (32 KV heads), MLP 8192

Both: vocabulary 49,152 (SmolLM2's tokenizer, read from `--tokenizer`), tied embeddings, random
weights made on the device (the same seed for the policy and a full run's reference), bf16; 64
chat prompts per step, exactly 128 new tokens each (`min_new_tokens` = `max_new_tokens`),
temperature 1, no top-k/top-p; one mini-batch of 64 in micro-batches of 16; 4 PPO epochs; GAE
with the value head; a function reward (reward.py, so scoring costs nothing); full fine-tuning or
LoRA rank 16 (alpha 32) on every linear layer but the head. Everything else is the stage's
accelerator default (static rollout engine with a CUDA-graph decode step, chunked LM head).

It runs the real `ppo` stage (`rlhfkit.stages.run_stage`) for 1 warm-up + `--steps` measured
steps, in one process (the compiled decode step's kernels are cached between workloads of one
shape), and reads the stage's logged phase timings, synchronised with the device here. Per line:

    seconds_per_step, phases     medians over the measured steps (rollout, score, evaluate, update)
    tokens_per_second            generated tokens / rollout seconds
    peak_gpu_memory_gb           torch.cuda.max_memory_allocated over the workload
    matmul_tflops, copy_tb_per_s this device's bf16 matmul speed (8192^3) and memory bandwidth
                                 (a 2 GB copy), measured in this run
    update_mfu                   the update's FLOPs (forward + backward over the real tokens, 4
                                 epochs; flops.py) / update seconds / matmul_tflops
    step_bound_seconds           the fastest the step could be: decoding bounded by the bytes it
                                 must read (weights + KV cache per token step) or its FLOPs,
                                 whichever is slower; the reference's forward and the update by
                                 their FLOPs (the policy's old log-probs could come from decoding,
                                 as benchmarks/ppo_update.py counts them)
    step_over_bound              seconds_per_step / step_bound_seconds

Whole run (4 workloads, 1 + 2 steps each) sized for <= 6 minutes on an H200; `--budget` seconds
stops starting new workloads (a line with "skipped" says so). `--smoke` runs tiny shapes on any
device (the CPU included) with 8 prompts x 8 tokens, 1 + 1 steps, to check the script end to end.

Usage: python benchmarks/gpu.py --tokenizer DIR [--workloads G1,G2] [--variants full,lora]
       [--steps 2] [--budget 330] [--smoke] [--out FILE] [--profile G2:full --profile-dir DIR]

A workload that fails prints its traceback and a line with "error", and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402

REWARD_FILE = Path(__file__).resolve().parent / "reward.py"
SHAPES = {
    "G1": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
           "intermediate_size": 2560},
    "G2": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
           "intermediate_size": 8192},
}
SMOKE_SHAPES = {
    "G1": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128},
    "G2": {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "intermediate_size": 192},
}
SIZES = {"prompts": 64, "new_tokens": 128, "micro": 16, "accumulation": 4, "epochs": 4}
SMOKE_SIZES = {"prompts": 8, "new_tokens": 8, "micro": 4, "accumulation": 2, "epochs": 1}
LORA_RANK, LORA_ALPHA, SEED = 16, 32, 0
TASKS = ["Write one sentence about {}.", "Give me a short fact about {}.", "Describe {} to a child in simple words.",
         "What is the most surprising thing about {}?", "Write a two-line poem about {}.",
         "Explain why {} matters, briefly.", "List three words that remind you of {}.",
         "Tell a very short story that involves {}."]
SUBJECTS = ["the ocean", "volcanoes", "honey bees", "the moon", "trains", "coffee", "winter", "libraries"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, smoke: bool) -> float:
    """Best bf16 (fp32 on a CPU) TFLOP/s of square matmuls on `device`."""
    size, dtype = (512, torch.float32) if smoke or device.type == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * size ** 3 / best / 1e12


def copy_tb_per_second(device: torch.device, smoke: bool) -> float:
    """Memory bandwidth (bytes read + written per second, TB/s) of a large device copy."""
    elements = (1 << 22) if smoke or device.type == "cpu" else (1 << 29)  # 2 GB of bf16 on a GPU
    source = torch.empty(elements, dtype=torch.bfloat16, device=device).fill_(1.0)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best / 1e12


def build_folder(root: Path, name: str, shape: dict, tokenizer) -> tuple[Path, Path]:
    """`root/name/model` (config.json and the tokenizer; no weights) and the prompts file."""
    from transformers import LlamaConfig

    model_dir = root / name / "model"
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = root / name / "prompts.jsonl"
    texts = [task.format(subject) for task in TASKS for subject in SUBJECTS]
    prompts.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in texts))
    return model_dir, prompts


@contextlib.contextmanager
def random_weights_on_device():
    """The stage loads models through `load_causal_lm`: here it makes them from config.json with random
    weights directly on the device (seeded alike, so a full run's reference equals the initial policy)."""
    import rlhfkit.stages.ppo_models as ppo_models
    from transformers import AutoConfig, AutoModelForCausalLM

    original = ppo_models.load_causal_lm

    def made_on_device(path, model_args, dtype, device, tokenizer=None, quantization_bit=None, **_):
        if quantization_bit is not None:
            raise ValueError("the GPU benchmark makes bf16 models; run it without quantization_bit")
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(SEED)
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if tokenizer is not None:
            model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model

    ppo_models.load_causal_lm = made_on_device
    try:
        yield
    finally:
        ppo_models.load_causal_lm = original


@contextlib.contextmanager
def measured_stage(device: torch.device, prompt_lengths: list[list[int]], profile_step: int | None = None,
                   profile_path: Path | None = None):
    """Phase timers that wait for the device, and the prompts' real lengths of every rollout.

    With `profile_step`, each phase of that step (1-based) runs under torch.profiler and its table
    of operators (by device time, with call counts: kernel launches per phase) is appended to
    `profile_path`; that step's timings include the profiler's overhead.
    """
    import rlhfkit.stages.ppo as ppo_stage

    timed, build = ppo_stage.timed, ppo_stage.build_rollout_engine
    steps = [0]

    @contextlib.contextmanager
    def synchronised(timings, phase):
        if phase == "rollout":
            steps[0] += 1
        profiling = steps[0] == profile_step
        synchronize(device)
        with timed(timings, phase), (phase_profile(device, phase, profile_path) if profiling
                                     else contextlib.nullcontext()):
            yield
            synchronize(device)

    def counting_engine(*args, **kwargs):
        engine = build(*args, **kwargs)
        generate = engine.generate

        def counted(prompt_ids, prompt_mask):
            prompt_lengths.append(prompt_mask.sum(1).tolist())
            return generate(prompt_ids, prompt_mask)

        engine.generate = counted
        return engine

    ppo_stage.timed, ppo_stage.build_rollout_engine = synchronised, counting_engine
    try:
        yield
    finally:
        ppo_stage.timed, ppo_stage.build_rollout_engine = timed, build


@contextlib.contextmanager
def phase_profile(device: torch.device, phase: str, path: Path):
    """Profile the enclosed phase; append its operator table (top 30 by device time) to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        yield
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = profiler.key_averages()
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                  and str(e.device_type).endswith("CUDA"))
    with open(path, "a", encoding="utf-8") as out:
        out.write(f"== {phase}: {kernels} device kernel launches\n{events.table(sort_by=sort, row_limit=30)}\n")


def step_bound(shape: flops.ModelShape, prompts: list[int], new: int, epochs: int, parameters: int,
               tflops: float, tb_per_s: float) -> dict[str, float]:
    """Seconds each phase of one step needs at least (see the module docstring)."""
    peak, bandwidth = tflops * 1e12, tb_per_s * 1e12
    lengths = [p + new for p in prompts]
    # LoRA decodes on merged weights: no adapter products
    decode_flop = flops.forward_flops(shape, [n - 1 for n in lengths], len(prompts) * new, lora=False)
    kv_bytes_per_position = shape.layers * 2 * shape.kv_width * 2  # keys and values, bf16
    kv_reads = sum(kv_bytes_per_position * (p + t) for p in prompts for t in range(new))
    decode_bytes = new * parameters * 2 + kv_reads  # every weight read once per token step
    reference_flop = flops.forward_flops(shape, lengths, len(prompts) * new, lora=False)
    update_flop = epochs * flops.forward_backward_flops(shape, lengths, len(prompts) * new)
    return {"rollout": max(decode_flop / peak, decode_bytes / bandwidth), "evaluate": reference_flop / peak,
            "update": update_flop / peak, "update_flop": update_flop}


def run_workload(name: str, variant: str, args, root: Path, tokenizer, device: torch.device,
                 tflops: float, tb_per_s: float) -> dict:
    from rlhfkit.config import build_config
    from rlhfkit.stages import run_stage
    from rlhfkit.tracking.trainer_log import read_trainer_log

    sizes = SMOKE_SIZES if args.smoke else SIZES
    shape_keys = (SMOKE_SHAPES if args.smoke else SHAPES)[name]
    model_dir, prompts = build_folder(root, name, shape_keys, tokenizer)
    output_dir = root / name / variant
    profiled = f"{name}:{variant}" in args.profile.split(",")
    profile_path = Path(args.profile_dir) / f"profile-{name}-{variant}.txt" if profiled else None
    values = {
        "stage": "ppo", "model_name_or_path": str(model_dir), "dataset": str(prompts), "output_dir": str(output_dir),
        "overwrite_output_dir": True, "finetuning_type": variant, "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA,
        "lora_target": "all", "reward_model": f"{REWARD_FILE}:reward", "reward_model_type": "function",
        "bf16": True, "per_device_train_batch_size": sizes["micro"],
        "gradient_accumulation_steps": sizes["accumulation"], "rollout_batch_size": sizes["prompts"],
        "per_device_eval_batch_size": sizes["prompts"], "ppo_epochs": sizes["epochs"], "learning_rate": 1e-6,
        "max_new_tokens": sizes["new_tokens"], "min_new_tokens": sizes["new_tokens"], "temperature": 1.0,
        "top_k": 0, "top_p": 1.0, "max_steps": 1 + args.steps + profiled, "logging_steps": 1, "save_steps": 0,
        "seed": SEED, "gradient_checkpointing": False, "cutoff_len": 1024,
        **({"device": "cpu", "rollout_engine": "static"} if device.type == "cpu" else {}),
    }
    values.update(json.loads(args.overrides))
    lengths: list[list[int]] = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with random_weights_on_device(), measured_stage(device, lengths, 1 + args.steps if profiled else None,
                                                    profile_path):
        run_stage(build_config(values))
    log = read_trainer_log(output_dir)
    records = log[1:1 + args.steps]  # the first step compiles; a profiled step comes last
    median = lambda key: statistics.median(float(r[key]) for r in records)  # noqa: E731
    config = json.loads((model_dir / "config.json").read_text())
    shape = flops.ModelShape.from_config(config, LORA_RANK if variant == "lora" else 0)
    parameters = config["vocab_size"] * shape.hidden + shape.layers * (
        2 * shape.hidden ** 2 + 2 * shape.hidden * shape.kv_width + 3 * shape.hidden * shape.intermediate)
    bound = step_bound(shape, lengths[-1], sizes["new_tokens"], sizes["epochs"], parameters, tflops, tb_per_s)
    seconds, update = median("seconds_per_step"), median("time/update")
    bound_seconds = bound["rollout"] + bound["evaluate"] + bound["update"]
    return {
        "workload": name, "variant": variant, "smoke": args.smoke, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "steps_measured": len(records),
        "seconds_per_step": round(seconds, 3),
        "phases": {phase: round(median(f"time/{phase}"), 3) for phase in ("rollout", "score", "evaluate", "update")},
        "tokens_per_second": round(median("tokens_per_second"), 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        if device.type == "cuda" else None,
        "matmul_tflops": round(tflops, 4), "copy_tb_per_s": round(tb_per_s, 4),
        "update_mfu": round(bound["update_flop"] / update / (tflops * 1e12), 3),
        "step_bound_seconds": round(bound_seconds, 3),
        "phase_bounds": {phase: round(bound[phase], 3) for phase in ("rollout", "evaluate", "update")},
        "step_over_bound": round(seconds / bound_seconds, 2),
        "prompt_tokens_mean": round(statistics.mean(lengths[-1]), 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "overrides": json.loads(args.overrides),
        **({"profile": str(profile_path), "profiled_step_seconds": float(log[-1]["seconds_per_step"])}
           if profiled else {}),
    }


def load_tokenizer(path: str | None):
    if path is None:  # the smoke run without SmolLM2's files: the tiny models' character tokenizer
        from rlhfkit.models.tiny import build_char_tokenizer

        return build_char_tokenizer()
    from rlhfkit.config import ModelArguments
    from rlhfkit.models.loading import load_tokenizer as load

    return load(ModelArguments(model_name_or_path=path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="folder with SmolLM2's tokenizer files (required unless --smoke)")
    parser.add_argument("--workloads", default="G1,G2")
    parser.add_argument("--variants", default="full,lora")
    parser.add_argument("--steps", type=int, help="measured steps after the warm-up step (2; 1 with --smoke)")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds after which no workload starts")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and sizes, any device")
    parser.add_argument("--overrides", default="{}", help="JSON of extra stage keys, e.g. '{\"torch_compile\": true}'")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--profile", default="", help="workload:variant list (e.g. G2:full) whose last step is "
                        "profiled too (an extra step, not in the medians); tables go to --profile-dir")
    parser.add_argument("--profile-dir", default=".", help="folder for profile-<workload>-<variant>.txt")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (1 if args.smoke else 2)
    Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None and not args.smoke:
        parser.error("--tokenizer is required (a folder with SmolLM2's tokenizer.json)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke for the CPU check")
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    tflops, tb_per_s = matmul_tflops(device, args.smoke), copy_tb_per_second(device, args.smoke)
    with tempfile.TemporaryDirectory(prefix="rlhfkit-gpu-bench-") as folder:
        for name in args.workloads.split(","):
            for variant in args.variants.split(","):
                elapsed = time.perf_counter() - started
                if elapsed > args.budget:
                    line = {"workload": name, "variant": variant, "skipped": f"budget of {args.budget} s spent"}
                else:
                    try:
                        line = run_workload(name, variant, args, Path(folder), tokenizer, device, tflops, tb_per_s)
                    except Exception as error:  # one failed workload must not cost the device call the others
                        traceback.print_exc()
                        line = {"workload": name, "variant": variant, "error": f"{type(error).__name__}: {error}"[:500]}
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                text = json.dumps(line)
                print(text, flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as out:
                        out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
