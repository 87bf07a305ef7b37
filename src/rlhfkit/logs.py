"""Console logging for the command line (imports no torch, so the entry can set up the process first)."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(debug: bool = False) -> None:
    """Concise console logging; quiet third-party libraries; only warnings from processes other than the first."""
    level = logging.DEBUG if debug else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:  # launched by accelerate / torchrun: one process reports
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", force=True)
    for name in ("transformers", "datasets", "accelerate", "peft", "urllib3", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING if not debug else logging.INFO)
    # bitsandbytes warns on import (via peft) about optional CPU kernels it did not find
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR if not debug else logging.INFO)
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
