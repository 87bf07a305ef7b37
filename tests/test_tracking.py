"""Tracking without a model: trainer_log.jsonl, console lines, progress bar, TensorBoard, samples, plots."""

from __future__ import annotations

import io
import json
import logging
import math

import pytest
import torch
from conftest import PNG_MAGIC, cpu_config, read_events
from rlhfkit.tracking.plots import curve, plot_file_name, smooth, smoothing_weight
from rlhfkit.tracking.progress import console_line, format_stats
from rlhfkit.tracking.samples import read_samples, sample_rows
from rlhfkit.tracking.tensorboard import RUNS_DIR, samples_table, scalar_tag
from rlhfkit.tracking.trackers import start_trackers
from rlhfkit.tracking.trainer_log import TrainerLog, read_trainer_log
from rlhfkit.training.runtime import build_accelerator

def _config(tmp_path, **keys):
    values = dict(stage="ppo", model_name_or_path="m", dataset="d", output_dir=str(tmp_path), reward_model="x:y",
                  reward_model_type="function")
    return cpu_config({**values, **keys})


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def started_trackers(config):
    """The trackers of `config.report_to`, started as `prepare_training` starts them."""
    return start_trackers(build_accelerator(config), config, config.output.output_dir)


# ------------------------------------------------------------------------------ pure helpers


def test_smooth_is_a_debiased_ema():
    # w = 0.5: s = 0.5, 1.25, 2.125; debiased by 1 - 0.5^(t+1) = 0.5, 0.75, 0.875
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    assert smooth([4.0, -1.0], 0.0) == [4.0, -1.0]
    assert smooth([2.0] * 50, 0.9) == pytest.approx([2.0] * 50)  # a constant stays constant
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


def test_smoothing_weight_grows_with_length():
    assert smoothing_weight(5) == 0.0 and smoothing_weight(10) == 0.0
    assert smoothing_weight(100) == pytest.approx(0.9)
    assert smoothing_weight(10_000) == 0.95


def test_curve_skips_missing_and_non_finite():
    records = [{"current_steps": 1, "loss": 1.0}, {"current_steps": 2}, {"current_steps": 3, "loss": None},
               {"current_steps": 4, "loss": math.inf}, {"current_steps": 5, "loss": 0.5}]
    assert curve(records, "loss") == ([1, 5], [1.0, 0.5])
    assert plot_file_name("score/rm") == "training_score_rm.png"


def test_console_line_and_tags():
    record = {"loss": 0.123456, "reward": 2, "note": "x", "flag": True, "seconds_per_step": 9.0}
    shown = format_stats(record, ("reward", "loss", "kl", "note", "flag", "seconds_per_step"))
    assert shown == "reward=2 loss=0.1235"
    assert console_line(3, 10, shown, 1.5, 65, 3700) == \
        "[3/10] reward=2 loss=0.1235 | 1.50 s/step, 0:01:05 elapsed, 1:01:40 left"
    assert scalar_tag("loss") == "train/loss" and scalar_tag("score/rm") == "train/score/rm"
    assert scalar_tag("eval_accuracy") == "eval/accuracy"


def test_sample_rows_and_table():
    rows = sample_rows(4, ["p1", "p|2"], ["r1", "line\nbreak"], {"rm": torch.tensor([0.5, -1.0]), "gold": [1.0, 0.0]},
                       torch.tensor([0.25, math.nan]), torch.tensor([0.0, 0.125]))
    assert rows[1] == {"step": 4, "prompt": "p|2", "response": "line\nbreak", "scores": {"rm": -1.0, "gold": 0.0},
                       "reward": None, "kl": 0.125}
    table = samples_table(rows).splitlines()
    assert table[0] == "| prompt | response | score/rm | score/gold | reward | kl |"
    assert table[3] == "| p\\|2 | line break | -1 | 0 | None | 0.125 |"
    with pytest.raises(ValueError, match="lengths"):
        sample_rows(1, ["p"], ["r", "s"], {}, [0.0, 0.0], [0.0, 0.0])


# ------------------------------------------------------------------------------ TrainerLog


