"""Process settings that make CPU training faster, applied before torch is loaded.

glibc's malloc hands every block over its mmap threshold (at most 32 MB) straight back to the
kernel when it is freed, and trims freed memory at the top of the heap. A training step of this
AlexNet frees and allocates the same large buffers every step (the 64 MB gradients of the
4096x4096 FC weights, their bf16 copies under autocast, activations), so each step page-faults
hundreds of MB back in. Keeping freed memory in the heap, on the 2-core development CPU, batch 64:

    bf16 autocast step  309 ms -> 230 ms          fp32 step  459 ms -> 400 ms      (channels-last)

(`bench/bench_train.py` measures it against the reference pipeline.) The thresholds can only be
raised past 32 MB by GLIBC_TUNABLES, which the dynamic loader reads when a process starts, so
a training command restarts itself once with it. The cost: the process keeps its peak memory
until it exits instead of returning some between steps.
"""

from __future__ import annotations

import os
import platform
import sys

# 4 GiB: no block this training allocates goes to mmap, and freed memory is not trimmed.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def malloc_env() -> dict[str, str]:
    """The environment variable that keeps freed memory in the heap, where it applies (glibc)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return {}
    return {"GLIBC_TUNABLES": GLIBC_TUNABLES}


def restart_with_fast_malloc() -> None:
    """Replace this process with the same command line and GLIBC_TUNABLES set, once. Does
    nothing off glibc, or when GLIBC_TUNABLES is already set (the user's own, or after the
    restart). Call it before torch is imported; it does not return when it restarts."""
    env = malloc_env()
    if not env or "GLIBC_TUNABLES" in os.environ:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **env})
