"""Rollout engines: the static-KV-cache engine decodes what the recording loop decodes (greedy, and sampled
with one seed: the same draws from the same distribution), stops rows with a host check only every k
tokens, decodes LoRA on a merged copy that equals the PEFT model and leaves the trained base alone; with it
PPO's first epoch has importance ratio 1; the engine key picks the engine by device.

Token comparisons run the tiny model in float64 (rule 2 of conftest): the static cache's 4-D-masked
attention and the dynamic cache sum in other orders, far below any gap between two tokens' logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    TINY_VOCAB,
    TINY_WIDEST,
    cpu_config,
    float32_tolerance,
    log_softmax_tolerance,
    logit_bound,
    random_lora,
)
from rlhfkit.config import GenerationArguments
from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout import HFGenerator, RecordingEngine, StaticCacheEngine, build_rollout_engine
from rlhfkit.rollout.generation_copy import GenerationCopy

PROMPTS = ["hello there", "a", "write abc please", "xyz", "tell me more"]


def _setup(model_dir, attention="sdpa"):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention).double().eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left padding
    return tokenizer, model, batch["input_ids"], batch["attention_mask"]


def _both(tokenizer, model, ids, mask, args: GenerationArguments, stop_ids: list[int], interval: int):
    """The recording loop's and the static engine's batches, each from the same seed."""
    recording = RecordingEngine(HFGenerator(tokenizer, args, stop_ids), record=True)
    generator = recording.generator
    static = StaticCacheEngine(tokenizer, generator.settings, [], compile_step=False, stop_check_interval=interval)
    batches = []
    for engine in (recording, static):
        engine.sync_weights(model)
        torch.manual_seed(11)
        batches.append(engine.generate(ids, mask))
    return batches


def _stop_token_in_the_middle(tokenizer, model, ids, mask, args) -> int:
    """A token the first row produces at its 4th step (decoding with stop tokens banned): made a stop
    token, it ends that row early while the others run on (whatever the random weights decode)."""
    torch.manual_seed(11)
    banned = dataclasses.replace(args, min_new_tokens=args.max_new_tokens)
    first = HFGenerator(tokenizer, banned, [tokenizer.eos_token_id]).generate(model, ids, mask, record=True)
    return int(first.response_ids[0, 3])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_static_engine_equals_the_recording_loop_and_stops_rows_between_checks(tiny_model_dir, attention):
    tokenizer, model, ids, mask = _setup(tiny_model_dir, attention)
    args = GenerationArguments(do_sample=False, max_new_tokens=14, repetition_penalty=1.2)
    stop = _stop_token_in_the_middle(tokenizer, model, ids, mask, args)
    recorded, static = _both(tokenizer, model, ids, mask, args, [stop], interval=3)
    assert torch.equal(static.response_ids, recorded.response_ids)
    assert torch.equal(static.response_mask, recorded.response_mask)
    assert torch.equal(static.ended_with_stop, recorded.ended_with_stop)
    lengths = static.response_mask.sum(1)
    assert static.ended_with_stop[0] and lengths[0] <= 4 and lengths.max() > lengths[0]  # rows stop apart
    for row in range(len(PROMPTS)):  # a stopped row ends on its stop token; pad after it
        if static.ended_with_stop[row]:
            assert static.response_ids[row, lengths[row] - 1] == stop
            assert (static.response_ids[row, lengths[row]:] == tokenizer.pad_token_id).all()
    assert static.logprobs is None  # nothing recorded: PPO's evaluate phase computes them


@pytest.mark.parametrize("processors", [False, True])
def test_sampling_with_one_seed_draws_the_recording_loops_tokens(tiny_model_dir, processors):
    """Temperature and a minimum length (the loop's own distribution), or top-k/top-p and a repetition penalty
    (transformers' processors): each step draws once from the same probabilities, so the same tokens."""
    tokenizer, model, ids, mask = _setup(tiny_model_dir)
    extra = dict(top_k=20, top_p=0.9, repetition_penalty=1.3) if processors else dict(top_k=0, top_p=1.0)
    args = GenerationArguments(do_sample=True, temperature=0.7, max_new_tokens=12, min_new_tokens=2, **extra)
    stop = _stop_token_in_the_middle(tokenizer, model, ids, mask, args)
    recorded, static = _both(tokenizer, model, ids, mask, args, [stop], interval=5)
    assert torch.equal(static.response_ids, recorded.response_ids)
    assert torch.equal(static.ended_with_stop, recorded.ended_with_stop)
    assert recorded.ended_with_stop.any() and not recorded.ended_with_stop.all()


def test_a_decode_step_that_fails_to_compile_falls_back_to_the_eager_one(tiny_model_dir, monkeypatch):
    """The compiler failing on the first step (here: a stand-in that raises) costs nothing but the speed: the
    same tokens as the eager engine, the cache's write position put back before the eager step."""
    tokenizer, model, ids, mask = _setup(tiny_model_dir)
    settings = HFGenerator(tokenizer, GenerationArguments(do_sample=False, max_new_tokens=6), [2]).settings

    def failing_compile(function, **kwargs):
        def compiled(*args):
            for layer in args[1].layers:  # as if the failed attempt had advanced the cache
                layer.cumulative_length.add_(1)
            raise RuntimeError("compiler unavailable")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    outputs = []
    for compile_step in (True, False):
        engine = StaticCacheEngine(tokenizer, settings, [], compile_step=compile_step)
        engine.sync_weights(model)
        outputs.append(engine.generate(ids, mask).response_ids)
    assert torch.equal(outputs[0], outputs[1])


def test_merged_copy_equals_the_peft_model_and_leaves_the_base_alone(tiny_model_dir):
    """Float32: the copy's merged weight W + s B A and PEFT's separate products round differently (sums over the
    widest layer); the adapter's own effect on the logits is far larger. After the adapter changes, `refresh`
    rewrites the merged weights in the same memory."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    peft = random_lora(base, seed=3)
    before = {name: p.detach().clone() for name, p in peft.named_parameters()}
    copy = GenerationCopy(peft)
    ids = torch.randint(3, TINY_VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, merged = peft(input_ids=ids).logits, copy.model(input_ids=ids).logits
        with peft.disable_adapter():
            without = peft(input_ids=ids).logits
    atol = float32_tolerance(logit_bound(base), TINY_WIDEST)
    torch.testing.assert_close(merged, expected, atol=atol, rtol=0)
    assert (without - expected).abs().max() > 100 * atol  # the adapter matters
    assert all(torch.equal(before[name], p) for name, p in peft.named_parameters())  # nothing merged into the base
    assert copy.model.lm_head.weight.data_ptr() == base.lm_head.weight.data_ptr()  # unadapted tensors shared
    pointers = [merged_weight.data_ptr() for merged_weight, *_ in copy.merges]
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(-2.0)
        copy.refresh()
        expected, merged = peft(input_ids=ids).logits, copy.model(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=atol, rtol=0)
    assert [merged_weight.data_ptr() for merged_weight, *_ in copy.merges] == pointers


def test_a_full_policy_under_mixed_precision_decodes_on_a_copy_in_the_compute_dtype(tiny_model_dir):
    """Float32 (trained) weights, bf16 decoding: the copy's weights are the policy's rounded once to bf16 (its
    logits exactly those of the policy with its weights cast to bf16); the policy keeps its float32 weights;
    `refresh` follows an update in place. Without a compute dtype a full policy needs no copy."""
    import copy as copying

    tokenizer, _, ids, mask = _setup(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = StaticCacheEngine(tokenizer, HFGenerator(tokenizer, GenerationArguments(), [2]).settings, [],
                               compile_step=False, dtype=torch.bfloat16)
    engine.sync_weights(policy)
    generation = engine.copy
    assert generation is not None and generation.casts and not generation.merges
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    with torch.no_grad():
        for step in range(2):
            reference = copying.deepcopy(policy)
            for param in reference.parameters():  # the weights in bf16; buffers (rotary frequencies) as they are
                param.data = param.data.to(torch.bfloat16)
            expected = reference(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(generation.model(input_ids=ids, attention_mask=mask).logits, expected)
            policy.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # an optimizer step, in place
            engine.sync_weights(policy)
    plain = StaticCacheEngine(tokenizer, engine.settings, [], compile_step=False)
    plain.sync_weights(policy)
    assert plain.copy is None  # float32 decoding reads the policy itself


def test_static_engine_decodes_lora_on_the_merged_copy(tiny_model_dir):
    tokenizer, model, ids, mask = _setup(tiny_model_dir)
    peft = random_lora(model, seed=5).double().eval()
    args = GenerationArguments(do_sample=False, max_new_tokens=8)
    recording = RecordingEngine(HFGenerator(tokenizer, args, [tokenizer.eos_token_id]), record=False)
    static = StaticCacheEngine(tokenizer, recording.generator.settings, [], compile_step=False)
    for engine in (recording, static):
        engine.sync_weights(peft)
    assert static.copy is not None and static.copy.merges
    assert torch.equal(static.generate(ids, mask).response_ids, recording.generate(ids, mask).response_ids)


def test_importance_ratio_is_one_at_the_first_epoch_with_the_static_engine(tmp_path, tiny_model_dir, jsonl,
                                                                         monkeypatch):
    """The static engine records nothing, so the evaluate phase computes the old log-probs with the training
    forward: the first update's new log-probs equal them up to the float32 log-softmax's rounding."""
    from rlhfkit.rl import PPOLoss
    from rlhfkit.stages import run_stage

    prompts = jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {w}"} for w in "abcd"])
    (tmp_path / "rewards.py").write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    gaps, forward = [], PPOLoss.forward

    def recording_forward(self, logprobs, old_logprobs, *args, **kwargs):
        mask = args[3].bool()  # response_mask
        gaps.append(float((logprobs.detach() - old_logprobs)[mask].abs().max()))
        return forward(self, logprobs, old_logprobs, *args, **kwargs)

    monkeypatch.setattr(PPOLoss, "forward", recording_forward)
    run_stage(cpu_config({
        "stage": "ppo", "model_name_or_path": str(tiny_model_dir), "dataset": str(prompts),
        "finetuning_type": "lora", "reward_model_type": "function", "reward_model": f"{tmp_path / 'rewards.py'}:length",
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "ppo_epochs": 1, "max_new_tokens": 6,
        "max_steps": 1, "save_steps": 0, "rollout_engine": "static", "output_dir": str(tmp_path / "out")}))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tolerance = log_softmax_tolerance(logit_bound(base), TINY_VOCAB, temperature=0.95)
    assert len(gaps) == 2 and gaps[0] <= tolerance, (gaps, tolerance)  # the first micro-batch, before any step


def test_engine_key_picks_by_device_and_refuses_what_static_cannot_decode(tiny_model_dir):
    tokenizer, model, _, _ = _setup(tiny_model_dir)
    args = GenerationArguments()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def build(policy, device, sharded=False, **keys):
        return build_rollout_engine(GenerationArguments(**{**vars(args), **keys}), tokenizer, [2], True, policy,
                                    device, sharded)

    assert isinstance(build(model, cpu), RecordingEngine)
    assert isinstance(build(model, cuda), StaticCacheEngine)  # auto: static on CUDA
    assert isinstance(build(model, cpu, rollout_engine="static"), StaticCacheEngine)
    assert isinstance(build(model, cuda, sharded=True), RecordingEngine)  # auto falls back for FSDP / ZeRO-3
    with pytest.raises(RlhfkitError, match="rollout_engine: static does not support sharded"):
        build(model, cuda, sharded=True, rollout_engine="static")
    model.config._attn_implementation = "flash_attention_2"
    assert isinstance(build(model, cuda), RecordingEngine)
    with pytest.raises(RlhfkitError, match="attention kernel flash_attention_2"):
        build(model, cpu, rollout_engine="static")
    assert build(model, cpu, rollout_engine="recording").records  # logprobs_from_rollout


def test_rollout_engine_keys_are_checked():
    with pytest.raises(RlhfkitError, match="rollout_engine is 'vllm'; allowed: auto, recording, static"):
        cpu_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "rollout_engine": "vllm"})
    with pytest.raises(RlhfkitError, match="stop_check_interval must be > 0"):
        cpu_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "stop_check_interval": 0})
    assert cpu_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o",
                       "rollout_compile": False}).generation.rollout_compile == "off"
