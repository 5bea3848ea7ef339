"""services.shared.memory: the glibc mmap threshold is set when asked, left alone otherwise."""

from __future__ import annotations

import platform

import pytest

from services.shared.config import ConfigError
from services.shared.memory import set_arena_max, set_mmap_threshold


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
