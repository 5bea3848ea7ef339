"""The configuration table (docs/development.md) names every MAAS_* setting the code reads, and no other."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TABLE_DOC = REPO / "docs" / "development.md"
NAME = re.compile(r"MAAS_[A-Z0-9_]+")
# A setting in code: a string literal naming it (env("MAAS_X", ...), envvar="MAAS_X", env.get("MAAS_X")).
LITERAL = re.compile(r"""["'](MAAS_[A-Z0-9_]+)["']""")
# A family of settings: add_limit_arguments(parser, "MAAS_TOKENIZER", ...) reads MAAS_TOKENIZER_<FIELD>.
FAMILY = re.compile(r"""add_limit_arguments\(\s*\w+,\s*["'](MAAS_[A-Z0-9_]+)["']""")


def settings_in_code() -> tuple[set[str], set[str]]:
    names, families = set(), set()
    for root in ("services", "maas"):
        for path in (REPO / root).rglob("*.py"):
            if "v1" in path.relative_to(REPO).parts:
                continue
            text = path.read_text()
            families |= set(FAMILY.findall(text))
            names |= set(LITERAL.findall(text))
    return names - families, families


def table_rows() -> list[str]:
    text = TABLE_DOC.read_text()
    section = text.split("## Configuration", 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and "MAAS_" in line:
            rows.append(line)
    return rows


def documented() -> tuple[set[str], set[str]]:
    """(names, families written `MAAS_X_*`) in the table's env column and its other cells."""
    text = "\n".join(table_rows())
    families = set(re.findall(r"(MAAS_[A-Z0-9_]+?)_\*", text))
    names = set(NAME.findall(re.sub(r"MAAS_[A-Z0-9_]+?_\*", "", text)))
    return names, families


def test_every_setting_in_code_is_in_the_configuration_table():
    names, families = settings_in_code()
    doc_names, doc_families = documented()
    missing = sorted(n for n in names if n not in doc_names and not any(n.startswith(f + "_") for f in doc_families))
    assert not missing, f"add these to the configuration table in {TABLE_DOC.name}: {missing}"
    assert not sorted(families - doc_families), f"document these families as MAAS_X_*: {families - doc_families}"


def test_the_configuration_table_names_no_setting_the_code_lacks():
    names, families = settings_in_code()
    doc_names, doc_families = documented()
    stale = sorted(n for n in doc_names if n not in names and not any(n.startswith(f + "_") for f in families))
    assert not stale, f"the configuration table names settings no code reads: {stale}"
