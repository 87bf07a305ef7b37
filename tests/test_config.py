"""Config loading: YAML + overrides, LLaMA-Factory keys, type and range errors, the reference doc."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rlhfkit.config import SECTIONS, build_config, load_config
from rlhfkit.config.reference import field_docs, render_reference
from rlhfkit.errors import RlhfkitError

BASE = {"model_name_or_path": "m", "output_dir": "o", "dataset": "d"}


def test_yaml_and_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\nmodel_name_or_path: m\noutput_dir: o\ndataset: d\nlearning_rate: 1.0e-5\n"
                    "do_train: true\npreprocessing_num_workers: 16\n")
    config = load_config(path, ["learning_rate=3e-4", "lora_rank=16", "bf16=true", "lora_target=q_proj,v_proj"])
    assert config.training.learning_rate == 3e-4  # the override, parsed
    assert config.finetuning.lora_rank == 16
    assert config.training.bf16 is True
    assert config.finetuning.lora_target == "q_proj,v_proj"
    assert config.ignored_keys == ["do_train", "preprocessing_num_workers"]


def test_llamafactory_ppo_example_is_accepted():
    values = dict(BASE, stage="ppo", reward_model="saves/rm", trust_remote_code=True, do_train=True,
                  finetuning_type="lora", lora_rank=8, lora_target="all", template="llama3", cutoff_len=2048,
                  max_samples=1000, overwrite_cache=True, preprocessing_num_workers=16, dataloader_num_workers=4,
                  logging_steps=10, save_steps=500, plot_loss=True, overwrite_output_dir=True, report_to="none",
                  per_device_train_batch_size=1, gradient_accumulation_steps=8, learning_rate=1.0e-5,
                  num_train_epochs=3.0, lr_scheduler_type="cosine", warmup_ratio=0.1, bf16=True,
                  ddp_timeout=180000000, max_new_tokens=512, top_k=0, top_p=0.9)
    config = build_config(values)
    assert config.ppo.reward_model == "saves/rm" and config.generation.top_k == 0


@pytest.mark.parametrize("values, fragment", [
    ({"learning_rat": 1e-5}, "did you mean 'learning_rate'"),
    ({"learning_rate": "fast"}, "'learning_rate' must be a number"),
    ({"learning_rate": -1.0}, "learning_rate must be > 0"),
    ({"lora_rank": 2.5}, "'lora_rank' must be an integer"),
    ({"bf16": "yes"}, "'bf16' must be true or false"),
    ({"stage": "dpo"}, "stage 'dpo' is not supported (we have sft, rm, ppo; "),
    ({"finetuning_type": "qlora"}, "allowed: lora, full, freeze"),
    ({"bf16": True, "fp16": True}, "choose one"),
    ({"warmup_ratio": 1.5}, "warmup_ratio must be in [0, 1)"),
    ({"torch_compile_memory_budget": 0}, "torch_compile_memory_budget must be in (0, 1]"),
    ({"stage": "ppo"}, "stage ppo needs reward_model"),
    ({"stage": "ppo", "reward_model": "r", "kl_estimator": "k4"}, "allowed: k1, k2, k3"),
    ({"stage": "ppo", "reward_model": "r", "advantage_estimator": "ppo"}, "advantage_estimator is 'ppo'; allowed: gae"),
    ({"stage": "ppo", "reward_model": "r", "loss_aggregation": "mean"}, "allowed: token_mean, seq_mean_token_mean"),
    ({"stage": "ppo", "reward_model": "r", "num_generations": 0}, "num_generations must be > 0"),
    ({"stage": "ppo", "reward_model": "r", "cliprange_high": -0.1}, "cliprange_high must be > 0"),
    ({"stage": "ppo", "reward_model": "r", "gamma": 1.5}, "gamma must be in [0, 1]"),
    ({"stage": "ppo", "reward_model": "r", "do_sample": False}, "do_sample: true"),
    ({"create_new_adapter": True}, "needs adapter_name_or_path"),
    ({"infer_backend": "vllm"}, "infer_backend: vllm is not supported"),
])
def test_errors_name_the_key(values, fragment):
    with pytest.raises(RlhfkitError) as err:
        build_config(dict(BASE, **values))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_keys():
    with pytest.raises(RlhfkitError, match="model_name_or_path is required"):
        build_config({"output_dir": "o", "dataset": "d"})


def test_bad_yaml_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: sft\nmodel_name_or_path: [unclosed\n")
    with pytest.raises(RlhfkitError, match=r"bad.yaml line \d+"):
        load_config(path)


def test_every_key_documented_and_reference_current():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    reference = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert reference.read_text() == render_reference(), "regenerate docs/configuration.md"


def test_the_config_knows_the_estimators_and_aggregations_rl_implements():
    """config/ cannot import rl/ (torch), so its lists are copies: they must stay the same."""
    from rlhfkit.config import validation
    from rlhfkit.rl import KL_ESTIMATORS, estimators, policy_losses

    assert validation.ADVANTAGE_ESTIMATORS == estimators.ADVANTAGE_ESTIMATORS
    assert validation.GROUP_ESTIMATORS == estimators.GROUP_ADVANTAGE_ESTIMATORS
    assert validation.LOSS_AGGREGATIONS == policy_losses.LOSS_AGGREGATIONS
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


# ------------------------------------------------------------------ hostile YAML and overrides

PPO = dict(BASE, stage="ppo", reward_model="m:f", reward_model_type="function")


def _yaml(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _base_yaml(values: dict) -> str:
    return "".join(f"{key}: {value}\n" for key, value in values.items())


@pytest.mark.parametrize("yaml_lines, overrides, key", [
    ("", ["learning_rate=nan"], "learning_rate"),
    ("", ["num_train_epochs=inf"], "num_train_epochs"),
    ("", ["temperature=nan"], "temperature"),
    ("learning_rate: .inf\n", [], "learning_rate"),
    ("max_grad_norm: -.inf\n", [], "max_grad_norm"),
    ("reward_clip: .nan\n", [], "reward_clip"),
    ("adam_epsilon: 1" + "0" * 400 + "\n", [], "adam_epsilon"),  # an int beyond float's range
])
def test_nan_and_inf_are_refused_where_a_number_is_meant(tmp_path, yaml_lines, overrides, key):
    path = _yaml(tmp_path, _base_yaml(PPO) + yaml_lines)
    with pytest.raises(RlhfkitError) as info:
        load_config(path, overrides)
    assert f"'{key}' must be a finite number" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("weight", [".nan", ".inf", "true", "heavy"])
def test_reward_weights_must_be_finite_numbers(tmp_path, weight):
    values = dict(PPO, reward_model=None)
    path = _yaml(tmp_path, _base_yaml({k: v for k, v in values.items() if v is not None})
                 + f"reward_models:\n  - path: m:f\n    type: function\n    weight: {weight}\n")
    with pytest.raises(RlhfkitError, match=r"reward_models\[0\].weight must be a finite number"):
        load_config(path)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    path = _yaml(tmp_path, "stage: sft\nlearning_rate: 1.0e-5\ndataset: d\nlearning_rate: 1.0e-3\n")
    with pytest.raises(RlhfkitError) as info:
        load_config(path)
    assert "key 'learning_rate' appears twice (lines 2 and 4)" in str(info.value) and "c.yaml" in str(info.value)


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = _yaml(tmp_path, _base_yaml(BASE) + "reward_models:\n  - &judge {path: a:f, type: function, weight: 1}\n"
                 "  - <<: *judge\n    weight: 2\nstage: ppo\n")
    assert [entry["weight"] for entry in load_config(path).ppo.reward_models] == [1, 2]


def _alias_bomb(levels: int = 9) -> str:
    """Each level lists the one before nine times: 9**levels values once expanded, a few hundred bytes written."""
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]" for previous, name in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, fragment", [
    (_alias_bomb() + "learning_rate: *l9\n", "once its aliases (*name) are expanded"),  # 387 million values
    ("learning_rate: &a [1, *a]\n", "an alias refers to the value that contains it"),
    ("lora_target: &s " + "x" * 400_000 + "\nadditional_target: [" + ", ".join(["*s"] * 50) + "]\n",
     "once its aliases (*name) are expanded"),  # 20 million characters from 400 KB
    ("learning_rate: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
])
def test_alias_bombs_and_deep_nesting_are_refused_before_any_value_is_formatted(tmp_path, text, fragment):
    with pytest.raises(RlhfkitError) as info:
        load_config(_yaml(tmp_path, text))
    assert fragment in str(info.value) and "c.yaml" in str(info.value) and len(str(info.value)) < 300


def test_an_override_alias_bomb_is_refused(tmp_path):
    bomb = "{" + ", ".join(_alias_bomb().splitlines()) + "}"  # the same mapping on one line
    with pytest.raises(RlhfkitError, match="once its aliases"):
        load_config(_yaml(tmp_path, _base_yaml(BASE)), [f"learning_rate={bomb}"])


def test_a_type_error_shows_only_the_start_of_a_large_value(tmp_path):
    path = _yaml(tmp_path, _base_yaml(BASE) + "learning_rate: [" + ", ".join(["123456789"] * 50_000) + "]\n")
    with pytest.raises(RlhfkitError) as info:
        load_config(path)
    assert "'learning_rate' must be a number, got [123456789, 123456789" in str(info.value)
    assert len(str(info.value)) < 200


def test_a_config_over_the_size_limit_is_refused_unread(tmp_path):
    path = _yaml(tmp_path, _base_yaml(BASE) + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(RlhfkitError, match=r"c.yaml is larger than 1048576 bytes"):
        load_config(path)


def test_invalid_utf8_names_the_file_and_byte(tmp_path):
    text = b"stage: sft\ndataset: caf\xe9\n"  # Latin-1's e-acute
    path = _yaml(tmp_path, text)
    with pytest.raises(RlhfkitError) as info:
        load_config(path)
    assert f"{path}: invalid UTF-8 at byte offset {text.index(0xE9)} " in str(info.value)
