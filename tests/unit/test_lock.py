"""constraints.txt (the dependency lock) is current: it pins every dependency pyproject.toml declares,
inside pyproject's range, and the dev venv `make install` built from it has exactly those versions."""

from importlib.metadata import PackageNotFoundError, version

from packaging.utils import canonicalize_name
from packaging.version import Version

from tools.lock_deps import LOCK, problems, project_requirements, read_lock


def test_lock_pins_every_pyproject_requirement_within_its_range():
    assert problems(read_lock(), project_requirements()) == []


def test_dev_venv_matches_the_lock():
    mismatched = {}
    for name, pinned in read_lock().items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            mismatched[name] = "not installed"
            continue
        if Version(installed.public) != pinned:  # torch 2.13.0+cpu is the lock's 2.13.0
            mismatched[name] = f"{installed} installed"
    assert mismatched == {}, f"venv differs from {LOCK.name}; run `make install` (or tools/lock_deps.py)"


def test_problems_names_missing_and_out_of_range_pins():
    from packaging.requirements import Requirement

    reqs = [Requirement("grpcio>=1.81"), Requirement("Foo_Bar>=2")]
    out = problems({canonicalize_name("grpcio"): Version("1.80.0")}, reqs)
    assert out == [
        "grpcio: pinned 1.80.0, pyproject.toml wants >=1.81",
        "Foo_Bar: in pyproject.toml but not pinned in constraints.txt",
    ]
