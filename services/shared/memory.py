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

Free heap pages are given back every MAAS_MALLOC_TRIM_INTERVAL_SECONDS (default 30) by malloc_trim(0),
which, unlike glibc's own trimming (top of the heap only), also releases free pages inside the heap.
The router while Triton is down (a kill in the soak) grows its main heap by ~25 MiB and drops back
with ~7 MiB kept: free, but below live chunks. malloc_trim took it back to the pre-kill level
(76 -> 69 MiB anonymous, pre-kill 69), in 1-3 ms on a loaded 2-core machine. It does not help where
the memory is still in use (the vision burst above: fragmented by live allocations).

Triton's own process is C++ and cannot call mallopt for us: the launchers set MALLOC_ARENA_MAX in its
environment (malloc_arena_env), from the same MAAS_MALLOC_ARENA_MAX default. By default it had 15
arenas on 2 cores, their memory rising with each burst of gRPC threads; with 2 that part stayed flat
(its main heap still keeps free memory after Generate / Classify calls: docs/development.md, Soak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Mapping

from services.shared.config import DEFAULT_MALLOC_ARENA_MAX, ConfigError

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8  # glibc's malloc.h


def _libc_function(name: str):
    """glibc's function `name`, or None on other C libraries."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _mallopt(param: int, value: int, name: str) -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
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


def trim() -> bool:
    """malloc_trim(0): free heap pages back to the OS. True if glibc released some."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return malloc_trim(0) == 1


def start_trimming(interval: float) -> threading.Thread | None:
    """trim() every `interval` s on a daemon thread; 0 = never (and None returned)."""
    if interval <= 0 or _libc_function("malloc_trim") is None:
        return None
    stop = threading.Event()  # never set: the thread lives as long as the process

    def loop() -> None:
        while not stop.wait(interval):
            trim()

    thread = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    thread.start()
    return thread


def malloc_arena_env(environ: Mapping[str, str]) -> dict[str, str]:
    """MALLOC_ARENA_MAX for a process we launch but cannot mallopt in (tritonserver and its stubs),
    from MAAS_MALLOC_ARENA_MAX in `environ` (default DEFAULT_MALLOC_ARENA_MAX; 0 = glibc's default,
    nothing set). A MALLOC_ARENA_MAX already in `environ` wins."""
    if "MALLOC_ARENA_MAX" in environ:
        return {}
    raw = environ.get("MAAS_MALLOC_ARENA_MAX") or str(DEFAULT_MALLOC_ARENA_MAX)
    try:
        arenas = int(raw)
    except ValueError:
        raise ConfigError(f"MAAS_MALLOC_ARENA_MAX={raw!r} is not an integer") from None
    if arenas < 0:
        raise ConfigError(f"MAAS_MALLOC_ARENA_MAX={raw!r} must be >= 0")
    return {"MALLOC_ARENA_MAX": str(arenas)} if arenas > 0 else {}
