"""Keep the memory a CPU update frees for the next update (glibc's ``malloc``, Linux).

A Dreamer update on a CPU allocates and frees the same large temporaries every time (two-hot
targets and critic logits of the imagined states, [256, 16, 255] floats and larger). glibc's default
``malloc`` serves such sizes with ``mmap`` or from the top of the heap and hands them back to the
OS when they are freed (above a threshold it adapts as it goes), so the next update's first touch
of the same memory page-faults it in again, zero-filled: about 10,000 page faults per update of the
default CPU model (measured on this project's 2-core machine, 2026-11-24: 24 ms of an eager
CartPole-v1 update of 256 ms on one thread, 10 ms of a compiled one). Raising the two thresholds
keeps freed memory in the process, where the next update reuses it without a fault.

The setting is process-wide and not undone (as with ``torch.set_num_threads``): the process keeps
up to :data:`TRIM_THRESHOLD` of freed memory rather than returning it to the OS. Environment
variables the user set for glibc's ``malloc`` take precedence (see :func:`user_tuned_malloc`).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Allocations up to this size come from the heap, not from mmap (glibc's default adapts from 128 KiB
# up to this same 32 MiB, its ceiling on 64-bit systems, but only after a first mmap and munmap).
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory at the top of the heap is returned to the OS only beyond this size.
TRIM_THRESHOLD = 1024 * 1024 * 1024

# Environment variables by which a user tunes glibc's malloc (their settings are left alone).
MALLOC_ENV_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def glibc_available() -> bool:
    """Whether this process runs on Linux with glibc (whose ``mallopt`` this module calls)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def user_tuned_malloc() -> bool:
    """Whether the environment already tunes glibc's malloc: one of :data:`MALLOC_ENV_VARIABLES`, a
    ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``, or another allocator in ``LD_PRELOAD`` (jemalloc,
    tcmalloc, mimalloc: the PyTorch CPU tuning guide's advice)."""
    return (
        any(name in os.environ for name in MALLOC_ENV_VARIABLES)
        or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
        or "malloc" in os.environ.get("LD_PRELOAD", "")
    )


def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> None:
    """Set glibc's ``malloc`` to serve allocations up to ``mmap_threshold`` bytes from the heap and
    to return free heap memory to the OS only beyond ``trim_threshold`` bytes (process-wide).

    :raises OSError: not on glibc (check :func:`glibc_available` first), or ``mallopt`` refused a value
    """
    if not glibc_available():
        raise OSError(f"retain_freed_memory needs Linux with glibc, got {sys.platform} {platform.libc_ver()}")
    libc = ctypes.CDLL("libc.so.6")
    for option, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc's mallopt({option}, {value}) failed")
