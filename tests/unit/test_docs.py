"""The documentation a clone carries is whole: nothing points outside the project, every page it names
exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_no_reference_outside_the_project() -> None:
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "/work/" not in text, page.name


def test_named_pages_exist() -> None:
    assert (ROOT / "docs" / "architecture.md").is_file() and (ROOT / "docs" / "roadmap.md").is_file()
    for page in PAGES:
        for name in re.findall(r"`(?:docs/)?([a-z_-]+\.md)`", page.read_text()):
            assert (ROOT / "docs" / name).is_file() or (ROOT / name).is_file(), (page.name, name)