def test_trainer_log_writes_everything(tmp_path, caplog):
    config = _config(tmp_path, report_to="tensorboard", plot_loss=True)
    log = TrainerLog(tmp_path, 3, console_keys=("reward", "kl", "loss", "seconds_per_step"), config=config,
                     stream=io.StringIO(), trackers=started_trackers(config))
    assert not (tmp_path / RUNS_DIR).exists()  # nothing is written before the first step
    with caplog.at_level(logging.INFO, logger="rlhfkit.tracking.progress"):
        for step in (1, 2, 3):
            log.advance(step)
            log.log(step, {"loss": 1.0 / step, "reward": 0.1 * step, "kl": 0.01 * step, "score/rm": step,
                           "policy_loss": -0.5, "value_loss": 0.25, "response_length": 7.0, "lr": 1e-3,
                           "seconds_per_step": 0.5, "epoch": 0.5 * step})
            log.log_samples(step, ["hi", "yo"], ["a", "b"], {"rm": torch.tensor([1.0, 2.0])},
                            torch.tensor([0.5, 1.5]), torch.tensor([0.0, 0.1]))
    plots = log.close()
    # Console: one concise line per logged step, through logging when stderr is not a terminal.
    lines = [r.getMessage() for r in caplog.records if r.name == "rlhfkit.tracking.progress"]
    assert len(lines) == 3 and lines[2].startswith("[3/3] reward=0.3 kl=0.03 loss=0.3333 | ")
    assert "s/step" in lines[2] and "seconds_per_step" not in lines[2]
    # trainer_log.jsonl
    records = read_trainer_log(tmp_path)
    assert [r["current_steps"] for r in records] == [1, 2, 3] and records[-1]["percentage"] == 100.0
    # TensorBoard: a scalar per statistic, the samples table as text.
    events = read_events(tmp_path / RUNS_DIR)
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/reward", "train/kl", "train/score/rm", "train/policy_loss", "train/lr",
            "train/epoch", "train/seconds_per_step"} <= scalars
    assert not {"train/current_steps", "train/percentage", "train/total_steps"} & scalars
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert "samples/text_summary" in events.Tags()["tensors"]
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2, 3]
    assert "| hi | a | 1 | 0.5 | 0 |" in texts[0].tensor_proto.string_val[0].decode()
    # samples.jsonl
    samples = read_samples(tmp_path)
    assert len(samples) == 6 and samples[-1] == {"step": 3, "prompt": "yo", "response": "b", "scores": {"rm": 2.0},
                                                 "reward": 1.5, "kl": pytest.approx(0.1)}
    # Plots: one PNG per plotted statistic that was logged.
    names = {p.name for p in plots}
    assert names == {plot_file_name(k) for k in ("loss", "reward", "kl", "policy_loss", "value_loss",
                                                 "response_length")}
    for path in plots:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    plots_again = log.close()
    assert plots_again == []  # closing twice writes nothing new


def test_nothing_written_by_other_ranks_or_without_keys(tmp_path):
    config = _config(tmp_path / "a", report_to="tensorboard", plot_loss=True)
    log = TrainerLog(tmp_path / "a", 2, enabled=False, config=config, stream=FakeTerminal())
    log.log(1, {"loss": 1.0})
    log.log_samples(1, ["p"], ["r"], {}, [0.0], [0.0])
    plots = log.close()
    assert plots == [] and not (tmp_path / "a").exists() and log.progress.bar is None
    log = TrainerLog(tmp_path / "b", 2, config=_config(tmp_path / "b"), stream=io.StringIO())
    log.log(1, {"loss": 1.0})
    plots = log.close()
    assert plots == []
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["trainer_log.jsonl"]


def test_progress_bar_only_on_a_terminal(tmp_path):
    terminal = FakeTerminal()
    log = TrainerLog(tmp_path, 4, console_keys=("loss",), config=_config(tmp_path), stream=terminal)
    assert log.progress.bar is not None
    for step in range(1, 5):
        log.advance(step)
        if step % 2 == 0:
            log.log(step, {"loss": 0.5})
    log.close()
    shown = terminal.getvalue()
    assert "4/4" in shown and "step" in shown  # steps and rate
    assert "[2/4] loss=0.5 | " in shown and "[4/4] loss=0.5 | " in shown  # the lines go above the bar
    plain = io.StringIO()
    log = TrainerLog(tmp_path / "plain", 4, stream=plain)
    log.advance(1)
    log.close()
    assert log.progress.bar is None and plain.getvalue() == ""


def test_old_signature_still_works(tmp_path):
    log = TrainerLog(tmp_path, 10, enabled=True, console_keys=("loss",), start_step=4)
    record = log.log(5, {"loss": torch.tensor(0.5), "bad": math.nan})
    assert record["loss"] == 0.5 and record["bad"] is None and record["percentage"] == 50.0
    assert json.loads((tmp_path / "trainer_log.jsonl").read_text())["current_steps"] == 5
    plots = log.close()
    assert plots == []

