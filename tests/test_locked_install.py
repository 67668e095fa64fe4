"""Reproducible installs: `make run`, `make test` and CI install exactly what
requirements.lock says, so a newer release on the registry cannot break a fresh clone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def locked() -> dict[str, tuple[str, str | None, list[str]]]:
    """name → (version, marker, hashes) for every entry of the lock."""
    entries: dict[str, tuple[str, str | None, list[str]]] = {}
    for block in re.split(r"\n(?=[^\s#])", LOCK.read_text()):
        lines = [ln.strip().rstrip("\\").strip() for ln in block.splitlines()]
        head = lines[0]
        if not head or head.startswith("#"):
            continue
        spec, _, marker = head.partition(";")
        name, sep, version = spec.strip().partition("==")
        assert sep, f"{head!r} is not pinned to one version"
        hashes = [ln.removeprefix("--hash=") for ln in lines if ln.startswith("--hash=")]
        entries[canonicalize_name(name)] = (version, marker.strip() or None, hashes)
    return entries


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(n) for n in names]


def test_the_lock_pins_every_dependency_to_one_version_with_hashes() -> None:
    lock = locked()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is in pyproject.toml but not in requirements.lock"
        version = lock[name][0]
        assert req.specifier.contains(version, prereleases=True), (req, version)
    for name, (version, _, hashes) in lock.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), (name, version)
        assert hashes and all(h.startswith("sha256:") for h in hashes), name


def test_this_environment_is_the_lock() -> None:
    """What the suite runs on was installed from the lock (the Makefile's only install)."""
    wrong = []
    for name, (version, marker, _) in locked().items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed, locked {version}")
            continue
        if Version(installed) != Version(version):
            wrong.append(f"{name}: {installed} installed, locked {version}")
    assert not wrong, wrong


def test_runtime_minimums_are_no_lower_than_what_generated_the_code() -> None:
    """Generated code refuses to import on an older grpcio or protobuf than made it."""
    grpc_file = next((ROOT / "agentplane").rglob("*_pb2_grpc.py")).read_text()
    grpc_made = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_file)[1])
    pb_file = next((ROOT / "agentplane").rglob("*_pb2.py")).read_text()
    pb_made = Version(re.search(r"Protobuf Python Version: (\S+)", pb_file)[1])
    minimums = {
        canonicalize_name(r.name): min(
            (Version(s.version) for s in r.specifier if s.operator in (">=", "==")),
            default=None,
        )
        for r in declared()
    }
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-status"):
        assert minimums[name] is not None and minimums[name] >= grpc_made, (name, grpc_made)
    assert minimums["protobuf"] is not None and minimums["protobuf"] >= pb_made
    assert Version(locked()["grpcio-tools"][0]) == grpc_made, "regenerate: make protos"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_fresh_clone_installs_the_lock_and_its_generated_code_matches(tmp_path) -> None:
    """The tracked files alone, in a new folder: the Makefile's install brings exactly the
    locked versions (whatever newer ones the registry serves today), then the drift check
    regenerates the code with the locked generator and finds no difference."""
    clone = tmp_path / "clone"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / rel)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    python = shutil.which("python3", path=os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p
    ))  # fmt: skip
    assert python, "no python3 outside the project's venv"
    env["PATH"] = f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}"
    for target in (".venv/.installed", "protos-check"):
        done = subprocess.run(
            ["make", target], cwd=clone, env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"make {target}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    freeze = subprocess.run(
        [str(clone / ".venv/bin/python"), "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    got = {
        canonicalize_name(n): v
        for n, _, v in (ln.partition("==") for ln in freeze.splitlines() if "==" in ln)
    }
    for name, (version, marker, _) in locked().items():
        if marker and not Marker(marker).evaluate():
            continue
        assert got.get(name) == version, (name, got.get(name), version)
