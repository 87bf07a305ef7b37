"""`deepspeed: <JSON file or mapping>` in the training config, as LLaMA-Factory and transformers'
Trainer take it: DeepSpeed set up through accelerate's `DeepSpeedPlugin(hf_ds_config=...)`, as
`accelerate launch` with a DeepSpeed config sets it up.

DeepSpeed needs its package, an accelerator and launched processes (`accelerate launch`,
`torchrun` or `deepspeed`, which start the process group it joins); each missing piece stops the
run in one line before anything loads. The config's "auto" values are filled from the training
config (`runtime._fill_deepspeed_config`, accelerate).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from rlhfkit.errors import fail

LAUNCH = ("launch it with `accelerate launch -m rlhfkit.cli train CONFIG` (or `torchrun` / "
          "`deepspeed --module rlhfkit.cli train CONFIG`)")


def read_deepspeed_config(source: str, value: str | dict) -> dict[str, Any]:
    """The DeepSpeed config of `deepspeed`: a copy of the mapping, or the JSON file it names
    (relative to the working directory, as LLaMA-Factory reads it)."""
    if isinstance(value, dict):
        return copy.deepcopy(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise fail(f"{source}: deepspeed config {value} does not exist (relative paths start at {Path.cwd()}); "
                   "give the path of a DeepSpeed JSON file")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise fail(f"{path} line {err.lineno}: {err.msg}; fix the DeepSpeed JSON") from None
    if not isinstance(loaded, dict):
        raise fail(f"{path}: a DeepSpeed config must be a JSON object")
    return loaded


def deepspeed_plugin(config):
    """accelerate's DeepSpeedPlugin holding the config of `config.training.deepspeed` (needs no deepspeed
    package; `check_deepspeed_runnable` checks the rest)."""
    from accelerate.utils import DeepSpeedPlugin

    values = read_deepspeed_config(config.source, config.training.deepspeed)
    try:
        return DeepSpeedPlugin(hf_ds_config=values)
    except (ValueError, TypeError, KeyError) as err:
        raise fail(f"{config.source}: deepspeed config: {str(err).splitlines()[0]}") from None


def check_deepspeed_runnable(config, accelerator_available: bool) -> None:
    """The deepspeed package, an accelerator and a launcher: one line for the first that is missing."""
    from accelerate.utils import is_deepspeed_available

    if not is_deepspeed_available():
        raise fail(f"{config.source}: deepspeed needs the deepspeed package: pip install deepspeed, then {LAUNCH}")
    if config.model.device == "cpu" or not accelerator_available:
        where = "device: cpu is set" if config.model.device == "cpu" else "no accelerator (GPU) was found"
        raise fail(f"{config.source}: DeepSpeed trains on accelerators and {where}; remove deepspeed to train "
                   "without it")
    if "LOCAL_RANK" not in os.environ:
        raise fail(f"{config.source}: DeepSpeed joins a launched process group; {LAUNCH}")
