"""End-to-end tests of the `sft` and `rm` stages on the tiny character-level Llama.

Each run is a few hundred milliseconds on one CPU thread: the data sets are tiny and memorisable,
so learning is asserted with wide margins, and the saved folders are reloaded with plain
transformers / peft calls (not rlhfkit's loaders) to check what a user would get.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    COMPARABLE_ADAM_EPSILON,
    EOS_ID,
    EPS32,
    TINY_HIDDEN,
    adamw_weight_tolerance,
    chat_prompt_ids,
    cpu_config,
    float32_tolerance,
    greedy_reply,
    write_jsonl,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.fingerprint import FINGERPRINT_FILE, weights_fingerprint
from rlhfkit.models.forward import sequence_scores
from rlhfkit.models.value_head import VALUE_HEAD_FILE, ValueHead
from rlhfkit.stages import run_stage
from rlhfkit.tracking.trainer_log import read_trainer_log





def _run(model_dir, output_dir, **keys):
    values = {"model_name_or_path": str(model_dir), "output_dir": str(output_dir), "logging_steps": 1}
    values.update(keys)
    return run_stage(cpu_config(values))


# ---------------------------------------------------------------------------------------- SFT

WORDS = "abcdefgh"


def _sft_rows():
    return [{"instruction": f"say {w}", "output": w * 4} for w in WORDS]


def _check_sft_learned(output_dir):
    log = read_trainer_log(output_dir)
    losses = [record["loss"] for record in log]
    assert len(losses) >= 10
    assert all(isinstance(x, float) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] < 0.5, losses


def _count_reproduced(model, tokenizer) -> int:
    model.eval()
    return sum(greedy_reply(model, tokenizer, [{"role": "user", "content": f"say {w}"}], 5).startswith(w * 4)
               for w in WORDS)


def test_sft_full_learns_and_reloads(tiny_model_dir, tmp_path, jsonl):
    data = jsonl(tmp_path / "sft.jsonl", _sft_rows())
    out = tmp_path / "out"
    final = _run(tiny_model_dir, out, stage="sft", finetuning_type="full", dataset=str(data),
                 learning_rate=3e-3, per_device_train_batch_size=8, max_steps=40)
    _check_sft_learned(out)
    assert final["train_loss"] == read_trainer_log(out)[-1]["loss"]  # the last logged loss itself
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The saved weights differ from the base: it trained and saved the trained weights.
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(base)
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    reproduced = _count_reproduced(model, tokenizer)
    assert reproduced >= len(WORDS) // 2


def test_sft_lora_learns_and_reloads(tiny_model_dir, tmp_path, jsonl):
    data = jsonl(tmp_path / "sft.jsonl", _sft_rows())
    out = tmp_path / "out"
    _run(tiny_model_dir, out, stage="sft", finetuning_type="lora", dataset=str(data),
         learning_rate=3e-2, per_device_train_batch_size=8, max_steps=60)
    _check_sft_learned(out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    untrained = _count_reproduced(base, tokenizer)
    model = PeftModel.from_pretrained(base, out)
    reproduced = _count_reproduced(model, tokenizer)
    assert reproduced >= max(len(WORDS) // 2, untrained + 1)


# Accumulation runs: 4 sequences of at most 48 tokens per step, through layers up to 128 wide.
ACCUMULATION_STEPS, ACCUMULATION_LR, ACCUMULATION_TERMS = 3, 1e-3, 4 * 48 * 128


def _big_and_accumulated(model_dir, tmp_path, batch: int, accumulation: int, **common):
    """The same `ACCUMULATION_STEPS` steps with 4 rows at once and with `accumulation` micro-batches of
    `batch` rows; AdamW with `COMPARABLE_ADAM_EPSILON`, so their weights can be compared (see conftest).
    Returns the two output folders and the tolerances for weights and for logged statistics."""
    common = dict(common, learning_rate=ACCUMULATION_LR, lr_scheduler_type="constant", max_steps=ACCUMULATION_STEPS,
                  adam_epsilon=COMPARABLE_ADAM_EPSILON)
    _run(model_dir, tmp_path / "big", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common)
    _run(model_dir, tmp_path / "acc", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
         **common)
    weight_atol = adamw_weight_tolerance(ACCUMULATION_LR, ACCUMULATION_STEPS, ACCUMULATION_TERMS)
    # Logged losses and norms: float32 sums over the step's positions and layers, relative to their size.
    log_rel = float32_tolerance(1.0, ACCUMULATION_TERMS)
    return tmp_path / "big", tmp_path / "acc", weight_atol, log_rel


@pytest.mark.parametrize("batch,accumulation,chunk", [(2, 2, 0), (1, 4, 0), (1, 4, 5)])
def test_sft_gradient_accumulation_equals_one_large_batch(tiny_model_dir, tmp_path, jsonl, batch, accumulation, chunk):
    """`chunk`: the LM head in chunks of that many label positions (found on the host) in both runs."""
    # Replies of 1, 3, 6 and 11 characters: a per-micro-batch mean would weight them differently
    # from the token-normalised mean over the whole step.
    rows = [{"instruction": "one", "output": "a"}, {"instruction": "three", "output": "bcd"},
            {"instruction": "six", "output": "efghij"}, {"instruction": "eleven", "output": "klmnopqrstu"}]
    data = jsonl(tmp_path / "sft.jsonl", rows)
    big_dir, acc_dir, weight_atol, log_rel = _big_and_accumulated(tiny_model_dir, tmp_path, batch, accumulation,
                                                                  stage="sft", finetuning_type="full",
                                                                  dataset=str(data), logits_chunk_size=chunk)
    big = load_file(str(big_dir / "model.safetensors"))
    acc = load_file(str(acc_dir / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(big) == set(acc)
    moved = 0
    for name in big:
        torch.testing.assert_close(acc[name], big[name], atol=weight_atol, rtol=0, msg=name)
        moved += not torch.equal(big[name], base[name])
    assert moved > 0  # the comparison is not between two untouched copies of the base
    largest_move = max(float((big[name] - base[name]).abs().max()) for name in big)
    assert largest_move > 10 * weight_atol  # the weights moved far more than the tolerance
    # Adam hides a constant factor in the gradient; the logged pre-clipping norm does not.
    big_log, acc_log = read_trainer_log(big_dir), read_trainer_log(acc_dir)
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in acc_log] == pytest.approx([r[key] for r in big_log], rel=log_rel, abs=0), key


# ----------------------------------------------------------------------------------------- RM


def _preference_rows(rng: random.Random, count: int) -> list[dict]:
    def word(alphabet):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 10)))

    return [{"instruction": f"pick {rng.choice(WORDS)}", "chosen": word("aeiou"), "rejected": word("xyzqw")}
            for _ in range(count)]


def _pair_ids(tokenizer, row, reply_key):
    reply = tokenizer(row[reply_key], add_special_tokens=False)["input_ids"]
    return chat_prompt_ids(tokenizer, row["instruction"]) + reply + [EOS_ID]


def _reloaded_accuracy(model, head, tokenizer, rows) -> tuple[float, torch.Tensor]:
    """Accuracy and margins of the reloaded RM, one sequence at a time (no padding at all)."""
    margins = []
    with torch.no_grad():
        for row in rows:
            scores = []
            for key in ("chosen", "rejected"):
                ids = torch.tensor([_pair_ids(tokenizer, row, key)])
                scores.append(float(sequence_scores(model, head, ids, torch.ones_like(ids))[0]))
            margins.append(scores[0] - scores[1])
    margins = torch.tensor(margins)
    return float((margins > 0).float().mean()), margins


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("prefs")
    train, held_out = _preference_rows(rng, 200), _preference_rows(rng, 40)
    return write_jsonl(root / "train.jsonl", train), write_jsonl(root / "eval.jsonl", held_out), held_out


def _train_rm(model_dir, out, preference_files, finetuning_type, learning_rate, max_steps, **keys):
    train, held_out, _ = preference_files
    return _run(model_dir, out, stage="rm", finetuning_type=finetuning_type, dataset=str(train),
                eval_dataset=str(held_out), learning_rate=learning_rate, per_device_train_batch_size=16,
                per_device_eval_batch_size=16, max_steps=max_steps, **keys)


def test_rm_lora_learns_preference_and_reloads(tiny_model_dir, tmp_path, preference_files):
    out = tmp_path / "rm"
    final = _train_rm(tiny_model_dir, out, preference_files, "lora", 1e-2, 15)
    assert final["eval_accuracy"] >= 0.9, final
    log = read_trainer_log(out)
    assert log[-1]["loss"] < log[0]["loss"]
    for name in (VALUE_HEAD_FILE, "adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    # The value head is not inside the adapter weights.
    assert not any("summary" in k for k in load_file(str(out / "adapter_model.safetensors")))
    # LLaMA-Factory's layout: it reads this folder as a LoRA reward model (see test_foreign_models).
    assert set(load_file(str(out / VALUE_HEAD_FILE))) == {"v_head.summary.weight", "v_head.summary.bias"}
    # The base is recorded for PPO's check: its structure and the fingerprint of its weights.
    recorded = json.loads((out / FINGERPRINT_FILE).read_text())
    assert recorded["structure"]["hidden_size"] == TINY_HIDDEN and recorded["merged_adapters"] == []
    assert recorded["weights"] == weights_fingerprint([tiny_model_dir])

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out).eval()
    head = ValueHead.load(out, base.config.hidden_size)
    tokenizer = AutoTokenizer.from_pretrained(out)
    held_out = preference_files[2]
    accuracy, margins = _reloaded_accuracy(model, head, tokenizer, held_out)
    # Same held-out pairs, same weights: the reloaded model orders them as the trained one did (a share
    # of 40 pairs, which either side may have rounded to float32).
    assert accuracy == pytest.approx(final["eval_accuracy"], abs=EPS32)
    assert float(margins[0]) > 0
    # The trained adapter matters: the base with the same head does not separate the pairs as well.
    with model.disable_adapter():
        _, base_margins = _reloaded_accuracy(model, head, tokenizer, held_out)
    assert not torch.allclose(base_margins, margins)


@pytest.mark.parametrize("batch,accumulation", [(2, 2), (1, 4)])
def test_rm_gradient_accumulation_equals_one_large_batch(tiny_model_dir, tmp_path, jsonl, batch, accumulation):
    rows = [{"instruction": "a", "chosen": "aei", "rejected": "xyzqwxyz"},
            {"instruction": "longer prompt", "chosen": "ouaeiouaei", "rejected": "q"},
            {"instruction": "b", "chosen": "e", "rejected": "wxy"},
            {"instruction": "c c c", "chosen": "aaaaaa", "rejected": "zzzzzzzzzzzz"}]
    data = jsonl(tmp_path / "pairs.jsonl", rows)
    big_dir, acc_dir, weight_atol, log_rel = _big_and_accumulated(tiny_model_dir, tmp_path, batch, accumulation,
                                                                  stage="rm", finetuning_type="full",
                                                                  dataset=str(data))
    for name in ("model.safetensors", VALUE_HEAD_FILE):
        big = load_file(str(big_dir / name))
        acc = load_file(str(acc_dir / name))
        assert set(big) == set(acc)
        for key in big:
            if key == "v_head.summary.bias":
                # The pairwise loss depends on score differences only, so the head's bias has a zero
                # gradient; Adam turns rounding noise in it into moves of at most ~lr per step.
                bound = ACCUMULATION_STEPS * ACCUMULATION_LR * 1.01
                assert float(acc[key].abs().max()) <= bound and float(big[key].abs().max()) <= bound
            torch.testing.assert_close(acc[key], big[key], atol=weight_atol, rtol=0, msg=f"{name}:{key}")
    big_log, acc_log = read_trainer_log(big_dir), read_trainer_log(acc_dir)
    for key in ("loss", "accuracy", "margin", "grad_norm"):
        # accuracy: a share of 4 pairs, exact; the others relative to their size (see above).
        assert [r[key] for r in acc_log] == pytest.approx([r[key] for r in big_log], rel=log_rel, abs=0), key


def test_rm_full_learns_preference(tiny_model_dir, tmp_path, preference_files):
    out = tmp_path / "rm"
    final = _train_rm(tiny_model_dir, out, preference_files, "full", 1e-3, 15)
    assert final["eval_accuracy"] >= 0.9, final
    assert (out / VALUE_HEAD_FILE).is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    saved = load_file(str(out / "model.safetensors"))
    assert not any("summary" in k for k in saved)  # the head is kept out of the LM weights
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    head = ValueHead.load(out, model.config.hidden_size)
    accuracy, _ = _reloaded_accuracy(model, head, AutoTokenizer.from_pretrained(out), preference_files[2])
    assert accuracy == pytest.approx(final["eval_accuracy"], abs=EPS32)  # a share of 40 pairs, as above


def _reload_rm(model_dir, rm_dir, finetuning_type):
    """The RM in `rm_dir` loaded with plain transformers / peft, and its head."""
    if finetuning_type == "lora":
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), rm_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(rm_dir)
    return model.eval(), ValueHead.load(rm_dir, TINY_HIDDEN)


def _fixed_pair_scores(model, head, tokenizer, row) -> torch.Tensor:
    with torch.no_grad():
        ids = [torch.tensor([_pair_ids(tokenizer, row, key)]) for key in ("chosen", "rejected")]
        return torch.cat([sequence_scores(model, head, i, torch.ones_like(i)) for i in ids])


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_rm_continues_from_the_value_head_of_the_reward_model(tiny_model_dir, tmp_path, preference_files,
                                                                finetuning_type, caplog):
    first = tmp_path / "rm"
    _train_rm(tiny_model_dir, first, preference_files, finetuning_type, 1e-2, 2)
    trained = ValueHead.load(first, TINY_HIDDEN).state_dict()
    assert float(trained["summary.weight"].abs().max()) > 0

    # A one-step run whose warm-up (2 steps) gives that step learning rate 0: every weight stays where it
    # started, so the saved head is the one the run started from.
    def continue_from(source, out, **keys):
        model_dir, adapter = (tiny_model_dir, str(source)) if finetuning_type == "lora" else (source, None)
        with caplog.at_level("INFO", logger="rlhfkit.stages.rm"):
            caplog.clear()
            _train_rm(model_dir, out, preference_files, finetuning_type, 1e-2, 1, warmup_steps=2,
                      adapter_name_or_path=adapter, **keys)
        return ValueHead.load(out, TINY_HIDDEN).state_dict(), caplog.text

    head, log = continue_from(first, tmp_path / "continued")
    for name, tensor in trained.items():
        assert torch.equal(head[name], tensor), name  # the trained head, not a fresh one
    assert f"value head loaded from {first}" in log
    # The continued RM scores a fixed pair exactly as the first one does (same weights, same arithmetic).
    tokenizer = AutoTokenizer.from_pretrained(first)
    row = preference_files[2][0]
    expected = _fixed_pair_scores(*_reload_rm(tiny_model_dir, first, finetuning_type), tokenizer, row)
    got = _fixed_pair_scores(*_reload_rm(tiny_model_dir, tmp_path / "continued", finetuning_type), tokenizer, row)
    assert torch.equal(got, expected)
    if finetuning_type == "lora":  # merged into the base under a fresh adapter, the RM keeps its head too
        head, _ = continue_from(first, tmp_path / "new_adapter", create_new_adapter=True)
        assert all(torch.equal(head[name], tensor) for name, tensor in trained.items())

    # Weights without a value head (an adapter folder without one; the base model): a fresh head, as before.
    if finetuning_type == "lora":
        plain = tmp_path / "adapter_only"
        plain.mkdir()
        for path in first.iterdir():
            if path.name != VALUE_HEAD_FILE:
                (plain / path.name).write_bytes(path.read_bytes())
    else:
        plain = tiny_model_dir
    head, log = continue_from(plain, tmp_path / "fresh")
    assert not torch.equal(head["summary.weight"], trained["summary.weight"])
    assert float(head["summary.weight"].abs().max()) > 0 and torch.equal(head["summary.bias"], torch.zeros(1))
    assert "value head loaded" not in log


# ------------------------------------------------------------------------------ value head files


def test_value_head_round_trip_is_exact(tmp_path):
    torch.manual_seed(3)
    head = ValueHead(24, zero_init=False)
    with torch.no_grad():
        head.summary.bias.fill_(0.375)
    path = head.save(tmp_path)
    assert path == tmp_path / VALUE_HEAD_FILE
    loaded = ValueHead.load(tmp_path, 24)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert ValueHead.load(tmp_path).summary.in_features == 24  # hidden size read from the file
    hidden = torch.randn(2, 5, 24)
    assert torch.equal(loaded(hidden), head(hidden))
    assert loaded(hidden).shape == (2, 5)


def test_value_head_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(RlhfkitError) as info:
        ValueHead.load(tmp_path, 24)
    message = str(info.value)
    assert "\n" not in message
    assert VALUE_HEAD_FILE in message and str(tmp_path) in message


def test_value_head_wrong_hidden_size_is_a_one_line_error(tmp_path):
    ValueHead(24).save(tmp_path)
    with pytest.raises(RlhfkitError) as info:
        ValueHead.load(tmp_path, 32)
    message = str(info.value)
    assert "\n" not in message
    assert "24" in message and "32" in message
