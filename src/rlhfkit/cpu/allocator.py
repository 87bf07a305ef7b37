"""Memory-allocation settings that suit tensor work on the CPU (process-wide, so applied only by
the command-line entry and the stage start, never on import).

`request_huge_pages`: PyTorch's own switch (``THP_MEM_ALLOC_ENABLE``) that aligns CPU tensors of
2 MB and more to 2 MB and asks the kernel for transparent huge pages for them. A tensor larger
than malloc's mmap threshold (vocabulary-sized logits, their log-softmax, an embedding's
gradient) is a fresh mapping every time; with 4 KB pages its first touch costs a page fault per
4 KB, with 2 MB pages 512x fewer. PyTorch reads the variable once, at its first allocation, so
the command-line entry sets it before it imports torch. A value the user set
(``THP_MEM_ALLOC_ENABLE=0`` turns it off) is left alone; kernels with huge pages disabled ignore
the request.

`keep_freed_memory`: glibc malloc settings for the blocks below that threshold. PyTorch's CPU
tensors come straight from malloc. By default glibc serves blocks above a (moving) threshold with
fresh `mmap` pages and trims its heap whenever the free space at its top passes another, so a
pass that allocates activations of a few MB each pays a page fault (and a page of zeroing) for
every 4 KB it touches, again on every step. A fixed mmap threshold at its maximum (32 MB on
64-bit) and a trim threshold of 256 MB keep freed blocks in the heap for the next pass. Applied
once per process, only on glibc and only when the user has set none of glibc's own malloc
settings (`MALLOC_*` variables, `glibc.malloc` tunables): those win.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20
_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); True if they were set now."""
    global _applied
    if _applied or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        logger.info("malloc: MALLOC_* or GLIBC_TUNABLES malloc settings are set; leaving glibc's settings to them")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; set the trim threshold first, as setting either disables
    # glibc's dynamic adjustment of both.
    _applied = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and \
        bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _applied


def request_huge_pages() -> None:
    """Ask PyTorch for transparent huge pages for CPU tensors (see the module docstring).

    Takes effect only if torch has not allocated yet, i.e. before ``import torch``.
    """
    os.environ.setdefault(THP_VARIABLE, "1")
