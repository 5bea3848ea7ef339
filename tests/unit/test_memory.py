"""services.shared.memory: the glibc mmap threshold, arena bound and trimming are set when asked, left alone
otherwise; Triton's environment gets the same arena bound."""

from __future__ import annotations

import platform

import pytest

from services.shared.config import ConfigError
from services.shared.memory import malloc_arena_env, set_arena_max, set_mmap_threshold, start_trimming, trim


def test_zero_leaves_glibcs_default():
    assert set_mmap_threshold(0) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_threshold_is_applied_on_glibc():
    assert set_mmap_threshold(64 * 1024) is True


def test_the_setting_is_read_and_checked(monkeypatch):
    from services.vision.config import load_config

    monkeypatch.setenv("MAAS_MALLOC_MMAP_THRESHOLD_BYTES", "65536")
    assert load_config([]).server.malloc_mmap_threshold_bytes == 65536
    assert load_config(["--malloc-mmap-threshold", "0"]).server.malloc_mmap_threshold_bytes == 0
    with pytest.raises(ConfigError):
        load_config(["--malloc-mmap-threshold", "-1"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_an_arena_bound_is_applied_on_glibc():
    assert set_arena_max(0) is False
    assert set_arena_max(2) is True


def test_the_arena_bound_defaults_to_two_and_is_checked(monkeypatch):
    from services.vision.config import load_config

    monkeypatch.delenv("MAAS_MALLOC_ARENA_MAX", raising=False)
    assert load_config([]).server.malloc_arena_max == 2
    monkeypatch.setenv("MAAS_MALLOC_ARENA_MAX", "0")
    assert load_config([]).server.malloc_arena_max == 0
    with pytest.raises(ConfigError):
        load_config(["--malloc-arena-max", "-1"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trimming_gives_free_heap_pages_back():
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # Under any mmap threshold set here (64 KiB at least): heap chunks; the last one stays live, so the
    # heap cannot shrink from its top.
    chunks = [libc.malloc(32 * 1024) for _ in range(1024)]
    for chunk in chunks[:-1]:
        libc.free(chunk)
    assert trim() is True  # 32 MiB of free pages below a live chunk: only malloc_trim returns them
    libc.free(chunks[-1])


def test_trimming_runs_on_its_own_thread_unless_off():
    assert start_trimming(0) is None
    if platform.libc_ver()[0] == "glibc":
        thread = start_trimming(3600)
        assert thread is not None and thread.daemon and thread.is_alive()


def test_the_trim_interval_defaults_to_thirty_seconds_and_is_checked(monkeypatch):
    from services.vision.config import load_config

    monkeypatch.delenv("MAAS_MALLOC_TRIM_INTERVAL_SECONDS", raising=False)
    assert load_config([]).server.malloc_trim_interval_seconds == 30
    monkeypatch.setenv("MAAS_MALLOC_TRIM_INTERVAL_SECONDS", "0")
    assert load_config([]).server.malloc_trim_interval_seconds == 0
    with pytest.raises(ConfigError):
        load_config(["--malloc-trim-interval", "-1"])


def test_tritons_environment_gets_the_services_arena_bound():
    assert malloc_arena_env({}) == {"MALLOC_ARENA_MAX": "2"}
    assert malloc_arena_env({"MAAS_MALLOC_ARENA_MAX": "4"}) == {"MALLOC_ARENA_MAX": "4"}
    assert malloc_arena_env({"MAAS_MALLOC_ARENA_MAX": "0"}) == {}  # glibc's default
    assert malloc_arena_env({"MALLOC_ARENA_MAX": "8"}) == {}  # set by hand: left alone
    for bad in ("two", "-1"):
        with pytest.raises(ConfigError, match="MAAS_MALLOC_ARENA_MAX"):
            malloc_arena_env({"MAAS_MALLOC_ARENA_MAX": bad})
