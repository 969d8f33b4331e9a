"""Host memory that a training step frees and takes back: keep it mapped between steps.

glibc's malloc hands a large freed block back to the kernel: past its mmap threshold with
munmap, below it from the top of the heap once more than its trim threshold lies free there
(both follow the largest block freed so far, up to 32 MiB). A training step frees its largest
blocks (the logits and their gradient: 11.7 MB for `rnn_scratch` on the whole Jay Chou
corpus, 108 MB for songci_cpu) at its end and asks for them again at the next step's start,
and the kernel hands them out one zeroed page at a time: about 1,700 page faults a step for
that `rnn_scratch`, 14,500 for songci_cpu (6.5% of its time here), 45,700 where the blocks
are past 32 MiB (47 MB logits: 1.38x faster without them). Setting both thresholds keeps the
blocks mapped and reused: no faults once the heap has grown (docs/benchmarks.md, "Host
memory between steps").

Only with glibc (other C libraries, or a malloc loaded with LD_PRELOAD, are left alone), not
where the user tuned glibc's malloc already (GLIBC_TUNABLES or MALLOC_*_ variables), and not
with PIPELINE_KEEP_FREED_MEMORY=0 (glibc's defaults: `make bench` compares both). The cost:
memory a step freed stays in the process (up to TRIM_MB free at the heap's top), and the peak
can rise where freed blocks do not fit the holes the next step leaves (songci_cpu: 733 ->
770 MiB).
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_MB = 256  # blocks below this come from the heap, not a fresh mapping
TRIM_MB = 512  # free memory kept at the heap's top before any goes back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


# glibc's own variables for what is set here (GLIBC_TUNABLES' glibc.malloc.* too)
USER_KNOBS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


def user_tuned() -> bool:
    env = os.environ
    return (
        "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
        or any(k in env for k in USER_KNOBS)
        or "malloc" in env.get("LD_PRELOAD", "")  # jemalloc, tcmalloc, mimalloc
    )


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process; True where they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_tuned():
        return False
    if os.environ.get("PIPELINE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Setting either turns off glibc's own adjustment of both, so set both.
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_MB << 20)
    trim_set = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_MB << 20)
    return bool(mmap_set and trim_set)
