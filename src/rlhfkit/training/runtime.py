"""Process-level set-up shared by every stage: accelerate, seeds, output folder, logging."""

from __future__ import annotations

import logging
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from rlhfkit.config import Config
from rlhfkit.errors import fail

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_accelerator(config: Config) -> Accelerator:
    """An Accelerator for this run: mixed precision from bf16/fp16, CPU when asked explicitly.

    Gradient accumulation is done by the stage loops themselves (they know the token counts), so
    the Accelerator is created with one accumulation step.
    """
    precision = "bf16" if config.training.bf16 else "fp16" if config.training.fp16 else "no"
    # A new run in the same process (tests, the demo) may ask for another precision; keep the
    # process group (PartialState) but forget the previous run's settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=config.model.device == "cpu")


def check_output_dir(config: Config) -> Path:
    """Refuse a non-empty output_dir unless overwriting or resuming; never create it here."""
    path = Path(config.output.output_dir)
    if path.exists() and not path.is_dir():
        raise fail(f"output_dir {path} is a file; choose a folder path")
    resuming = str(config.training.resume_from_checkpoint).lower() not in ("none", "false", "")
    if path.is_dir() and any(path.iterdir()) and not (config.output.overwrite_output_dir or resuming):
        raise fail(f"output_dir {path} is not empty; set overwrite_output_dir: true, resume with "
                   "resume_from_checkpoint: true, or choose another folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise fail(f"output_dir {path} is inside {existing}, which is a file; choose a folder path")
    try:  # the only reliable test (root ignores permission bits; read-only mounts do not)
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise fail(f"output_dir {path} is not writable ({err.strerror}); choose a folder you can write to") from None
    return path


def setup_logging(debug: bool = False) -> None:
    """Concise console logging; quiet third-party libraries."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", force=True)
    for name in ("transformers", "datasets", "accelerate", "peft", "urllib3", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING if not debug else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging set-up must never stop a run
        pass
