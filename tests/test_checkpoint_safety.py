"""Checkpoints that cannot run code, resume that is exact or refuses, damaged checkpoints that fall
back, one run per output_dir, and a full disk while a checkpoint is written.

Most cases copy one finished SFT run (6 steps, checkpoints at steps 2 and 4) and resume it; runs are
pinned to the CPU (``device: cpu``) so that a resumed run can be compared with the uninterrupted
one to the bit (see tests/test_resume.py).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hold_output_lock, one_error_line, read_events, write_cpu_config, write_jsonl
from safetensors.torch import load_file

from rlhfkit.cli import main

STEPS = 6
LEARNING_RATE = 0.01


def _sft_values(folder: Path, model_dir: Path) -> dict:
    rows = [{"instruction": f"say {w} " * 4, "output": w * 12} for w in "abcdefgh"]
    return dict(stage="sft", model_name_or_path=str(model_dir), finetuning_type="lora", lora_rank=4,
                dataset=str(write_jsonl(folder / "sft.jsonl", rows)), per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_steps=STEPS, save_steps=2, logging_steps=1,
                learning_rate=LEARNING_RATE, lora_dropout=0.1, seed=5)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> tuple[dict, Path]:
    """The config values and output folder of an uninterrupted SFT run (read only: tests copy it)."""
    folder = tmp_path_factory.mktemp("finished")
    values = _sft_values(folder, tiny_model_dir)
    out = folder / "out"
    assert main(["train", str(write_cpu_config(folder / "run.yaml", dict(values, output_dir=str(out))))]) == 0
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    return values, out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple[dict, Path]:
    """A copy of the finished run to resume and damage."""
    values, out = finished_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return dict(values, output_dir=str(copy)), copy


def _train(capsys, tmp_path: Path, values: dict, **changes) -> tuple[int, str]:
    """`rlhfkit train` in this process; (exit status, stderr)."""
    config = write_cpu_config(tmp_path / "resume.yaml", {**values, **changes})
    code = main(["train", str(config)])
    return code, capsys.readouterr().err


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------- tensors and plain data only


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    from rlhfkit.checkpoint import rng_state, set_rng_state
    from rlhfkit.checkpoint_files import load_plain, save_plain

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # both keep a cached Gaussian in their state
    save_plain(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) \
        == expected
    # An older checkpoint's state (Python tuples, a NumPy array) still loads, with nothing but arrays allowed.
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(load_plain(tmp_path / "old.pt", numpy_arrays=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_checkpoint_states_load_with_weights_only(finished_run):
    _, out = finished_run
    files = sorted((out / "checkpoint-4").glob("*.pt"))
    assert [f.name for f in files] == ["optimizer.pt", "rng_state_0.pt", "scheduler.pt"]
    for path in files:
        torch.load(path, weights_only=True)
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["config"]["learning_rate"] == \
        LEARNING_RATE


class Payload:
    """Unpickling this creates the marker file: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name, pickled", [("optimizer.pt", "torch"), ("optimizer.pt", "raw"),
                                           ("scheduler.pt", "torch"), ("rng_state_0.pt", "torch")])
def test_a_planted_pickle_is_refused_and_never_runs(run_copy, tmp_path, capsys, name, pickled):
    values, out = run_copy
    marker = tmp_path / "code-ran"
    target = out / "checkpoint-4" / name
    if pickled == "torch":
        torch.save({"state": Payload(marker)}, target)
    else:
        target.write_bytes(pickle.dumps({"state": Payload(marker)}))
    code, err = _train(capsys, tmp_path, values, resume_from_checkpoint=True)
    assert code == 2
    line = one_error_line(err)
    assert str(target) in line and "refusing" in line
    assert not marker.exists()


def test_distributed_checkpoint_metadata_admits_only_its_own_classes(tmp_path):
    """FSDP checkpoints hold PyTorch distributed-checkpoint folders, whose `.metadata` DCP reads with
    plain `pickle.load`: it is checked first."""
    import torch.distributed.checkpoint as dcp

    from rlhfkit.checkpoint_files import DamagedFile, check_sharded_state
    from rlhfkit.errors import RlhfkitError

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    folder = tmp_path / "sharded_state"
    with pytest.warns(UserWarning):  # one process without a process group: DCP says so
        dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                 checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
    check_sharded_state(folder)
    metadata = folder / "pytorch_model_fsdp_0" / ".metadata"
    _truncate(metadata)
    with pytest.raises(DamagedFile):
        check_sharded_state(folder)
    marker = tmp_path / "code-ran"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(RlhfkitError, match="refusing"):
        check_sharded_state(folder)
    assert not marker.exists()


