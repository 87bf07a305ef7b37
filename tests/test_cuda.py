"""Checks that need a CUDA device (marked `cuda`; skipped without one): a bf16 PPO step with LoRA and full
fine-tuning through the accelerator's defaults (static rollout engine with a CUDA-graph decode step, chunked
LM head), the compiled static engine against the recording loop, the memory that gradient checkpointing
and the chunked head save, and host waits for the device that do not grow with the micro-batches. Run them with ``pytest -m cuda``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import rlhfkit
from conftest import EOS_ID
from rlhfkit.accelerator.transfer import batch_to_device
from rlhfkit.config import GenerationArguments, build_config
from rlhfkit.models.loading import enable_gradient_checkpointing
from rlhfkit.models.value_head import ValueHead
from rlhfkit.rl import PPOLoss
from rlhfkit.rollout import HFGenerator, RecordingEngine, StaticCacheEngine
from rlhfkit.stages import run_stage
from rlhfkit.stages.ppo_steps import Rollout, ppo_update_minibatch, response_forward
from rlhfkit.tracking.trainer_log import read_trainer_log

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
REWARD = "def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_bf16_ppo_step_on_cuda(finetuning, tmp_path, tiny_model_dir, jsonl):
    """Two PPO steps in bf16 with the accelerator's defaults: the static engine (compiled decode step), the
    chunked head; every logged statistic finite, responses of the fixed length, and the importance ratio of
    the (single) epoch near 1: the old log-probs come from the training forward (bf16 rounding apart)."""
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {w} {i}"} for w in "abcd" for i in range(4)])
    (tmp_path / "rewards.py").write_text(REWARD)
    out = tmp_path / "out"
    config = build_config({
        "stage": "ppo", "model_name_or_path": str(tiny_model_dir), "dataset": str(prompts), "bf16": True,
        "finetuning_type": finetuning, "reward_model_type": "function",
        "reward_model": f"{tmp_path / 'rewards.py'}:length", "gradient_accumulation_steps": 1, "ppo_epochs": 1,
        "max_new_tokens": 8, "min_new_tokens": 8, "max_steps": 2, "save_steps": 0, "logging_steps": 1,
        "output_dir": str(out)})
    run_stage(config)
    assert config.training.per_device_train_batch_size == 8 and config.training.logits_chunk_size == 1024
    records = read_trainer_log(out)
    assert len(records) == 2
    for record in records:
        for key in ("loss", "policy_loss", "kl", "reward", "grad_norm", "ratio_mean"):
            assert math.isfinite(record[key]), (key, record)
        assert record["response_length"] == 8
    # Both passes under bf16 autocast; they differ only in batch composition (kernels may tile the products
    # differently: bf16 rounding of the logits, ~0.4% each), which the mean over the tokens averages down.
    assert abs(records[0]["ratio_mean"] - 1.0) < 0.02


def _tiny(model_dir, dtype):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").to(CUDA, dtype).eval()
    batch = tokenizer(["hello there", "a", "write abc please", "xyz"], return_tensors="pt", padding=True)
    return tokenizer, model, batch["input_ids"].to(CUDA), batch["attention_mask"].to(CUDA)


@pytest.mark.parametrize("do_sample", [False, True])
def test_compiled_static_engine_equals_the_recording_loop(do_sample, tiny_model_dir):
    """Float64 on CUDA: the CUDA-graph decode step gives the recording loop's tokens, greedy or sampled from one
    seed (both draw with torch.multinomial from the same probabilities), over two rollouts (the graph replayed)."""
    tokenizer, model, ids, mask = _tiny(tiny_model_dir, torch.float64)
    args = GenerationArguments(do_sample=do_sample, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=24)
    recording = RecordingEngine(HFGenerator(tokenizer, args, [EOS_ID]), record=False)
    static = StaticCacheEngine(tokenizer, recording.generator.settings, [], compile_step=True, stop_check_interval=4)
    for engine in (recording, static):
        engine.sync_weights(model)
    for seed in (1, 2):
        outputs = []
        for engine in (recording, static):
            torch.manual_seed(seed)
            outputs.append(engine.generate(ids, mask))
        assert torch.equal(outputs[1].response_ids, outputs[0].response_ids)
        assert torch.equal(outputs[1].ended_with_stop, outputs[0].ended_with_stop)


def _wide_llama(vocab: int = 32000) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(CUDA)


def _peak_bytes(run) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _update_pass(model, ids, chunk: int):
    mask = torch.ones_like(ids)
    response = ids[:, -256:]
    logprobs, _, _ = response_forward(model, None, ids, mask, response, 1.0, with_values=False,
                                      logits_chunk_size=chunk)
    logprobs.sum().backward()
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_and_the_chunked_head_lower_peak_memory():
    """A training pass of 8 rows x 512 tokens (256 of them response): checkpointing keeps each layer's input
    instead of its intermediates; the chunked head never holds the (8 x 256 x 32,000) logits."""
    model = _wide_llama()
    model.train()
    ids = torch.randint(0, 32000, (8, 512), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    plain = _peak_bytes(lambda: _update_pass(model, ids, 0))
    chunked = _peak_bytes(lambda: _update_pass(model, ids, 256))
    enable_gradient_checkpointing(model)
    checkpointed = _peak_bytes(lambda: _update_pass(model, ids, 256))
    logits_bytes = 8 * 256 * 32000 * 4
    assert chunked < plain - logits_bytes, (plain, chunked)  # at least one float32 logits tensor less
    assert checkpointed < 0.7 * chunked, (chunked, checkpointed)


def _device_waits(run, by_rlhfkit: bool = False) -> int:
    """How often the host waits for the device inside `run` (torch's CUDA sync debug mode, warnings counted);
    `by_rlhfkit`: only the waits rlhfkit's own code causes (transformers reads each training pass's padding
    mask to choose its attention path, once per forward pass)."""
    package = str(Path(rlhfkit.__file__).parent)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) and (not by_rlhfkit or w.filename.startswith(package)) for w in caught)


def test_the_update_waits_for_the_device_per_mini_batch_not_per_micro_batch(tiny_model_dir):
    """One PPO mini-batch of 8 rows in 8 micro-batches or in 1: as many host waits (the statistics and the
    micro-batches' padding bounds are read once), so the host queues each pass while the device runs."""
    tokenizer, model, ids, mask = _tiny(tiny_model_dir, torch.float32)
    model.train()
    rows = 8
    query, query_mask = ids.repeat(2, 1), mask.repeat(2, 1)
    generator = torch.Generator(CUDA).manual_seed(0)
    response = torch.randint(3, 50, (rows, 6), device=CUDA, generator=generator)
    response_mask = torch.arange(6, device=CUDA) < torch.randint(1, 7, (rows, 1), device=CUDA, generator=generator)
    noise = torch.randn(rows, 6, device=CUDA, generator=generator) * response_mask
    rollout = Rollout(query, query_mask, response, response_mask, noise[:, 0], noise, noise, noise, noise, noise)
    head = ValueHead(model.config.hidden_size).to(CUDA)
    loss_fn = PPOLoss(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    accelerator = Accelerator()

    def update(micro):
        return lambda: ppo_update_minibatch(accelerator, model, head, loss_fn, rollout, micro, 1.0, 1)

    update(rows)()  # warm-up: kernels and allocator
    waits = {micro: _device_waits(update(micro), by_rlhfkit=True) for micro in (rows, 1)}
    assert waits[1] == waits[rows], waits


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_steps_wait_for_the_device_per_step_not_per_micro_batch(stage, tmp_path, tiny_model_dir, jsonl):
    """One optimizer step of 8 rows as 1 x 8 or 8 x 1 micro-batches: as many host waits by rlhfkit's code over
    the whole run (loading, the step, the save), so none per micro-batch (batches are copied from pinned
    memory, the losses summed on the device)."""
    rows = ([{"instruction": f"say {w}", "output": w * 3} for w in "abcdefgh"] if stage == "sft" else
            [{"instruction": f"say {w}", "chosen": w * 3, "rejected": "zz"} for w in "abcdefgh"])
    data = jsonl(tmp_path / "d.jsonl", rows)

    def run(micro):
        values = {"stage": stage, "model_name_or_path": str(tiny_model_dir), "dataset": str(data),
                  "finetuning_type": "lora", "per_device_train_batch_size": micro,
                  "gradient_accumulation_steps": 8 // micro, "max_steps": 1, "save_steps": 0,
                  "output_dir": str(tmp_path / f"{stage}-{micro}"), "overwrite_output_dir": True,
                  "gradient_checkpointing": False}
        return lambda: run_stage(build_config(values))

    run(8)()  # warm-up
    waits = {micro: _device_waits(run(micro), by_rlhfkit=True) for micro in (8, 1)}
    assert waits[1] == waits[8], waits


def test_batches_reach_the_device_from_pinned_memory_without_a_host_wait():
    batch = {"input_ids": torch.arange(12).view(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    moved = {}
    assert _device_waits(lambda: moved.update(batch_to_device(batch, CUDA))) == 0
    for key, value in batch.items():
        assert moved[key].device.type == "cuda" and torch.equal(moved[key].cpu(), value)


def test_tf32_key_sets_cuda_float32_products():
    from rlhfkit.training.runtime import build_accelerator

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for setting in (True, False):
            build_accelerator(build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o",
                                            "tf32": setting}))
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (setting, setting)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
