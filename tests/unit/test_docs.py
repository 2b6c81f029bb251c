"""The docs name only what exists: every source path cited in docs/*.md and the
README is a file of the tree, and every module docs/architecture.md names
(``name.py``) is one of the repository's (the architecture page stays true when
modules move)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
CITED_PATH = re.compile(r"(?<![\w/.])((?:imafs|scripts|tests)/[\w/]+\.py)")
CITED_MODULE = re.compile(r"(?<![\w/.])(\w+\.py)\b")


def _modules() -> set[str]:
    return {p.name for top in ("imafs", "scripts", "tests") for p in (REPO / top).rglob("*.py")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cited_paths_exist(page):
    missing = sorted({m for m in CITED_PATH.findall(page.read_text())
                      if not (REPO / m).is_file()})
    assert not missing, f"{page.name} cites files that do not exist: {missing}"


def test_architecture_names_existing_modules():
    known = _modules()
    text = (REPO / "docs" / "architecture.md").read_text()
    # kernel source files (ima_main.c, ...) are .c; a .py name must be one of ours
    missing = sorted({m for m in CITED_MODULE.findall(text) if m not in known})
    assert not missing, f"architecture.md names modules that do not exist: {missing}"
