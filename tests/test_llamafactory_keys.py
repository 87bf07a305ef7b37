"""LLaMA-Factory's training keys: optim, lr_scheduler_kwargs, report_to (trackers, wandb offline),
include_num_input_tokens_seen, gradient checkpointing by default, deepspeed, unsupported stages
and the keys accepted without effect."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import EPS64, cpu_config, float32_tolerance, read_events, requires, write_jsonl
from rlhfkit.config import build_config
from rlhfkit.config.arguments import DEFAULT_ONLY_KEYS, IGNORED_KEYS
from rlhfkit.errors import RlhfkitError
from rlhfkit.stages import run_stage
from rlhfkit.tracking import trackers as trackers_module
from rlhfkit.tracking.tensorboard import RUNS_DIR
from rlhfkit.tracking.trainer_log import read_trainer_log
from rlhfkit.training import deepspeed as deepspeed_module
from rlhfkit.training.optim import build_optimizer, build_scheduler, check_schedule, probe_bitsandbytes
from rlhfkit.training.runtime import build_accelerator

BASE = {"model_name_or_path": "m", "output_dir": "o", "dataset": "d"}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "llamafactory.md"


def _one_line_error(values: dict) -> str:
    with pytest.raises(RlhfkitError) as err:
        build_config({**BASE, **values})
    assert "\n" not in str(err.value)
    return str(err.value)


# ---------------------------------------------------------------------------------- optim


def _regression(seed: int = 0):
    """A linear layer with a 4096-element weight (bitsandbytes keeps smaller tensors' state in 32 bits),
    a bias, and a fixed least-squares problem."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(64, 64)
    x, y = torch.randn(32, 64, generator=generator), torch.randn(32, 64, generator=generator)
    return layer, lambda: ((layer(x) - y) ** 2).mean()


def _optimizer(layer: nn.Module, optim: str, learning_rate: float, weight_decay: float = 0.0):
    args = cpu_config({**BASE, "optim": optim, "learning_rate": learning_rate, "weight_decay": weight_decay}).training
    return build_optimizer(list(layer.named_parameters()), args)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused",
                                   *(pytest.param(name, marks=requires("bitsandbytes"))
                                     for name in ("adamw_8bit", "paged_adamw_8bit")), "adafactor", "sgd"])
def test_each_optimizer_reduces_the_loss(optim):
    layer, loss_fn = _regression()
    optimizer = _optimizer(layer, optim, learning_rate=0.5 if optim == "sgd" else 1e-2)
    losses = []
    for _ in range(20):
        loss = loss_fn()
        losses.append(float(loss))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses
    # weight decay on matrices only: the bias sits in the group without it
    assert [len(group["params"]) for group in optimizer.param_groups] == [1, 1]
    if optim.endswith("8bit"):
        assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8  # 8-bit state
    if optim == "adamw_torch_fused":
        assert optimizer.defaults["fused"] is True


def test_sgd_and_adamw_take_their_defining_first_step():
    """SGD: w - lr g. AdamW's first step (bias-corrected moments m = g, v = g^2): w - lr g / (|g| + eps)
    - lr wd w. Float32 updates of size lr: a rounding of each term."""
    for optim in ("sgd", "adamw_torch", "adamw_torch_fused"):
        layer, loss_fn = _regression(1)
        before = layer.weight.detach().clone()
        optimizer = _optimizer(layer, optim, learning_rate=0.1, weight_decay=0.5)
        loss_fn().backward()
        grad = layer.weight.grad.detach().clone()
        optimizer.step()
        if optim == "sgd":
            expected = before - 0.1 * grad - 0.1 * 0.5 * before  # SGD's decay adds wd w to the gradient
        else:
            expected = before * (1 - 0.1 * 0.5) - 0.1 * grad / (grad.abs() + 1e-8)
        atol = float32_tolerance(before.abs().max() + 0.1, terms=3)
        torch.testing.assert_close(layer.weight.detach(), expected, atol=atol, rtol=0, msg=optim)


