"""Checks that need a CUDA device (marked `cuda`; skipped without one): a bf16 PPO step with LoRA and full
fine-tuning through the accelerator's defaults (static rollout engine with a CUDA-graph decode step, chunked
LM head), the compiled static engine against the recording loop, and the memory that gradient checkpointing
and the chunked head save. Run them with ``pytest -m cuda``.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import EOS_ID
from rlhfkit.config import GenerationArguments, build_config
from rlhfkit.models.loading import enable_gradient_checkpointing
from rlhfkit.rollout import HFGenerator, RecordingEngine, StaticCacheEngine
from rlhfkit.stages import run_stage
from rlhfkit.stages.ppo_steps import response_forward
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
