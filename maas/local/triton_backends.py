"""Assemble Triton's backend directory: the pytriton wheel's Python backend plus ours (triton_backends/).

One place for both users of it: LocalTriton (a work dir per run) and the CPU Triton image, which runs
this file as a script at build time (`python maas/local/triton_backends.py DEST`) because its root is
read-only at run time. Standard library only, so the image needs no part of the maas package.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class BackendsError(RuntimeError):
    pass


def wheel_paths() -> tuple[Path, Path]:
    """(pytriton/tritonserver dir, nvidia_pytriton.libs dir) without importing pytriton (slow)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendsError("nvidia-pytriton is not installed (it ships tritonserver)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    return pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"


def assemble_backends(server_dir: Path, backends: Path, source: Path) -> Path:
    """<backends>/{python,onnxruntime,pytorch,...,common}: the Python backend + ours from `source`."""
    shutil.rmtree(backends, ignore_errors=True)
    python = backends / "python"
    python.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(server_dir / "backends" / "python" / f, python / f)
    # The stub must match this interpreter's Python version.
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.exists():
        raise BackendsError(f"no Triton Python backend stub for Python {ver} in the pytriton wheel")
    shutil.copy2(stub, python / stub.name)
    for src in source.iterdir():
        if src.is_dir() and not src.name.startswith(("_", ".")):
            shutil.copytree(src, backends / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    return backends


if __name__ == "__main__":
    dest = Path(sys.argv[1])
    source = Path(sys.argv[2]) if len(sys.argv) > 2 else REPO / "triton_backends"
    print(assemble_backends(wheel_paths()[0], dest, source))