def test_unknown_optimizer_lists_the_allowed():
    message = _one_line_error({"optim": "adamw_apex_fused"})
    assert "optim is 'adamw_apex_fused'; allowed: adamw_torch, adamw_torch_fused, adamw_8bit" in message
    assert "adafactor, sgd" in message


@requires("bitsandbytes")
def test_bitsandbytes_missing_or_without_kernels_fails_in_one_line(monkeypatch):
    import bitsandbytes

    class NoKernel(bitsandbytes.optim.AdamW8bit):
        def step(self, closure=None):
            raise NotImplementedError("no kernel for this device\nsecond line")

    monkeypatch.setattr(bitsandbytes.optim, "AdamW8bit", NoKernel)
    with pytest.raises(RlhfkitError, match=r"^optim adamw_8bit: bitsandbytes \S* cannot run its 8-bit optimizer on "
                                           r"cpu \(NotImplementedError: no kernel for this device\); choose"):
        probe_bitsandbytes("adamw_8bit", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(RlhfkitError, match="^optim paged_adamw_8bit needs bitsandbytes: pip install bitsandbytes"):
        probe_bitsandbytes("paged_adamw_8bit", torch.device("cpu"))


# ------------------------------------------------------------------------ LR schedules


def _lrs(values: dict, steps: int) -> list[float]:
    """The learning rate before each of `steps` optimizer steps and after the last (lr 1.0)."""
    args = cpu_config({**BASE, "learning_rate": 1.0, **values}).training
    check_schedule("<test>", args)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, args, steps)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize("kwargs", [{"min_lr_rate": 0.1}, '{"min_lr_rate": 0.1}'], ids=["mapping", "json-text"])