# ------------------------------------------------------------------------ damaged checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated-trainable-state": ("trainable_state.safetensors", _truncate),
    "truncated-optimizer": ("optimizer.pt", _truncate),
    "missing-scheduler": ("scheduler.pt", Path.unlink),
    "torn-trainer-state": ("trainer_state.json", _truncate),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(finished_run, tmp_path, case):
    from rlhfkit.checkpoint_files import choose_checkpoint

    _, out = finished_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    name, damage = DAMAGE[case]
    damage(copy / "checkpoint-4" / name)
    assert choose_checkpoint(True, copy, full_model=False) == copy / "checkpoint-2"
    damage(copy / "checkpoint-2" / name)
    with pytest.raises(Exception, match=f"no usable checkpoint in {copy}.*checkpoint-4: {name}.*checkpoint-2: {name}"):
        choose_checkpoint(True, copy, full_model=False)


def test_resume_falls_back_past_a_truncated_optimizer_and_ends_as_the_uninterrupted_run(finished_run, run_copy,
                                                                                      tmp_path, capsys):
    _, straight = finished_run
    values, out = run_copy
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    (out / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _log(straight)[:5]) + '{"current_st')
    code, err = _train(capsys, tmp_path, values, resume_from_checkpoint=True)
    assert code == 0, err
    assert "skipping damaged checkpoint" in err and "optimizer.pt" in err
    assert f"resumed from {out / 'checkpoint-2'}" in err
    assert [r["current_steps"] for r in _log(out)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(straight)]
    expected, actual = load_file(str(straight / "adapter_model.safetensors")), \
        load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_no_usable_checkpoint_stops_with_one_line(run_copy, tmp_path, capsys):
    values, out = run_copy
    for step in (2, 4):
        _truncate(out / f"checkpoint-{step}" / "trainable_state.safetensors")
    code, err = _train(capsys, tmp_path, values, resume_from_checkpoint=True)
    assert code == 2
    assert "no usable checkpoint" in one_error_line(err)


# --------------------------------------------------------------------------- config on resume


def test_a_changed_config_is_refused_with_the_keys_listed(run_copy, tmp_path, capsys):
    values, out = run_copy
    code, err = _train(capsys, tmp_path, values, resume_from_checkpoint=True, learning_rate=0.02,
                       per_device_train_batch_size=4, gradient_accumulation_steps=1)
    assert code == 2
    line = one_error_line(err)
    assert "learning_rate 0.01 → 0.02" in line and "per_device_train_batch_size 2 → 4" in line
    assert "gradient_accumulation_steps 2 → 1" in line and "resume_ignore_config_changes" in line


def test_ignoring_config_changes_applies_a_new_learning_rate(finished_run, run_copy, tmp_path, capsys):
    _, straight = finished_run
    values, out = run_copy
    code, err = _train(capsys, tmp_path, values, resume_from_checkpoint=True, learning_rate=2 * LEARNING_RATE,
                       resume_ignore_config_changes=True)
    assert code == 0, err
    assert "learning_rate 0.01 → 0.02" in err
    before, after = _log(straight), _log(out)
    assert after[:4] == before[:4]
    # The linear schedule at steps 5 and 6 with the doubled peak: exactly twice the old rates (a power of 2).
    assert [r["lr"] for r in after[4:]] == [2 * r["lr"] for r in before[4:]]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["config"]["learning_rate"] == \
        LEARNING_RATE


def test_a_changed_lora_shape_is_refused_even_when_ignoring_changes(run_copy, tmp_path, capsys):
    values, out = run_copy
    code, err = _train(capsys, tmp_path, values, resume_from_checkpoint=True, lora_rank=8,
                       resume_ignore_config_changes=True)
    assert code == 2
    assert "lora_rank 4 → 8" in one_error_line(err)


def test_a_checkpoint_without_a_recorded_config_resumes_with_a_note(run_copy, tmp_path, capsys):
    values, out = run_copy
    state_file = out / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]
    state_file.write_text(json.dumps(state))
    code, err = _train(capsys, tmp_path, values, resume_from_checkpoint=True, learning_rate=0.02)
    assert code == 0, err
    assert "records no config" in err


# ---------------------------------------------------------------------------- logs on resume


