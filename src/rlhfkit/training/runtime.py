"""Process-level set-up shared by every stage: accelerate, seeds, output folder."""

from __future__ import annotations

import atexit
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from rlhfkit.accelerator.defaults import apply_device_defaults
from rlhfkit.accelerator.matmul import apply_tf32
from rlhfkit.config import Config
from rlhfkit.errors import fail
from rlhfkit.run_lock import holds_files
from rlhfkit.tracking.trackers import tracker_instances
from rlhfkit.training.deepspeed import check_deepspeed_runnable, deepspeed_plugin

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_per_process(seed: int, process_index: int) -> None:
    """After the set-up every process shares (seeded with `seed`), give each its own random stream.

    Process 0 continues the shared stream, so a one-process run is the same as without this; process
    k reseeds with seed + k, so processes sample different responses and dropout masks.
    """
    if process_index > 0:
        seed_everything(seed + process_index)


def _launched_processes() -> int:
    """Processes started by `accelerate launch` / `torchrun` (1 for a plain `python` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _no_accelerator_device() -> bool:
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None:
        return not accelerator_api.is_available()
    return not torch.cuda.is_available()


def build_accelerator(config: Config) -> Accelerator:
    """An Accelerator for this run: mixed precision from bf16/fp16, CPU when asked explicitly, the
    trackers of `report_to` (`tracking.trackers`) and DeepSpeed from the `deepspeed` key
    (`training.deepspeed`).

    Keys left unset whose defaults depend on the device are filled in for the accelerator's device
    (`accelerator.defaults`). Gradient accumulation is done by the stage loops themselves (they know the token counts), so
    the Accelerator is created with one accumulation step. Two additions to accelerate's own
    set-up make the same configs run on a machine without GPUs (tests, debugging): several
    launched processes use the gloo backend instead of running as unrelated copies, and an FSDP
    launch config shards with FSDP over gloo (accelerate enables FSDP only on accelerators).
    """
    precision = "bf16" if config.training.bf16 else "fp16" if config.training.fp16 else "no"
    # A new run in the same process (tests, the demo) may ask for another precision; keep the
    # process group (PartialState) but forget the previous run's settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = config.model.device == "cpu" or (_launched_processes() > 1 and _no_accelerator_device())
    trackers = tracker_instances(config)  # a missing tracker package fails here, before anything loads
    plugin = None
    if config.training.deepspeed is not None:
        plugin = deepspeed_plugin(config)
        check_deepspeed_runnable(config, accelerator_available=not _no_accelerator_device())
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch --use_deepspeed` sets
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, log_with=trackers or None, deepspeed_plugin=plugin)
    filled = apply_device_defaults(config, accelerator.device.type)
    apply_tf32(config.training.tf32, accelerator.device.type)
    if filled:
        logger.info("defaults for %s: %s", accelerator.device.type,
                    ", ".join(f"{key}={getattr(config.training, key)}" for key in filled))
    if accelerator.num_processes > 1:
        atexit.unregister(_destroy_process_group)  # once per process, however many stages it runs
        atexit.register(_destroy_process_group)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and _env_flag("ACCELERATE_USE_FSDP"):
        _enable_fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fill_deepspeed_config(accelerator, config)
    return accelerator


def _destroy_process_group() -> None:
    """Close the process group before the interpreter exits; left open, gloo's threads can abort the
    process during teardown after a successful run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_launched_process(code: int) -> None:
    """End a process of a multi-process launch now, once its command has finished: flush the output
    and leave without the interpreter's teardown.

    Every file the run writes is closed by then and the ranks have met at the run's last barrier.
    The teardown itself is what fails: on CPU/gloo with FSDP2, about one launch in ten had a rank
    abort after its successful run ("terminate called without an active exception": a C++ thread
    destroyed unjoined), which the launcher reports as a failed run. A single process returns.
    """
    if _launched_processes() <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Switch a CPU process group to FSDP with the plugin the launch config describes.

    accelerate's AcceleratorState attaches an FSDP plugin only to accelerator devices; FSDP2
    (`fully_shard`) itself runs on CPU with gloo, which is what the CPU tests use.
    """
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` sets
    if plugin.fsdp_version != 2:
        raise fail("FSDP on CPU needs fsdp_version: 2 in the accelerate config (FSDP1 needs a GPU)")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _fill_deepspeed_config(accelerator: Accelerator, config: Config) -> None:
    """Give DeepSpeed the sizes it would otherwise read from a DataLoader (the stages use none).

    The stage loops accumulate micro-batches themselves and mark the last one of each optimizer
    step as DeepSpeed's accumulation boundary, so DeepSpeed's own accumulation count stays 1.
    """
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    t = config.training
    for key, value in (("train_micro_batch_size_per_gpu", t.per_device_train_batch_size),
                       ("gradient_accumulation_steps", 1),
                       ("gradient_clipping", t.max_grad_norm if t.max_grad_norm > 0 else 0.0)):
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value
    if ds_config["gradient_accumulation_steps"] != 1:
        raise fail(f"the DeepSpeed config sets gradient_accumulation_steps: {ds_config['gradient_accumulation_steps']}; "
                   "set it to 1 (or auto) and use rlhfkit's gradient_accumulation_steps instead")
    ds_config["train_batch_size"] = ds_config["train_micro_batch_size_per_gpu"] * accelerator.num_processes


def check_output_dir(config: Config) -> Path:
    """Refuse an output_dir that is a file, inside a file or not writable; never create it here."""
    return check_output_folder(config.output.output_dir, "output_dir")


def check_output_folder(folder: str | Path, key: str) -> Path:
    """Refuse an output folder (named by config key `key`) that is a file, inside a file or not
    writable; never create it here."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise fail(f"{key} {path} is a file; choose a folder path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise fail(f"{key} {path} is inside {existing}, which is a file; choose a folder path")
    try:  # the only reliable test (root ignores permission bits; read-only mounts do not)
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise fail(f"{key} {path} is not writable ({err.strerror}); choose a folder you can write to") from None
    return path


def check_one_process(command: str) -> None:
    """Refuse a multi-process launch of a command that runs in one process (`eval`, `export`): each
    launched process would run the whole command into the same folder."""
    processes = _launched_processes()
    if processes > 1:
        raise fail(f"rlhfkit {command} runs in one process, but this is one of {processes} launched processes "
                   f"(WORLD_SIZE={processes}); run `rlhfkit {command} ...` without accelerate launch or torchrun")


def check_output_empty(config: Config, path: Path) -> None:
    """Refuse a non-empty output_dir (its lock file aside) unless overwriting or resuming."""
    resuming = str(config.training.resume_from_checkpoint).lower() not in ("none", "false", "")
    if config.output.overwrite_output_dir or resuming or not path.is_dir():
        return
    if holds_files(path):
        raise fail(f"output_dir {path} is not empty; set overwrite_output_dir: true, resume with "
                   "resume_from_checkpoint: true, or choose another folder")
