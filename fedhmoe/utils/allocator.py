"""Keep freed memory in the process for the next training step instead of handing it back to the system.

A training step on a CPU allocates and frees the same large buffers every step: activations, logits (for a
49,152-word vocabulary, 4 x 128 tokens, 100 MB), their gradients. glibc's ``malloc`` serves blocks above its mmap
threshold (dynamic, at most 32 MiB) with fresh ``mmap`` pages and returns them on ``free``, and trims the top of
its heap beyond the trim threshold, so the next step faults every page in again and the kernel zeroes it. On the
2-core x86_64 machine of ``docs/benchmarks.md`` that was about 100,000 page faults (400 MB) per LoRA step of a
30-layer SmolLM2; keeping the pages removed four fifths of them and about 4-7% of the step's time, more in a
process that trains several models in turn.

:func:`keep_freed_memory` raises both thresholds (``mallopt``), so blocks up to 256 MiB come from the heap and up
to 1 GiB of free heap stays mapped: a steady training loop reuses its own pages. The peak resident memory is
what the step needs anyway, plus what the heap keeps (12% more in that measurement).

It is called by the ``ClientApp``'s handlers, i.e. in every process that trains: the in-process engine, each Ray
worker of the Simulation Engine and each ``flwr-clientapp`` process of a deployment (importing fedhmoe changes
nothing). It does nothing off glibc (macOS, musl), and ``FEDHMOE_MALLOC=system`` leaves the allocator as it is.
A glibc that refuses an mmap threshold of 256 MiB (older ones cap it at 32 MiB) gets its largest one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["MMAP_THRESHOLD", "MMAP_THRESHOLD_OLD_GLIBC", "TRIM_THRESHOLD", "keep_freed_memory"]

log = logging.getLogger("fedhmoe")

#: Blocks up to this size are served from the heap, not from fresh mappings (bytes).
MMAP_THRESHOLD = 256 << 20
#: The largest mmap threshold that older glibc accepts (``HEAP_MAX_SIZE / 2`` on 64-bit systems).
MMAP_THRESHOLD_OLD_GLIBC = 32 << 20
#: Free memory at the top of the heap up to this size stays mapped (bytes).
TRIM_THRESHOLD = 1 << 30

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) for this process.

    Returns:
        Whether both were raised: ``False`` off Linux, without glibc, or with ``FEDHMOE_MALLOC=system``. Later calls
        return the first call's answer and change nothing.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    choice = os.environ.get("FEDHMOE_MALLOC", "").strip().lower()
    if choice not in ("", "keep", "system"):
        log.warning("FEDHMOE_MALLOC=%s is not a setting (keep, system); freed memory is kept", choice)
    if sys.platform != "linux" or choice == "system":
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl has a mallopt that does nothing
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_OLD_GLIBC))
    trim = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not (mmap and trim):
        log.warning("glibc refused to keep freed memory (mmap threshold set: %s, trim threshold set: %s)", mmap, trim)
    _done = mmap and trim
    return _done
