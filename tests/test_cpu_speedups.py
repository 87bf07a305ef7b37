"""`cpu_speedups`: CPU tuning only on one CPU process, off with one key, nothing process-wide on import,
kept buffers released when a stage ends or fails."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from conftest import cpu_config
from rlhfkit.config import build_config, load_config
from rlhfkit.cpu.head import LOGITS_BUFFER
from rlhfkit.cpu.logprobs import LOG_SOFTMAX_BUFFER, buffered_logprobs_from_logits
from rlhfkit.cpu.sampling import sample_from_probs
from rlhfkit.cpu.speedups import PLAIN, CpuSpeedups, speedups_apply
from rlhfkit.errors import RlhfkitError
from rlhfkit.rl import logprobs_from_logits
from rlhfkit.rollout.sampler import multinomial_draw
from rlhfkit.stages import run_stage

IMPORT_PROBE = """
import json, os, sys
before = dict(os.environ)
import rlhfkit, rlhfkit.cli, rlhfkit.cpu.speedups, rlhfkit.stages.ppo
from rlhfkit.cpu import allocator
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"changed": changed, "malloc_set": allocator._applied}))
"""


def test_importing_rlhfkit_changes_nothing_process_wide():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {"changed": [], "malloc_set": False}


CLI_PROBE = """
import json, os, sys
import rlhfkit.stages
from rlhfkit.cli import main
rlhfkit.stages.run_stage = lambda config: print(json.dumps(
    {"thp": os.environ.get("THP_MEM_ALLOC_ENABLE"), "torch_imported": "torch" in sys.modules}))
main(["train", sys.argv[1]])
"""


@pytest.mark.parametrize("setting, thp", [("auto", "1"), ("off", None)])
def test_the_command_line_asks_for_huge_pages_before_torch_is_imported(tmp_path, setting, thp):
    config = tmp_path / "config.yaml"
    config.write_text(f"stage: sft\nmodel_name_or_path: m\ndataset: d.jsonl\noutput_dir: out\ncpu_speedups: {setting}\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", CLI_PROBE, str(config)], capture_output=True, text=True, env=env,
                         check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {"thp": thp, "torch_imported": False}


def _accelerator(device: str = "cpu", processes: int = 1, kind=DistributedType.NO):
    return SimpleNamespace(device=torch.device(device), num_processes=processes, distributed_type=kind)


@pytest.mark.parametrize("setting, accelerator, on", [
    pytest.param("auto", _accelerator(), True, id="one-cpu-process"),
    pytest.param("off", _accelerator(), False, id="off"),
    pytest.param("auto", _accelerator("cuda"), False, id="gpu"),
    pytest.param("auto", _accelerator(processes=2, kind=DistributedType.MULTI_CPU), False, id="two-processes"),
    pytest.param("auto", _accelerator(kind=DistributedType.FSDP), False, id="fsdp"),
    pytest.param("auto", _accelerator(kind=DistributedType.DEEPSPEED), False, id="deepspeed"),
])
def test_speedups_apply_only_on_one_unsharded_cpu_process(setting, accelerator, on):
    assert speedups_apply(setting, accelerator) is on


def test_disabled_speedups_are_the_plain_path():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    params = list(net.parameters())
    assert not PLAIN.gradient_block(net, params)
    assert all(p.grad is None for p in params) and not net[0].sparse
    PLAIN.head_buffers(net)
    assert "forward" not in vars(net[1])
    assert PLAIN.logprobs is logprobs_from_logits
    assert PLAIN.draw is multinomial_draw
    assert isinstance(PLAIN.decoding(net), contextlib.nullcontext)
    enabled = CpuSpeedups(enabled=True)
    assert enabled.draw is sample_from_probs
    enabled.head_buffers(net)  # installs the kept buffers; the update then writes its log-softmax there
    assert enabled.logprobs is buffered_logprobs_from_logits
    enabled.release()
    assert enabled.logprobs is logprobs_from_logits


def test_cpu_speedups_off_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("stage: sft\nmodel_name_or_path: m\ndataset: d.jsonl\noutput_dir: out\ncpu_speedups: off\n")
    assert load_config(str(path)).training.cpu_speedups == "off"
    with pytest.raises(RlhfkitError, match="cpu_speedups is 'fast'; allowed: auto, off"):
        build_config({"stage": "sft", "model_name_or_path": "m", "dataset": "d", "output_dir": "o",
                      "cpu_speedups": "fast"})


REWARDS = """
def letters(prompts, responses):
    return [sum(c in 'abcdefghijklm' for c in r) / max(len(r), 1) for r in responses]

calls = []

def fails_second_step(prompts, responses):
    calls.append(1)
    if len(calls) > 1:
        raise ValueError("reward service down")
    return [0.0] * len(responses)
"""


@pytest.fixture
def ppo_keys(tmp_path, tiny_model_dir, jsonl):
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {w}"} for w in "abcdefgh"])
    (tmp_path / "rewards.py").write_text(REWARDS)
    return {"stage": "ppo", "model_name_or_path": str(tiny_model_dir), "dataset": str(prompts),
            "finetuning_type": "lora", "reward_model_type": "function", "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1, "ppo_epochs": 1, "max_new_tokens": 4, "max_steps": 2,
            "logging_steps": 1, "save_steps": 0, "reward_model": f"{tmp_path / 'rewards.py'}:letters"}


@pytest.fixture
def spied(monkeypatch):
    """Every CpuSpeedups a stage makes, and the kept buffers holding a tensor before the run."""
    made = []
    real = CpuSpeedups.for_run.__func__

    def for_run(cls, setting, accelerator):
        made.append(real(cls, setting, accelerator))
        return made[-1]

    monkeypatch.setattr(CpuSpeedups, "for_run", classmethod(for_run))
    LOGITS_BUFFER.buffer, LOG_SOFTMAX_BUFFER.buffer = torch.empty(8), torch.empty(8)
    yield made
    LOGITS_BUFFER.release()
    LOG_SOFTMAX_BUFFER.release()


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_ppo_runs_with_and_without_speedups_and_releases_the_buffers(ppo_keys, tmp_path, spied, setting):
    run_stage(cpu_config({**ppo_keys, "cpu_speedups": setting, "output_dir": str(tmp_path / "out")}))
    assert [s.enabled for s in spied] == [setting == "auto"]
    assert spied[0].keep_gradients is (setting == "auto")
    if setting == "auto":  # released at the end of the stage
        assert LOGITS_BUFFER.buffer is None and LOG_SOFTMAX_BUFFER.buffer is None
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_buffers_are_released_when_the_stage_fails(ppo_keys, tmp_path, spied):
    keys = {**ppo_keys, "reward_model": f"{tmp_path / 'rewards.py'}:fails_second_step",
            "output_dir": str(tmp_path / "out")}
    with pytest.raises(RlhfkitError, match="reward service down"):
        run_stage(cpu_config(keys))
    assert spied[0].enabled
    assert LOGITS_BUFFER.buffer is None and LOG_SOFTMAX_BUFFER.buffer is None
