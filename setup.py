"""The package build's one hook: generate the maas.v1 stubs (tools/gen_stubs.py) so every install ships
them. Everything else is in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        sys.path.insert(0, str(ROOT / "tools"))
        from gen_stubs import generate

        # An editable install imports maas from the source tree: the stubs go there.
        generate(ROOT if self.editable_mode else Path(self.build_lib), ROOT)


setup(cmdclass={"build_py": BuildPyWithStubs})
