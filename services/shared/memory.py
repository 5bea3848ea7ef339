"""glibc's mmap threshold, fixed (mallopt M_MMAP_THRESHOLD; a no-op on other C libraries).

A burst of large requests (tens of MB each, arriving as many ~64 KiB gRPC slices) left a server's
RSS at the burst's peak: glibc serves those slices from its heap (its dynamic mmap threshold grows up
to 32 MiB after the first large free), and the heap, fragmented by smaller long-lived allocations,
cannot give them back - malloc_trim did not help. Measured with a bare grpc.aio server and with the
vision service: +115-205 MiB kept after 24 requests of 2 x 19 MiB; with the threshold fixed at 64 KiB
such buffers are their own mappings, returned on free: +0 MiB. The router under repeated Triton kills
(bursts of failed calls and reconnects) stepped 97 -> 101 -> 106 -> 118 MiB by default, 90 -> 95 -> 90
-> 98 MiB with it (Python heap flat in both). Setting it also turns the dynamic
adjustment off. Allocations under the threshold are unaffected; those over it pay a fresh mapping
(page faults) each time: small-image Preprocess throughput was ~0.8x (4 x 640x480 per call, three
interleaved rounds on a loaded 2-core machine). Hence opt-in: MAAS_MALLOC_MMAP_THRESHOLD_BYTES=65536
for a service that takes bursts of large requests and must give the memory back.

The number of malloc arenas is bounded too (mallopt M_ARENA_MAX, MAAS_MALLOC_ARENA_MAX, default 2):
glibc gives each thread that contends for the heap its own arena (up to 8 per core), gRPC's
completion-queue and executor threads take several, and an arena fragmented by one burst never
shrinks. Set in the process before the server starts its threads (same effect as the MALLOC_ARENA_MAX
environment variable, without depending on the launcher setting it - so `maas up`, the image and
the chart all get it from this one default). Measured (loaded 2-core machine, interleaved): small-image
Preprocess throughput 0.97x of glibc's default (noise); it does not by itself return vision's memory
after bursts of 12 MP JPEGs (+134-145 MiB kept vs +98-163 MiB by default over three bursts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8  # glibc's malloc.h


def _mallopt(param: int, value: int, name: str) -> bool:
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(param, value) == 1
    if not applied:
        log.warning("mallopt refused", extra={"param": name, "value": value})
    return applied


def set_mmap_threshold(nbytes: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD, nbytes); 0 leaves glibc's default. True if applied."""
    if nbytes <= 0:
        return False
    return _mallopt(M_MMAP_THRESHOLD, nbytes, "M_MMAP_THRESHOLD")


def set_arena_max(arenas: int) -> bool:
    """mallopt(M_ARENA_MAX, arenas); 0 leaves glibc's default (8 per core). True if applied."""
    if arenas <= 0:
        return False
    return _mallopt(M_ARENA_MAX, arenas, "M_ARENA_MAX")
