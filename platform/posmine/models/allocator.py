"""glibc's malloc told to keep freed activation memory for reuse (CPU encoders).

By default glibc serves every block over its mmap threshold (128 KiB, raised as blocks are
freed, but never above 32 MiB) with a fresh `mmap`, and gives freed memory at the top of the
heap back to the OS once more than twice that threshold is free. An encoder frees and allocates
the same activations every batch (8 texts x 256 tokens x 1,536 floats: 12.6 MB per
feed-forward layer), so each batch page-faults them in again and the kernel zeroes every page,
in one thread, while the matrix multiplies wait. Raising both thresholds keeps those blocks in
the heap, with bit-identical vectors (only where the buffers live changes; the gain is in
BENCHMARKS.md, "Embedding against the machine's limit"). Training keeps its activations through
the backward pass and gains nothing, so only the teacher's encoder sets it.

The setting is per process and cannot be undone (setting a threshold switches off glibc's
own adjustment), which is why it is applied where an encoder is built, not at import.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks under 64 MiB come from the heap (a batch's activations are ~13-50 MB); larger ones
# (a corpus' vectors, a FAISS index) are still mapped and given back when freed. Up to 256 MiB
# of freed heap is kept before any is returned: the most a process holds beyond its live data.
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


@functools.cache
def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process (once); False where the C
    library is not glibc (macOS, musl), which is left as it is."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library already loaded into this process
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB (%s)",
              MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20, "set" if done else "refused")
    return done
