"""The README's and the manual's commands work when pasted into a script: no shell aliases (they vanish
inside scripts and `timeout`), the token on every call that needs one, no dates written
out that go stale, and every relative link points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(text: str) -> list[str]:
    """Each command of the bash blocks, continuation lines joined."""
    found: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        found += [line.strip() for line in joined.splitlines() if line.strip()]
    return found


def needs_token(command: str) -> bool:
    if command.startswith("grpcurl"):
        return not re.search(r" list\b|grpc\.health\.v1", command)
    if command.startswith("curl"):
        return "localhost:8080/api/" in command
    if command.startswith(".venv/bin/buf curl"):
        return "--list-services" not in command
    return False


def test_the_commands_of_the_readme_and_the_manual_run_as_pasted() -> None:
    lines = [c for doc in DOCS for c in commands(doc.read_text())]
    assert len(lines) > 40
    assert not [c for c in lines if c.startswith("alias ")]
    missing = [c for c in lines if needs_token(c) and "authorization: Bearer" not in c]
    assert not missing, missing
    stale = [c for c in lines if re.search(r"\b20\d\d-\d\d-\d\dT", c)]
    assert not stale, stale


def test_the_readme_is_a_front_page() -> None:
    """What it is, the two commands, a tour and links: the manual lives in docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make run" in text and "make test" in text
    linked = set(re.findall(r"\]\(docs/([^)#]+)", text))
    manual = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert manual <= linked, manual - linked  # every page of the manual is reachable


def test_every_relative_link_resolves() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL, not a file of ours
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert not broken, broken
