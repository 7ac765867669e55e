"""The repository stands alone: its code and documents cite only what it contains."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Notes that are not part of the repository; nothing in it may send a reader there.
_OUTSIDE = re.compile(r"\b(CONTRACT|DESIGN|STYLE)\.md\b|\.\./shared\b")
_TEXT = (".py", ".md", ".sql", ".toml", ".ini", ".txt", ".json", ".yml", ".service", "")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return [ROOT / line for line in out.splitlines() if line]


def test_no_file_cites_notes_outside_the_repository() -> None:
    offenders = []
    for path in _tracked():
        if path.suffix not in _TEXT or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line) and path.name != "test_repository.py":
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert offenders == []


def test_every_relative_link_in_the_documents_resolves() -> None:
    broken = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in _LINK.findall(path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_readme_links_every_document() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"docs/{doc.name}" for doc in sorted((ROOT / "docs").glob("*.md"))
        if f"(docs/{doc.name})" not in readme
    ]
    assert missing == []
