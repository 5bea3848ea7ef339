"""Any build of the package ships the generated stubs (maas.v1): setup.py runs tools/gen_stubs.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def test_a_wheel_built_from_the_sources_alone_ships_maas_v1(tmp_path):
    # Only what git tracks (no generated maas/v1 in it), as in a fresh clone or an sdist.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    assert not (src / "maas" / "v1").exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("maas_mesh-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for proto in (REPO / "protos" / "maas" / "v1").glob("*.proto"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert f"maas/v1/{proto.stem}{suffix}" in names, sorted(n for n in names if n.startswith("maas/"))
    assert "maas/v1/__init__.py" in names


def test_the_build_generates_with_the_locked_grpcio_tools():
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    (tools,) = [Requirement(r) for r in build if Requirement(r).name == "grpcio-tools"]
    locked = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("grpcio-tools==")]
    assert [f"grpcio-tools{tools.specifier}"] == locked
