"""Host memory that a training step frees and takes back: keep it mapped between steps.

glibc's malloc hands a large block (the logits and their gradient, 11.7 MB a minibatch for
`rnn_scratch` on the whole Jay Chou corpus, 108 MB for songci_cpu) back to the kernel when it
is freed at the end of a step: from the top of the heap once more than its trim threshold
(twice the last large block) lies free there, or with munmap for a block past its mmap
threshold. The next step asks for the same block again and the kernel hands out zeroed pages
one fault at a time: 1,960 page faults a step for that `rnn_scratch` (9% of its time),
29,700 for songci_cpu (10%), and steps that vary by a few milliseconds from one to the next,
which is what a rank waits for at every gradient average. Raising both thresholds keeps the
block mapped and reused: no faults after the first step.

Only with glibc (other C libraries, or a malloc loaded with LD_PRELOAD, are left alone), not
where the user tuned glibc's malloc already (GLIBC_TUNABLES or MALLOC_*_ variables), and not
with PIPELINE_KEEP_FREED_MEMORY=0 (glibc's defaults: `make bench` compares both). The cost:
memory a step freed stays in the process (the peak it reached anyway), up to TRIM_MB more
before any goes back.
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
