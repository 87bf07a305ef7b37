"""Checkpoint files: writing them so they hold tensors and plain data only (and so that a failed write
leaves nothing behind), reading them without ever running code from them, and choosing the
checkpoint to resume from (a damaged one is skipped).

Optimizer, scheduler and RNG states are `torch.save` files of tensors, numbers, strings, lists,
tuples and dicts: `torch.load(weights_only=True)` reads them. A file that needs more (a pickle of
arbitrary objects, as a planted payload would) is refused with one line; nothing in it runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.errors import fail, one_line
from rlhfkit.models.weight_files import safetensors_problem
from rlhfkit.training.distributed import global_sums

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable_state.safetensors"
SHARDED_STATE_DIR = "sharded_state"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


class DamagedFile(Exception):
    """A checkpoint file that is missing, truncated or unreadable (not one that is unsafe to read)."""


def numbered_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` folder in `output_dir`, oldest first, complete or not."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints in `output_dir` that hold their trainer state (written last), oldest first."""
    return [p for p in numbered_folders(output_dir) if (p / STATE_FILE).is_file()]


def save_plain(obj: Any, path: Path) -> None:
    """`torch.save` through a Python file, so that a full disk raises OSError(ENOSPC) (torch's own
    file writer reports it as a RuntimeError without the cause)."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def _numpy_array_globals() -> list:
    """What NumPy arrays pickle to: checkpoints written before RNG states were plain lists hold
    the NumPy state as an array. Array reconstruction creates data, never calls user code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]


def load_plain(path: Path, map_location: Any = None, numpy_arrays: bool = False, mmap: bool = False) -> Any:
    """`torch.load` with weights_only=True: tensors and plain data only.

    A file that needs arbitrary unpickling is refused with one line (`RlhfkitError`); a missing,
    truncated or otherwise unreadable one raises `DamagedFile`. `numpy_arrays` also accepts NumPy
    arrays (the RNG states of older checkpoints). `mmap` maps a zip-format file's tensors instead
    of reading them: a cheap check of the whole file.
    """
    if not path.is_file():
        raise DamagedFile(f"{path.name} is missing")
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise fail(f"{path} holds objects other than tensors and plain data, and loading it could run code; "
                   "refusing to read it. Delete that checkpoint (or the file) and resume from another one") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise DamagedFile(f"{path.name} is unreadable ({one_line(err, 160)})") from None


