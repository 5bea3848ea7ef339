"""Write or check constraints.txt: the one dependency lock used by the dev venv, the images and CI.

`python tools/lock_deps.py` freezes the resolution of the dev venv (`make install`) into pins;
`python tools/lock_deps.py --check` fails when pyproject.toml asks for a package the lock does not pin,
or pins it at a version outside pyproject's range (then: update the venv and re-run without --check).
Pins are constraints, not requirements: each consumer installs its own subset (services image: base
deps; Triton image: the backends' engines) and pip takes the locked version of whatever it needs, so
the resolver never backtracks (a clean resolve of the OpenTelemetry ranges did, for minutes).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
PROJECT = "maas-mesh"
HEADER = """\
# Dependency lock: `python tools/lock_deps.py` writes it from the dev venv's resolution (make install).
# Used as pip constraints (-c) by the Makefile, the Dockerfiles (make images) and CI; checked by
# tests/unit/test_lock.py. Local version labels (torch's +cpu) are dropped: ==2.13.0 matches them.
"""


def read_lock(path: Path = LOCK) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            pins[canonicalize_name(name)] = Version(ver)
    return pins


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    proj = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(proj["dependencies"])
    for extra in proj.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def problems(pins: dict[str, Version], reqs: list[Requirement]) -> list[str]:
    """Each pyproject requirement the lock does not pin, or pins outside its range."""
    out = []
    for r in reqs:
        v = pins.get(canonicalize_name(r.name))
        if v is None:
            out.append(f"{r.name}: in pyproject.toml but not pinned in {LOCK.name}")
        elif not r.specifier.contains(v, prereleases=True):
            out.append(f"{r.name}: pinned {v}, pyproject.toml wants {r.specifier}")
    return out


def freeze(python: str) -> str:
    lines = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    pins = []
    for line in lines:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^+\s]+)(\+\S+)?", line.strip())
        if m and canonicalize_name(m[1]) != PROJECT:
            pins.append(f"{m[1]}=={m[2]}")
    return HEADER + "\n".join(sorted(pins, key=str.lower)) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the lock against pyproject.toml")
    ap.add_argument("--python", default=str(REPO / ".venv/bin/python"), help="the venv to freeze")
    args = ap.parse_args()
    if not args.check:
        LOCK.write_text(freeze(args.python))
    bad = problems(read_lock(), project_requirements())
    for b in bad:
        print(b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