def test_resume_cuts_logs_and_samples_back_to_the_checkpoint(tmp_path, tiny_model_dir, reward_functions, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {i}"} for i in range(8)])
    out = tmp_path / "ppo"
    values = dict(stage="ppo", model_name_or_path=str(tiny_model_dir), finetuning_type="lora", lora_rank=4,
                  dataset=str(prompts), reward_model=f"{reward_functions}:letters", reward_model_type="function",
                  per_device_train_batch_size=2, max_new_tokens=4, ppo_epochs=1, max_steps=4, save_steps=2,
                  logging_steps=1, output_dir=str(out), report_to="tensorboard")
    code, err = _train(capsys, tmp_path, values)
    assert code == 0, err
    # As if killed while writing a line after step 4, with checkpoint-2 the latest checkpoint.
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    samples_per_step = len([r for r in _samples(out) if r["step"] == 1])
    for name in ("trainer_log.jsonl", "samples.jsonl"):
        with (out / name).open("a") as handle:
            handle.write('{"step": 5, "current_st')
    code, err = _train(capsys, tmp_path, values, resume_from_checkpoint=True)
    assert code == 0, err
    assert [r["current_steps"] for r in _log(out)] == [1, 2, 3, 4]
    steps = [r["step"] for r in _samples(out)]
    assert steps == sorted(steps) and all(steps.count(s) == samples_per_step for s in (1, 2, 3, 4))
    events = read_events(out / "runs")
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- one run per folder


def test_a_second_run_into_a_locked_output_dir_is_refused(finished_run, tmp_path, capsys):
    values, _ = finished_run
    out = tmp_path / "out"
    holder = hold_output_lock(out)
    try:
        code, err = _train(capsys, tmp_path, dict(values, output_dir=str(out), max_steps=1))
        assert code == 2
        line = one_error_line(err)
        assert f"output_dir {out} is in use by another run" in line and f"process {holder.pid}" in line
        assert [p.name for p in out.iterdir()] == [".rlhfkit.lock"]
    finally:
        holder.communicate("", timeout=30)
    assert not out.exists()  # released: its holder created the folder and removed it with the lock
    code, err = _train(capsys, tmp_path, dict(values, output_dir=str(out), max_steps=1))
    assert code == 0, err
    assert not (out / ".rlhfkit.lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(finished_run, tmp_path, capsys):
    values, _ = finished_run
    out = tmp_path / "out"
    holder = hold_output_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / ".rlhfkit.lock").is_file()
    code, err = _train(capsys, tmp_path, dict(values, output_dir=str(out), max_steps=1))
    assert code == 0, err
    assert f"left by process {holder.pid}" in err and "taking it over" in err
    assert not (out / ".rlhfkit.lock").exists()


# --------------------------------------------------------------------------------- full disk


def _full_disk_torch_save(obj, handle) -> None:
    handle.write(b"PK\x03\x04" + bytes(64))  # part of the file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk_safetensors(tensors, filename, metadata=None) -> None:
    Path(filename).write_bytes(bytes(64))
    raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("target, fake, written", [("torch.save", _full_disk_torch_save, "optimizer.pt"),
                                                   ("rlhfkit.checkpoint.save_file", _full_disk_safetensors,
                                                    "trainable_state.safetensors")])
def test_a_full_disk_while_checkpointing_leaves_no_partial_folder(finished_run, tmp_path, capsys, monkeypatch,
                                                                  target, fake, written):
    values, _ = finished_run
    out = tmp_path / "out"
    monkeypatch.setattr(target, fake)
    code, err = _train(capsys, tmp_path, dict(values, output_dir=str(out)))
    assert code == 2
    line = one_error_line(err)
    assert "No space left on device" in line and str(out / ".tmp-checkpoint-2" / written) in line
    assert not list(out.glob(".tmp-checkpoint-*")) and not list(out.glob("checkpoint-*"))
    assert not (out / ".rlhfkit.lock").exists()



def test_a_full_disk_at_the_final_save_is_one_line(finished_run, tmp_path, capsys, monkeypatch):
    values, _ = finished_run
    out = tmp_path / "out"

    def full_disk(model, tokenizer, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr("rlhfkit.stages.common.save_pretrained_model", full_disk)
    code, err = _train(capsys, tmp_path, dict(values, output_dir=str(out), save_steps=1000))
    assert code == 2
    line = one_error_line(err)
    assert "could not write the trained model" in line and "No space left on device" in line
    assert str(out / "model.safetensors") in line
    assert not (out / ".rlhfkit.lock").exists()

def test_a_hub_token_is_never_recorded_nor_sent_to_trackers():
    from rlhfkit.config import build_config
    from rlhfkit.resume_config import config_record
    from rlhfkit.tracking.trackers import hyperparameters

    config = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "hf_hub_token": "hf_secret"},
                          check=False)
    assert "hf_secret" not in json.dumps(config_record(config))
    assert hyperparameters(config)["hf_hub_token"] == "***"
