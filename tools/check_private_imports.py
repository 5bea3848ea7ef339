"""`make lint`: no module imports another module's private names (`from a.b import _c`) from this repo.

ruff's import-private-name (PLC2701, on in pyproject.toml) skips imports within one top-level package,
which is most of ours (services.router importing services.shared); this check covers them. A name
another module needs is public: drop its underscore.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"maas", "services", "tests", "bench", "tools", "triton_backends"}


def private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in FIRST_PARTY:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}")
    return found


def main() -> int:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    problems = [p for name in files.stdout.split() for p in private_imports(REPO / name)]
    print("\n".join(problems) or "no private imports", file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
