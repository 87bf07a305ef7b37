"""glibc malloc settings: freed tensor blocks stay in the heap for the next pass."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

LIBC, LIBC_VERSION = platform.libc_ver()
pytestmark = pytest.mark.skipif(LIBC != "glibc" or tuple(map(int, LIBC_VERSION.split(".")[:2])) < (2, 33),
                                reason="glibc >= 2.33 (mallinfo2)")

PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
from rlhfkit.cpu.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
import torch
x = torch.empty(1 << 22, device="cpu")  # 16 MB
mapped = libc.mallinfo2().hblkhd
del x
print(applied, mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


# The probes measure glibc's heap behind CPU tensors: no GPU may be initialised in them (a CUDA
# context maps and frees host memory of its own), so they run with no GPU visible.
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def probe(mode: str, **env) -> tuple[str, int, int]:
    """(applied, MB in separately mapped blocks while a 16 MB tensor lives, MB free in the heap after)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    environment.update(NO_GPU, **env)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=environment,
                         check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_freed_blocks_stay_in_the_heap():
    applied, mapped, kept = probe("tuned")
    assert applied == "True"
    assert mapped == 0 and kept >= 16  # served from the heap and kept there for reuse
    _, mapped, kept = probe("default")
    assert mapped >= 16 and kept < 16  # glibc's default: a fresh mapping, unmapped on free


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_users_malloc_settings_win(env):
    applied, _, _ = probe("tuned", **env)
    assert applied == "False"


THP_PROBE = """
import sys
from rlhfkit.cpu.allocator import request_huge_pages
if sys.argv[1] == "request":
    request_huge_pages()  # what the command-line entry does before torch is imported
import torch
x = torch.empty(1 << 24, device="cpu").fill_(1.0)  # 64 MB
rollup = open("/proc/self/smaps_rollup").read().splitlines()
print(next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages")) >> 10)
"""


def huge_page_mb(mode: str = "request", **env) -> int:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    environment.update(NO_GPU, **env)
    return int(subprocess.run([sys.executable, "-c", THP_PROBE, mode], capture_output=True, text=True,
                              env=environment, check=True).stdout)


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP_MODE.is_file() or "[madvise]" not in THP_MODE.read_text(),
                    reason="transparent huge pages on request (madvise mode) only")
def test_huge_pages_requested_before_torch_give_large_tensors_huge_pages():
    requested = huge_page_mb()
    assert requested >= 32
    not_requested = huge_page_mb("import-only")
    assert not_requested == 0  # importing rlhfkit alone asks for nothing
    disabled = huge_page_mb(THP_MEM_ALLOC_ENABLE="0")
    assert disabled == 0  # the user's setting wins
