"""`rlhfkit eval`: numbers on fixed function rewards, the bootstrap interval, a LoRA reward model,
paired comparison with a baseline, the saved files, output_dir's run lock and clean errors."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    TINY_HIDDEN,
    TINY_WIDEST,
    cpu_config,
    float32_tolerance,
    hold_output_lock,
    one_error_line,
    raw_scores,
    write_cpu_config,
    write_jsonl,
)
from rlhfkit.cli import main
from rlhfkit.commands.evaluate import RESULTS_FILE, SAMPLES_FILE, run_eval
from rlhfkit.data import get_template
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.value_head import ValueHead
from rlhfkit.run_lock import LOCK_FILE
from rlhfkit.tracking.summary import bootstrap_interval, summarize



@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir, reward_functions):
    """Prompts, reward functions, and a LoRA policy and a LoRA RM with random (non-zero) weights."""
    root = tmp_path_factory.mktemp("eval")
    write_jsonl(root / "prompts.jsonl", [{"instruction": f"rate {n}"} for n in (1, 2, 3, 4)])
    (root / "rew.py").write_text(reward_functions.read_text())
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    policy.save_pretrained(root / "policy")
    rm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    rm.save_pretrained(root / "rm")
    ValueHead(TINY_HIDDEN, zero_init=False).save(root / "rm")
    return root


def _config(tiny_model_dir, assets, out, **keys):
    values = dict(model_name_or_path=str(tiny_model_dir), dataset=str(assets / "prompts.jsonl"), output_dir=str(out),
                  max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, per_device_eval_batch_size=3, seed=7,
                  reward_models=[{"path": f"{assets / 'rew.py'}:prompt_number", "type": "function", "weight": 0.5,
                                  "name": "number"},
                                 {"path": f"{assets / 'rew.py'}:length", "type": "function", "weight": 2.0,
                                  "name": "length"}])
    values.update(keys)
    return cpu_config(values, check=False)


def _rows(output_dir):
    return [json.loads(line) for line in (output_dir / SAMPLES_FILE).read_text().splitlines()]


# ------------------------------------------------------------------------------ statistics


def test_bootstrap_interval_by_hand():
    assert bootstrap_interval([3.0]) == (3.0, 3.0)
    assert bootstrap_interval([2.0] * 10) == (2.0, 2.0)
    # Two values: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% order statistics of 2000 resamples are 0 and 1.
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # Fifty 0s and fifty 1s: the mean's standard error is sqrt(0.25 / 100) = 0.05, the interval about 0.5 +- 0.098.
    # Allowed: 4 standard errors of a 2.5% quantile of 2000 resampled means, sqrt(0.025 * 0.975 / 2000)
    # / (phi(1.96) / 0.05) = 0.003, plus the means' grid of 0.01: 0.012 + 0.01 ~= 0.02.
    low, high = bootstrap_interval([0.0, 1.0] * 50)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_interval([0.0, 1.0] * 50, seed=3) == bootstrap_interval([0.0, 1.0] * 50, seed=3)


def test_summarize_by_hand():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5
    assert s["std"] == pytest.approx(math.sqrt(5.0 / 3.0))  # squared deviations 2.25+0.25+0.25+2.25 = 5, / (n-1)
    assert 1.0 <= s["ci_low"] < 2.5 < s["ci_high"] <= 4.0
    assert summarize([5.0])["std"] == 0.0


# ------------------------------------------------------------------------------ eval runs


def test_eval_numbers_on_fixed_function_rewards(tiny_model_dir, assets, tmp_path):
    results = run_eval(_config(tiny_model_dir, assets, tmp_path / "base"))
    rows = _rows(tmp_path / "base")
    assert [r["prompt"] for r in rows] == ["rate 1", "rate 2", "rate 3", "rate 4"]
    for row in rows:
        assert row["scores"] == {"number": float(row["prompt"][-1]), "length": float(len(row["response"]))}
        # Halves and small integers: exact in binary floating point.
        assert row["reward"] == 0.5 * float(row["prompt"][-1]) + 2.0 * len(row["response"])
        # One token per character (special tokens are not decoded), plus the stop token if it ended by itself.
        assert len(row["response"]) + int(row["ended_with_eos"]) <= row["response_length"] <= 6
    summary = results["summary"]
    assert summary["score/number"]["mean"] == 2.5
    assert summary["score/number"]["std"] == pytest.approx(math.sqrt(5.0 / 3.0))
    lengths = [len(r["response"]) for r in rows]
    assert summary["score/length"]["mean"] == sum(lengths) / 4  # quarters: exact
    assert summary["reward"]["mean"] == 0.5 * 2.5 + 2.0 * sum(lengths) / 4
    for stats in summary.values():
        assert stats["n"] == 4 and stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
    saved = json.loads((tmp_path / "base" / RESULTS_FILE).read_text())
    assert saved["summary"] == summary and saved["weights"] == {"number": 0.5, "length": 2.0}
    assert saved["prompts"] == 4 and saved["seed"] == 7
    # Same config, same seed: the same responses, so policies are compared on equal terms.
    run_eval(_config(tiny_model_dir, assets, tmp_path / "again"))
    assert _rows(tmp_path / "again") == rows


def test_compare_two_policies(tiny_model_dir, assets, tmp_path, capsys):
    run_eval(_config(tiny_model_dir, assets, tmp_path / "base"))
    results = run_eval(_config(tiny_model_dir, assets, tmp_path / "policy",
                               adapter_name_or_path=str(assets / "policy")), baseline=str(tmp_path / "base"))
    base_rows, policy_rows = _rows(tmp_path / "base"), _rows(tmp_path / "policy")
    assert results["adapters"] == [str(assets / "policy")]
    assert [r["response"] for r in policy_rows] != [r["response"] for r in base_rows]
    difference = results["difference"]
    # The prompt-only reward is the same for both: a zero difference with a zero-width interval.
    assert difference["score/number"] == {"n": 4, "mean": 0.0, "std": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    expected = sum(len(a["response"]) - len(b["response"]) for a, b in zip(policy_rows, base_rows)) / 4
    assert difference["score/length"]["mean"] == expected  # quarters: exact
    printed = capsys.readouterr().out
    assert "score/number" in printed and "difference to" in printed and "95% CI" in printed


def test_lora_reward_model_scores(tiny_model_dir, assets, tmp_path):
    results = run_eval(_config(tiny_model_dir, assets, tmp_path / "rm", reward_models=None,
                               reward_model=str(assets / "rm"), reward_model_type="lora"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = get_template(None, tokenizer)
    rm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), assets / "rm").eval()
    head = ValueHead.load(assets / "rm", TINY_HIDDEN)
    rows = _rows(tmp_path / "rm")
    # Rows whose text holds every response token (a sampled special token other than EOS is not decoded).
    complete = [r for r in rows if r["response_length"] == len(r["response"]) + int(r["ended_with_eos"])]
    assert len(complete) >= 2
    sequences = [template.encode_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}])
                 + tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [2] * row["ended_with_eos"]
                 for row in complete]
    expected, magnitudes = raw_scores(rm, head, sequences)
    # The eval's float32 scores (the adapter merged, padded batches) against the raw model's: float32
    # rounding relative to the head's summands, over the widest layer (see conftest).
    scores = torch.tensor([row["scores"]["lora"] for row in complete], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, atol=float32_tolerance(magnitudes, TINY_WIDEST), rtol=0)
    assert set(results["summary"]) == {"reward", "score/lora", "response_length", "ended_with_eos"}


def test_cli_eval(tiny_model_dir, assets, tmp_path):
    config = write_cpu_config(tmp_path / "eval.yaml", {
        "model_name_or_path": str(tiny_model_dir), "dataset": str(assets / "prompts.jsonl"),
        "reward_model": f"{assets / 'rew.py'}:prompt_number", "reward_model_type": "function",
        "output_dir": str(tmp_path / "out"), "max_new_tokens": 4})
    command = [sys.executable, "-m", "rlhfkit.cli", "eval", str(config), "max_samples=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "score/function" in result.stdout and "1.5" in result.stdout  # mean of 1 and 2
    assert json.loads((tmp_path / "out" / RESULTS_FILE).read_text())["summary"]["score/function"]["mean"] == 1.5
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "overwrite_output_dir" in again.stderr.splitlines()[-1]


@pytest.mark.parametrize("keys, fragment", [
    ({"reward_models": None}, "eval needs reward_model"),
    ({"dataset": None}, "dataset is required"),
    ({"output_dir": None}, "output_dir is required"),
    ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
])
def test_bad_eval_config(tiny_model_dir, assets, tmp_path, keys, fragment):
    with pytest.raises(RlhfkitError, match=fragment):
        run_eval(_config(tiny_model_dir, assets, tmp_path / "out", **keys))


def test_baseline_with_other_prompts_is_refused(tiny_model_dir, assets, tmp_path):
    run_eval(_config(tiny_model_dir, assets, tmp_path / "two", max_samples=2))
    with pytest.raises(RlhfkitError, match="prompts differ"):
        run_eval(_config(tiny_model_dir, assets, tmp_path / "four"), baseline=str(tmp_path / "two"))
    with pytest.raises(RlhfkitError, match="eval_samples.jsonl not found"):
        run_eval(_config(tiny_model_dir, assets, tmp_path / "x"), baseline=str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------ one run per output_dir


def _eval_cli(capsys, tiny_model_dir, assets, tmp_path, out) -> tuple[int, str]:
    """`rlhfkit eval` in this process, two prompts into `out`; (exit status, stderr)."""
    config = write_cpu_config(tmp_path / "eval.yaml", {
        "model_name_or_path": str(tiny_model_dir), "dataset": str(assets / "prompts.jsonl"), "max_samples": 2,
        "reward_model": f"{assets / 'rew.py'}:prompt_number", "reward_model_type": "function",
        "output_dir": str(out), "max_new_tokens": 2})
    code = main(["eval", str(config)])
    return code, capsys.readouterr().err


def test_eval_into_a_locked_output_dir_is_refused(tiny_model_dir, assets, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_output_lock(out)  # as a training run or another eval into `out` holds it
    try:
        code, err = _eval_cli(capsys, tiny_model_dir, assets, tmp_path, out)
        assert code == 2
        line = one_error_line(err)
        assert f"output_dir {out} is in use by another run" in line and f"process {holder.pid}" in line
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written
    finally:
        holder.communicate("", timeout=30)
    code, err = _eval_cli(capsys, tiny_model_dir, assets, tmp_path, out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [RESULTS_FILE, SAMPLES_FILE]  # its own lock released


def test_eval_takes_over_a_lock_left_by_a_killed_run(tiny_model_dir, assets, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_output_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / LOCK_FILE).is_file()
    code, err = _eval_cli(capsys, tiny_model_dir, assets, tmp_path, out)
    assert code == 0, err
    assert f"left by process {holder.pid}" in err and "taking it over" in err
    assert sorted(p.name for p in out.iterdir()) == [RESULTS_FILE, SAMPLES_FILE]


def test_eval_refuses_a_multi_process_launch(tiny_model_dir, assets, tmp_path, monkeypatch):
    """eval runs in one process: every process of a launch would write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RlhfkitError, match=r"rlhfkit eval runs in one process.*WORLD_SIZE=2"):
        run_eval(_config(tiny_model_dir, assets, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