def test_cosine_with_min_lr_from_a_mapping_or_the_web_ui_json(kwargs):
    """Warm-up over 2 of 10 steps, then lr = 0.1 + 0.9 * (1 + cos(pi p)) / 2 with p the progress after it."""
    lrs = _lrs({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": kwargs, "warmup_steps": 2}, 10)
    expected = [0.0, 0.5, 1.0] + [0.1 + 0.9 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(1, 9)]
    assert lrs == pytest.approx(expected, rel=4 * EPS64, abs=4 * EPS64)
    assert lrs[6] == pytest.approx(0.55, abs=4 * EPS64) and lrs[10] == pytest.approx(0.1, abs=4 * EPS64)


def test_warmup_stable_decay_defaults_to_llamafactory_split():
    """No kwargs: of 9 steps after no warm-up, 3 stable at the peak, then 6 of half-cosine decay to 0."""
    with pytest.warns(UserWarning, match="num_stable_steps will be used"):  # transformers, as under LLaMA-Factory
        lrs = _lrs({"lr_scheduler_type": "warmup_stable_decay"}, 9)
    expected = [1.0, 1.0, 1.0] + [(1 + math.cos(math.pi * k / 6)) / 2 for k in range(0, 6)] + [0.0]
    assert lrs == pytest.approx(expected, abs=4 * EPS64)


@pytest.mark.parametrize("values, fragment", [
    ({"lr_scheduler_type": "cosine_with_min_lr"},
     "lr_scheduler_type cosine_with_min_lr needs exactly one of min_lr and min_lr_rate in lr_scheduler_kwargs"),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
     "lr_scheduler_kwargs min_lr_rate not known to lr_scheduler_type cosine; it takes num_cycles"),
    ({"lr_scheduler_type": "constant", "lr_scheduler_kwargs": {"num_cycles": 2}}, "it takes none"),
])
def test_schedule_arguments_checked_in_one_line(values, fragment):
    args = build_config({**BASE, **values}).training
    with pytest.raises(RlhfkitError) as err:
        check_schedule("cfg.yaml", args)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_schedule_kwargs_must_be_a_mapping():
    assert "lr_scheduler_kwargs is not valid JSON" in _one_line_error({"lr_scheduler_kwargs": "{min_lr_rate: 0.1"})
    assert "lr_scheduler_kwargs must be a mapping" in _one_line_error({"lr_scheduler_kwargs": [0.1]})


def test_cosine_with_min_lr_without_kwargs_stops_the_run_before_loading(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    config = cpu_config({"model_name_or_path": str(tiny_model_dir), "dataset": str(data),
                         "output_dir": str(tmp_path / "out"), "lr_scheduler_type": "cosine_with_min_lr"})
    with pytest.raises(RlhfkitError, match="needs exactly one of min_lr and min_lr_rate"):
        run_stage(config)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- trackers


def _sft_rows(words: str = "abcdef"):
    return [{"instruction": f"say {w}", "output": w * (2 + i % 3)} for i, w in enumerate(words)]


def _sft_keys(tiny_model_dir, tmp_path, **keys):
    data = write_jsonl(tmp_path / "sft.jsonl", _sft_rows())
    return {"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "output_dir": str(tmp_path / "out"),
            "stage": "sft", "finetuning_type": "lora", "per_device_train_batch_size": 2, "max_steps": 3,
            "logging_steps": 1, "save_steps": 0, "learning_rate": 1e-2, **keys}


@requires("wandb")
def test_wandb_offline_and_tensorboard_get_every_record(tiny_model_dir, tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing under the home folder
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    run_stage(cpu_config(_sft_keys(tiny_model_dir, tmp_path, report_to=["tensorboard", "wandb"],
                                   include_num_input_tokens_seen=True)))
    out = tmp_path / "out"
    records = read_trainer_log(out)
    # TensorBoard: where and as it was before trackers went through accelerate (float32: the counts,
    # integers below 2**24, are exact)
    events = read_events(out / RUNS_DIR)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("train/num_input_tokens_seen")] == \
        [r["num_input_tokens_seen"] for r in records]
    # wandb: one offline run in output_dir/wandb whose history holds the same names
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = runs[0].read_bytes()
    for key in ("train/loss", "train/num_input_tokens_seen", "train/lr", "learning_rate"):  # + the config
        assert key.encode() in history, key


def test_a_missing_tracker_package_fails_in_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers_module, "package_installed", lambda package: package in ("tensorboard", "wandb"))
    for values, package in (({"report_to": "mlflow"}, "mlflow"), ({"report_to": "tensorboard,swanlab"}, "swanlab"),
                            ({"use_swanlab": True}, "swanlab")):
        config = cpu_config({**BASE, "output_dir": str(tmp_path), **values})
        with pytest.raises(RlhfkitError, match=f"report_to {package} needs the {package} package: "
                                               f"pip install {package} \\(or remove {package} from report_to\\)$"):
            build_accelerator(config)
    names = trackers_module.tracker_names(cpu_config({**BASE, "report_to": "all"}))
    assert names == ["tensorboard", "wandb"]  # all: the installed ones
    for nothing in (["none"], None, "none"):
        assert trackers_module.tracker_names(cpu_config({**BASE, "report_to": nothing})) == []
    assert "report_to is 'neptune'; allowed: none, all, tensorboard, wandb, mlflow, swanlab" in \
        _one_line_error({"report_to": "neptune"})


@requires("wandb")
def test_a_tracker_that_cannot_start_fails_in_one_line(tmp_path, monkeypatch):
    """wandb without a login (here: its start raising wandb's own error) stops the run naming it and
    what to do; the trackers started before it are finished."""
    import accelerate.tracking
    import wandb.errors

    def no_login(self):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(accelerate.tracking.WandBTracker, "start", no_login)
    config = cpu_config({**BASE, "output_dir": str(tmp_path / "o"), "report_to": "tensorboard,wandb"})
    accelerator = build_accelerator(config)
    with pytest.raises(RlhfkitError, match=r"^<config>: report_to: wandb could not start \(UsageError: No API key "
                                           r"configured\. Use `wandb login` to log in\.\); run `wandb login`, set "
                                           r"WANDB_MODE=offline, or remove wandb from report_to$"):
        trackers_module.start_trackers(accelerator, config, tmp_path / "o")
    assert accelerator.trackers == []


# ------------------------------------------------------------------- input tokens seen


def _items(config):
    """The tokenized training items of `config`'s stage (what the counts count)."""
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.stages.common import load_stage_data

    return load_stage_data(config, load_tokenizer(config.model)).train


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_num_input_tokens_seen_counts_every_sample_once_per_epoch(tiny_model_dir, tmp_path, stage):
    """An epoch of 6 samples in 3 steps: the count ends at their tokens (rm: chosen and rejected);
    counting padding (all) adds each micro-batch's pad positions; with one sample per pass, none
    (rm: a pair's shorter sequence is padded to the longer)."""
    keys = _sft_keys(tiny_model_dir, tmp_path, include_num_input_tokens_seen=True, stage=stage)
    if stage == "rm":
        keys["dataset"] = str(write_jsonl(tmp_path / "rm.jsonl", [
            {"instruction": f"say {w}", "chosen": w * (1 + i), "rejected": "z" * (4 - i % 3)}
            for i, w in enumerate("abcdef")]))
    config = cpu_config(keys)
    items = _items(config)
    lengths = [sum(len(item[k]) for k in item if k.endswith("input_ids")) for item in items]
    one_per_pass = lengths if stage == "sft" else [
        2 * max(len(item["chosen_input_ids"]), len(item["rejected_input_ids"])) for item in items]
    run_stage(config)
    seen = [r["num_input_tokens_seen"] for r in read_trainer_log(tmp_path / "out")]
    assert len(seen) == 3 and seen[0] < seen[1] < seen[2] == sum(lengths)
    padded = dict(keys, output_dir=str(tmp_path / "all"), include_num_input_tokens_seen="all")
    run_stage(cpu_config(padded))
    assert read_trainer_log(tmp_path / "all")[-1]["num_input_tokens_seen"] > sum(lengths)
    single = dict(keys, output_dir=str(tmp_path / "one"), include_num_input_tokens_seen="all",
                  per_device_train_batch_size=1, gradient_accumulation_steps=2)
    run_stage(cpu_config(single))
    assert read_trainer_log(tmp_path / "one")[-1]["num_input_tokens_seen"] == sum(one_per_pass)


def test_num_input_tokens_seen_continues_after_resuming(tiny_model_dir, tmp_path):
    keys = _sft_keys(tiny_model_dir, tmp_path, include_num_input_tokens_seen=True, save_steps=1)
    run_stage(cpu_config(keys))
    whole = [r["num_input_tokens_seen"] for r in read_trainer_log(tmp_path / "out")]
    run_stage(cpu_config(dict(keys, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"),
                              overwrite_output_dir=True)))
    assert [r["num_input_tokens_seen"] for r in read_trainer_log(tmp_path / "out")] == whole


def test_num_input_tokens_seen_in_ppo_counts_prompts_and_responses(tiny_model_dir, tmp_path, reward_functions):
    """One PPO step of 4 prompts with responses of exactly 5 tokens: their prompt tokens + 4 x 5."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "w" * (i + 1)} for i in range(4)])
    config = cpu_config({"stage": "ppo", "model_name_or_path": str(tiny_model_dir), "dataset": str(prompts),
                         "output_dir": str(tmp_path / "out"), "reward_model": f"{reward_functions}:length",
                         "reward_model_type": "function", "per_device_train_batch_size": 4, "ppo_epochs": 2,
                         "max_new_tokens": 5, "min_new_tokens": 5, "max_steps": 1, "save_steps": 0,
                         "include_num_input_tokens_seen": "non_padding"})
    prompt_tokens = sum(len(item["input_ids"]) for item in _items(config))
    run_stage(config)
    assert read_trainer_log(tmp_path / "out")[-1]["num_input_tokens_seen"] == prompt_tokens + 4 * 5


def test_include_num_input_tokens_seen_values():
    assert "allowed: true, false, non_padding, all, no" in _one_line_error({"include_num_input_tokens_seen": "some"})
    assert "allowed: true" in _one_line_error({"include_num_input_tokens_seen": [1]})


# ------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_defaults_on_unless_disabled():
    def resolved(**keys):
        return build_config({**BASE, **keys}).training.gradient_checkpointing

    assert resolved() is True
    assert resolved(disable_gradient_checkpointing=True) is False
    assert resolved(gradient_checkpointing=False) is False
    assert resolved(gradient_checkpointing=False, disable_gradient_checkpointing=False) is False
    assert resolved(gradient_checkpointing=True) is True
    assert "contradict" in _one_line_error({"gradient_checkpointing": True, "disable_gradient_checkpointing": True})


def _checkpointed_calls(stage: str, config, monkeypatch) -> int:
    """Calls of transformers' checkpoint function by the decoder layers in `config`'s training passes (with
    gradients: transformers before 5.24 also routes no-grad passes of a model in training mode, such as the
    finite-outputs probe before a save, through it, where it only runs the layer)."""
    import importlib

    module = importlib.import_module(f"rlhfkit.stages.{stage}")
    load = module.load_trainable_model
    calls = [0]

    def counted_load(*args, **kwargs):
        model = load(*args, **kwargs)
        for layer in (m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"):
            checkpoint = layer._gradient_checkpointing_func if layer.gradient_checkpointing else None
            if checkpoint is not None:
                def counted(*a, _checkpoint=checkpoint, **k):
                    calls[0] += torch.is_grad_enabled()
                    return _checkpoint(*a, **k)

                layer._gradient_checkpointing_func = counted
        return model

    monkeypatch.setattr(module, "load_trainable_model", counted_load)
    run_stage(config)
    monkeypatch.undo()
    return calls[0]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_gradient_checkpointing_engages_by_default(tiny_model_dir, tmp_path, monkeypatch, stage):
    """Without the key, every decoder layer of the trained model runs checkpointed in each training pass
    (2 layers x 2 steps, one pass each); disable_gradient_checkpointing: true runs none."""
    rows = ([{"instruction": f"say {w}", "output": w * 3} for w in "abcd"] if stage == "sft" else
            [{"instruction": f"say {w}", "chosen": w * 3, "rejected": "zz"} for w in "abcd"])
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    keys = {"stage": stage, "model_name_or_path": str(tiny_model_dir), "dataset": str(data), "device": "cpu",
            "finetuning_type": "lora", "per_device_train_batch_size": 2, "max_steps": 2, "save_steps": 0}
    on = _checkpointed_calls(stage, build_config({**keys, "output_dir": str(tmp_path / "on")}), monkeypatch)
    off = _checkpointed_calls(stage, build_config({**keys, "output_dir": str(tmp_path / "off"),
                                                   "disable_gradient_checkpointing": True}), monkeypatch)
    assert (on, off) == (2 * 2, 0)


# ----------------------------------------------------------------------------- deepspeed

ZERO3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
         "zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_gather_16bit_weights_on_model_save": True}}


def test_the_deepspeed_plugin_gets_the_json_file_or_mapping(tmp_path):
    path = tmp_path / "ds_z3.json"
    path.write_text(json.dumps(ZERO3))
    for value in (str(path), ZERO3):
        plugin = deepspeed_module.deepspeed_plugin(cpu_config({**BASE, "deepspeed": value}))
        assert plugin.zero_stage == 3
        assert plugin.deepspeed_config["zero_optimization"] == ZERO3["zero_optimization"]
        assert plugin.deepspeed_config["bf16"] == {"enabled": "auto"}
    assert ZERO3["zero_optimization"]["stage"] == 3 and "steps_per_print" not in ZERO3  # the mapping is not changed


def test_deepspeed_errors_are_one_line(tmp_path, monkeypatch):
    import accelerate.utils

    def failure(values, environment=None) -> str:
        config = cpu_config({**BASE, "output_dir": str(tmp_path / "o"), **values})
        with pytest.raises(RlhfkitError) as err:
            build_accelerator(config)
        assert "\n" not in str(err.value)
        return str(err.value)

    missing = failure({"deepspeed": "examples/deepspeed/ds_z3_config.json"})
    assert "deepspeed config examples/deepspeed/ds_z3_config.json does not exist" in missing
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3},}')
    assert re.search(r"bad.json line 1: .*; fix the DeepSpeed JSON", failure({"deepspeed": str(tmp_path / "bad.json")}))
    assert "Please specify the ZeRO optimization config" in failure({"deepspeed": {"train_batch_size": 8}})
    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: False)
    assert "deepspeed needs the deepspeed package: pip install deepspeed, then launch it with `accelerate launch" \
        in failure({"deepspeed": ZERO3})
    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: True)
    assert "DeepSpeed trains on accelerators and device: cpu is set" in failure({"deepspeed": ZERO3})
    config = build_config({**BASE, "deepspeed": ZERO3})
    with pytest.raises(RlhfkitError, match="and no accelerator \\(GPU\\) was found; remove deepspeed"):
        deepspeed_module.check_deepspeed_runnable(config, accelerator_available=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RlhfkitError, match="DeepSpeed joins a launched process group; launch it with"):
        deepspeed_module.check_deepspeed_runnable(config, accelerator_available=True)


# ------------------------------------------------------------ stages and keys without effect


def test_an_unsupported_stage_is_named_before_its_keys():
    message = _one_line_error({"stage": "dpo", "pref_beta": 0.1, "pref_loss": "sigmoid", "kto_chosen_weight": 1.0,
                               "simpo_gamma": 0.5, "not_a_key_anywhere": 1})
    assert message.startswith("<config>: stage 'dpo' is not supported (we have sft, rm, ppo; ")
    assert "stage 'kto' is not supported" in _one_line_error({"stage": "kto", "kto_rejected_weight": 1.0})
    assert "pre-training on raw text" in _one_line_error({"stage": "pt"})


def test_other_stages_settings_and_harmless_keys_are_accepted_in_ours():
    config = build_config({**BASE, "stage": "sft", "pref_beta": 0.1, "pref_loss": "sigmoid", "packing": False,
                           "use_galore": False, "neftune_noise_alpha": None, "use_unsloth": False,
                           "use_reentrant_gc": True, "enable_liger_kernel": False})
    assert config.ignored_keys == ["pref_beta", "pref_loss", "packing", "use_galore", "neftune_noise_alpha",
                                   "use_unsloth", "use_reentrant_gc", "enable_liger_kernel"]


@pytest.mark.parametrize("key, value, fragment", [
    ("packing", True, "packing: True is not supported (sequences are padded per micro-batch, never packed); "
                      "remove the key or set it to false"),
    ("neftune_noise_alpha", 5, "NEFTune embedding noise is not implemented"),
    ("use_badam", True, "BAdam"),
    ("mixture_of_depths", "convert", "mixture_of_depths: 'convert' is not supported (mixture-of-depths conversion is "
                                     "not implemented); remove the key"),
])
def test_default_only_keys_refuse_other_values_with_the_reason(key, value, fragment):
    assert fragment in _one_line_error({key: value})


def test_llamafactory_doc_covers_the_keys():
    """docs/llamafactory.md has a row for each key accepted without effect and each training key of the issue."""
    rows = {key for line in DOCS.read_text().splitlines() if line.startswith("| `")
            for key in re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])}
    ours = {"optim", "lr_scheduler_type", "lr_scheduler_kwargs", "report_to", "include_num_input_tokens_seen",
            "gradient_checkpointing", "disable_gradient_checkpointing", "deepspeed", "run_name", "use_swanlab",
            "stage"}
    missing = (set(IGNORED_KEYS) | set(DEFAULT_ONLY_KEYS) | ours) - rows
    assert not missing, sorted(missing)

