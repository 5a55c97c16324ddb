"""rlino.allocator: freed host memory stays in the process (glibc), and runs turn it on by default."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlino.allocator import _glibc
from rlino.config import load_config

PROBE = """
import os, sys
import torch
from rlino.allocator import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(50 * 2**20)  # 200 MB, far above glibc's largest mmap threshold
held = rss_mb()
del x
print(held - rss_mb())
"""


def _released_mb(mode: str) -> float:
    """MB of resident memory a process gives back when it frees a 200 MB tensor."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
def test_freed_memory_is_kept_only_when_asked() -> None:
    assert _released_mb("default") > 150  # the mmap'd block goes back to the kernel
    assert _released_mb("keep") < 10  # kept in the heap for the next micro-batch


def test_runs_keep_freed_memory_unless_configured_off() -> None:
    assert load_config(overrides={}).keep_freed_memory is True
    assert load_config(overrides={"keep_freed_memory": False}).keep_freed_memory is False
