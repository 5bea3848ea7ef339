"""Run every benchmark (or those named on the command line): `python -m bench [--strict] [tokenizer vision ...]`.

Each figure is a ratio or difference against a baseline measured in the same run, printed as
`BENCH <name> <value> <op> <target>`; a summary at the end says which targets were met, and one line
(`== missed: ...`) names the misses. The exit status is 1 when a benchmark failed, and with --strict
also when a target was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import pkgutil
import re
import sys
import traceback

import bench

# Long runs that `python -m bench` without names leaves out (`make soak` runs the soak).
ON_REQUEST = {"soak", "recovery"}
LINE = re.compile(r"^BENCH (\S+) (\S+) (<=|>=|<|>) (\S+)$")
OPS = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__, ">": float.__gt__}


class _Tee(io.TextIOBase):
    """Echo benchmark output live while keeping it to check the BENCH lines afterwards."""

    def __init__(self, out):
        self.out, self.buffer_text = out, []

    def write(self, text):
        self.out.write(text)
        self.out.flush()
        self.buffer_text.append(text)
        return len(text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run the benchmarks.")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all but soak and recovery)")
    args = parser.parse_args(argv)
    names = args.names or sorted(
        name
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name.startswith("bench_") and (name := m.name[len("bench_") :]) not in ON_REQUEST
    )
    tee, failed = _Tee(sys.stdout), []
    for name in names:
        print(f"== bench {name}", flush=True)
        try:
            with contextlib.redirect_stdout(tee):
                importlib.import_module(f"bench.bench_{name}").main()
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
    missed = []
    for line in "".join(tee.buffer_text).splitlines():
        match = LINE.match(line.strip())
        if match and not OPS[match[3]](float(match[2]), float(match[4])):
            missed.append(line.strip())
    print(f"== {len(names) - len(failed)} benchmarks ran; failed: {failed or 'none'}; targets missed: {len(missed)}")
    for line in missed:
        print(f"   missed: {line}")
    print(f"== missed: {'; '.join(_short(line) for line in missed) or 'none'}")
    return 1 if failed or (args.strict and missed) else 0


def _short(line: str) -> str:
    """`BENCH name value op target` → `name value op target`."""
    return line.removeprefix("BENCH ")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
