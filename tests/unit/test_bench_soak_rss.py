"""bench_soak's RSS sampling: the parts add up, and a killed process not yet reaped (a zombie, every
fault leaves one for a moment) is skipped instead of ending the sampler."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.bench_soak import rss_parts

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")


def test_rss_is_its_anonymous_file_and_shared_parts():
    rss, anon, file, shmem = rss_parts(os.getpid())
    assert rss == anon + file + shmem and anon > 0 and file > 0


def test_a_zombie_has_no_sample():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "Z":  # exited, not reaped
            time.sleep(0.05)
        assert rss_parts(proc.pid) is None
    finally:
        proc.wait()
