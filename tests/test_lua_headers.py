"""Every Lua script's header says what the Python side passes: each ARGV position the
script reads is named in its header (once: record_usage.lua read ARGV 3 and 4 and 15 record
fields where its header named 2 and 13)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in ROOT.glob("services/*/lua/*.lua") if not p.name.startswith("_"))


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:].strip())
    return " ".join(lines)


def argv_section(text: str) -> str:
    found = re.search(r"(ARGV.*?)(?:Returns|KEYS|$)", text)
    assert found, "the header names no ARGV"
    return found.group(1)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_argv_position_a_script_reads_is_named_in_its_header(path: Path) -> None:
    body = path.read_text()
    used = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)}
    if not used and "ARGV" not in body:
        return
    named = {
        int(n) for n in re.findall(r"(?:^|[:,;]\s*|ARGV\[)(\d+)\b", argv_section(header(path)))
    }
    assert used <= named, f"reads ARGV {sorted(used - named)} that its header does not name"


def test_record_usage_header_names_the_record_fields_python_sends() -> None:
    from services.usage_svc.usage_types import RECORD_FIELDS

    text = header(ROOT / "services/usage_svc/lua/record_usage.lua")
    listed = text.split("(ids cannot contain '|'):", 1)[1].split("Returns", 1)[0]
    names = [re.sub(r"\s*\(.*?\)", "", n).strip() for n in listed.split(",")]
    assert names == list(RECORD_FIELDS)
    # and the script reads as many fields of a record as Python joins
    body = (ROOT / "services/usage_svc/lua/record_usage.lua").read_text()
    assert max(int(n) for n in re.findall(r"\br\[(\d+)\]", body)) == len(RECORD_FIELDS)
