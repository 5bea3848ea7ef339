"""`python -m bench`: the summary line of misses, and --strict's exit status."""

from __future__ import annotations

import sys
import types

import pytest

from bench.__main__ import main


@pytest.fixture
def fake_benchmarks(monkeypatch):
    def module(name: str, lines: list[str]) -> None:
        fake = types.ModuleType(f"bench.bench_{name}")
        fake.main = lambda: print("\n".join(lines))  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, f"bench.bench_{name}", fake)

    module("met", ["BENCH a_ratio 1.20 >= 0.8"])
    module("miss", ["BENCH b_ratio 0.50 >= 0.8", "BENCH c_ms 3.0 <= 5"])


def test_a_missed_target_fails_only_with_strict(fake_benchmarks, capsys):
    assert main(["met", "miss"]) == 0
    assert "== missed: b_ratio 0.50 >= 0.8\n" in capsys.readouterr().out
    assert main(["--strict", "met", "miss"]) == 1
    assert main(["--strict", "met"]) == 0
    assert "== missed: none\n" in capsys.readouterr().out
