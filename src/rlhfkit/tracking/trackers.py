"""Experiment trackers (`report_to`) through accelerate's tracking API.

`tracker_instances(config)` builds one accelerate tracker per name for `Accelerator(log_with=...)`:
TensorBoard is rlhfkit's own (`tracking.tensorboard`: events in `output_dir/runs`, a samples table),
wandb, mlflow and swanlab are accelerate's. `start_trackers` starts them on the main process
(`Accelerator.init_trackers`, with the run's configuration as hyperparameters), and `Trackers`
logs each trainer-log record with `Accelerator.log` under TensorBoard's names (`train/loss`,
`eval/loss`, ...), sample tables where a tracker shows tables, and finishes them.

`report_to: all` means each supported tracker whose package is installed; a tracker named
explicitly whose package is missing stops the run in one line. Project: `rlhfkit` (wandb:
$WANDB_PROJECT when set; mlflow: $MLFLOW_EXPERIMENT_NAME when set; swanlab: swanlab_project); run
name: run_name, else output_dir. wandb writes into `output_dir/wandb` unless $WANDB_DIR is set;
its other settings ($WANDB_MODE=offline, ...) come from the environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from rlhfkit.config import Config, report_to_list
from rlhfkit.errors import fail
from rlhfkit.tracking.tensorboard import SAMPLES_TAG, TensorBoardWriter, sample_columns, samples_table, scalar_items

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "swanlab": "swanlab"}
"""Supported trackers and the package each needs."""
PROJECT = "rlhfkit"


def package_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def tracker_names(config: Config) -> list[str]:
    """The trackers `report_to` (and LLaMA-Factory's `use_swanlab`) ask for; `all`: the installed ones.

    A tracker named explicitly whose package is missing fails in one line.
    """
    asked = report_to_list(config.output.report_to)
    if config.output.use_swanlab:
        asked.append("swanlab")
    names: list[str] = []
    for name in asked:
        if name == "all":
            names += [n for n, package in TRACKER_PACKAGES.items() if package_installed(package)]
            continue
        package = TRACKER_PACKAGES[name]
        if not package_installed(package):
            raise fail(f"{config.source}: report_to {name} needs the {package} package: pip install {package} "
                       f"(or remove {name} from report_to)")
        names.append(name)
    return list(dict.fromkeys(names))  # in order, once each


def run_name(config: Config) -> str:
    return config.output.run_name or str(config.output.output_dir)


def tracker_instances(config: Config) -> list:
    """One accelerate tracker per name of `tracker_names`, for `Accelerator(log_with=...)` (nothing
    starts until `start_trackers`)."""
    from accelerate.tracking import MLflowTracker, SwanLabTracker, WandBTracker

    o = config.output
    trackers = []
    for name in tracker_names(config):
        if name == "tensorboard":
            trackers.append(TensorBoardWriter(o.output_dir))
        elif name == "wandb":
            wandb_dir = {} if os.environ.get("WANDB_DIR") else {"dir": str(o.output_dir)}
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name(config), **wandb_dir))
        elif name == "mlflow":
            trackers.append(MLflowTracker(experiment_name=PROJECT, run_name=run_name(config)))
        elif name == "swanlab":
            options = {"experiment_name": o.swanlab_run_name or run_name(config), "workspace": o.swanlab_workspace,
                       "mode": o.swanlab_mode}
            trackers.append(SwanLabTracker(o.swanlab_project or PROJECT,
                                           **{key: value for key, value in options.items() if value is not None}))
    return trackers


def hyperparameters(config: Config) -> dict[str, Any]:
    """Every key of the configuration as a flat mapping of str, int, float, bool or None (others as JSON)."""
    values: dict[str, Any] = {}
    for section in ("model", "data", "finetuning", "training", "generation", "ppo", "output"):
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            plain = value is None or isinstance(value, (str, int, float, bool))
            values[key] = value if plain else json.dumps(value, default=str)
    if values.get("hf_hub_token"):  # a secret: never sent to a tracker
        values["hf_hub_token"] = "***"
    return values


class Trackers:
    """The run's started trackers (none on processes other than the main one)."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    @property
    def active(self) -> list:
        return list(self.accelerator.trackers) if self.accelerator is not None else []

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Every numeric statistic of a trainer-log record, tagged `train/<name>` or `eval/<name>`."""
        if self.active:
            self.accelerator.log(dict(scalar_items(record)), step=step)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sample rows: a Markdown table in TensorBoard, a table in wandb (the others show no text)."""
        if not rows:
            return
        for tracker in self.active:
            if isinstance(tracker, TensorBoardWriter):
                tracker.log({SAMPLES_TAG: samples_table(rows)}, step=step)
            elif tracker.name == "wandb":
                header, cells = sample_columns(rows)
                tracker.log_table(SAMPLES_TAG, columns=header, data=cells, step=step)

    def finish(self) -> None:
        """Close every tracker (once)."""
        for tracker in self.active:
            tracker.finish()
        if self.accelerator is not None:
            self.accelerator.trackers = []


START_HINTS = {"wandb": "run `wandb login`, set WANDB_MODE=offline, or remove wandb from report_to"}


def start_trackers(accelerator, config: Config, output_dir: str | Path, start_step: int = 0) -> Trackers:
    """Start the trackers the accelerator was built with (`tracker_instances`), on the main process,
    with the configuration as hyperparameters. A tracker that cannot start (wandb without a login,
    an unreachable mlflow server) stops the run in one line naming it. Resumed at `start_step`:
    TensorBoard hides the events an interrupted run wrote after its checkpoint."""
    trackers = Trackers(accelerator)
    if not accelerator.log_with:
        return trackers
    for tracker in accelerator.log_with:
        if isinstance(tracker, TensorBoardWriter) and start_step:
            tracker.purge_step = start_step + 1
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # wandb writes into it
    try:
        accelerator.init_trackers(PROJECT, config=hyperparameters(config))
    except Exception as err:  # noqa: BLE001 - each tracker's package raises its own types
        for tracker in trackers.active:  # those that started
            try:
                tracker.finish()
            except Exception:  # noqa: BLE001 - one that did not start cannot finish
                pass
        accelerator.trackers = []
        package = type(err).__module__.split(".")[0]
        name = package if package in TRACKER_PACKAGES else "a tracker"
        detail = str(err).splitlines()[0] if str(err) else ""
        hint = START_HINTS.get(name, "fix its set-up or remove it from report_to")
        raise fail(f"{config.source}: report_to: {name} could not start ({type(err).__name__}: {detail}); {hint}") \
            from None
    return trackers