def _check_safetensors(path: Path) -> None:
    """Parse the header and check every tensor lies inside the file (what a truncation breaks)."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise DamagedFile(f"{path.name} is damaged ({problem})")


class _DistributedCheckpointMetadata(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint `.metadata` file (a plain pickle that DCP reads with
    `pickle.load`) with only the classes such a file holds; anything else is refused."""

    MODULE = "torch.distributed.checkpoint.metadata"
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
             ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if module in {m for m, _ in self.NAMES} | {self.MODULE} else None
        if (module, name) in self.NAMES or (module == "torch" and isinstance(found, torch.dtype)) \
                or (module == self.MODULE and isinstance(found, type) and found.__module__ == self.MODULE):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def check_sharded_state(folder: Path) -> None:
    """The sharded training state accelerate wrote (FSDP): its pickled files load with weights_only
    (accelerate reads them so), its DCP metadata holds only DCP's own classes.

    DeepSpeed's `.pt` files are read by DeepSpeed itself and are not checked here.
    """
    for path in sorted(folder.rglob("*")):
        if path.name == ".metadata":
            try:
                with path.open("rb") as handle:
                    _DistributedCheckpointMetadata(handle).load()
            except pickle.UnpicklingError as err:
                if "truncated" in str(err):
                    raise DamagedFile(f"{path.relative_to(folder.parent)} is truncated") from None
                raise fail(f"{path} holds objects other than a checkpoint's metadata ({err}); refusing to read it. "
                           "Delete that checkpoint and resume from another one") from None
            except (EOFError, OSError, ValueError, AttributeError) as err:
                raise DamagedFile(f"{path.relative_to(folder.parent)} is unreadable ({one_line(err, 160)})") from None
        elif path.suffix in (".bin", ".pkl"):
            load_plain(path, numpy_arrays=True, mmap=True)
        elif path.suffix == ".safetensors":
            _check_safetensors(path)


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's `trainer_state.json` (its step and the stage's state)."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedFile(f"{STATE_FILE} is missing") from None
    except (OSError, ValueError) as err:
        raise DamagedFile(f"{STATE_FILE} is unreadable ({one_line(err, 160)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DamagedFile(f"{STATE_FILE} has no step")
    return state


def check_checkpoint(path: Path, full_model: bool) -> None:
    """Raise `DamagedFile` naming the first missing, truncated or unreadable file of checkpoint
    `path` (cheap: headers and zip directories are read, tensors only mapped); refuse unsafe files.

    `full_model`: the run trains a plain model (full / freeze), whose weights the checkpoint's model
    files hold; otherwise they are in `trainable_state.safetensors`.
    """
    read_state(path)
    for safetensors in sorted(path.glob("*.safetensors")):
        _check_safetensors(safetensors)
    if (path / SHARDED_STATE_DIR).is_dir():
        check_sharded_state(path / SHARDED_STATE_DIR)
    else:
        load_plain(path / OPTIMIZER_FILE, map_location="cpu", mmap=True)
        weights = ["model.safetensors"] if full_model else [TRAINABLE_FILE]
        index = path / "model.safetensors.index.json"
        if full_model and index.is_file():
            try:
                weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise DamagedFile(f"{index.name} is unreadable ({one_line(err, 160)})") from None
        for name in weights:
            if not (path / name).is_file():
                raise DamagedFile(f"{name} is missing")
    load_plain(path / SCHEDULER_FILE, mmap=True)
    for rng_file in sorted(path.glob("rng_state_*.pt")):
        load_plain(rng_file, numpy_arrays=True, mmap=True)


def choose_checkpoint(value: Any, output_dir: str | Path, full_model: bool, report: bool = True) -> Path | None:
    """The checkpoint named by `resume_from_checkpoint`, or None for a fresh start.

    true: the latest usable checkpoint in output_dir; each damaged newer one is skipped with a note
    (`report`: this process writes the notes). A path: that checkpoint, which must be whole.
    """
    if value in (None, False, "", "false", "False", "none", "None"):
        return None
    if value is True or str(value).lower() == "true":
        folders = numbered_folders(output_dir)
        if not folders:
            if report:
                logger.info("resume_from_checkpoint: no checkpoint in %s yet; starting from scratch", output_dir)
            return None
        skipped = []
        for folder in reversed(folders):
            try:
                check_checkpoint(folder, full_model)
            except DamagedFile as err:
                skipped.append(f"{folder.name}: {err}")
                if report:
                    logger.warning("note: skipping damaged checkpoint %s: %s", folder, err)
                continue
            return folder
        raise fail(f"no usable checkpoint in {output_dir} ({'; '.join(skipped)}); delete the damaged ones, or "
                   "start afresh without resume_from_checkpoint (overwrite_output_dir: true)")
    path = Path(str(value))
    if not (path / STATE_FILE).is_file():
        raise fail(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE}); "
                   "use true for the latest one in output_dir")
    try:
        check_checkpoint(path, full_model)
    except DamagedFile as err:
        raise fail(f"resume_from_checkpoint: checkpoint {path} is damaged: {err}; choose an earlier one, "
                   "or true for the latest usable one in output_dir") from None
    return path


class CheckpointWriting:
    """The steps of writing one checkpoint: each process runs its part of a step, then all learn
    whether any failed; on a failure the temporary folder goes and every process stops together."""

    def __init__(self, accelerator, final: Path, staging: Path) -> None:
        self.accelerator, self.final, self.staging = accelerator, final, staging
        self.current = staging

    def at(self, path: Path) -> Path:
        """Note `path` as the one being written (named if the write fails); return it."""
        self.current = path
        return path

    def run(self, write: Callable[[], Any] | None) -> None:
        """This process's part of a step (None: nothing), then the step's verdict for every process."""
        problem = None
        try:
            if write is not None:
                write()
        except Exception as err:
            problem = write_problem(err, self.current)
            if problem is None:  # not a file-system fault: a bug, shown as it is
                shutil.rmtree(self.staging, ignore_errors=True)
                raise
        failed = problem is not None
        if self.accelerator.num_processes > 1:
            failed = global_sums(self.accelerator, failed)[0] > 0  # also the step's barrier
        if failed:
            if self.accelerator.is_main_process:
                shutil.rmtree(self.staging, ignore_errors=True)
            problem = problem or "another process failed to write its part"
            raise fail(f"could not write checkpoint {self.final}: {problem}; the partial checkpoint was removed. "
                       "Free space there (or choose another output_dir), then resume with resume_from_checkpoint: true")


def write_problem(err: Exception, path: Path) -> str | None:
    """What went wrong writing `path`, when the file system refused (no space, quota, permissions, I/O)."""
    if isinstance(err, OSError):
        reason = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
        return f"{reason} ({err.filename or path})"
    if f"os error {errno.ENOSPC}" in str(err) or os.strerror(errno.ENOSPC) in str(err):  # safetensors' writer
        return f"{os.strerror(errno.ENOSPC)} ({path})"
    return None
