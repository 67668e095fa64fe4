"""Generate the Python code and type stubs for protos/ into agentplane/ (one command).

The package path equals the folder path (protos/agentplane/usage/v1 → agentplane.usage.v1),
so generated imports need no rewriting. `--check` regenerates into a temporary folder and
fails when the committed code differs. googleapis' protos that ours import are vendored
under protos/google/ (so plain `buf lint` works); their Python code comes from the
googleapis-common-protos wheel, so only protos/agentplane is generated. `--vendor-check`
fails when the vendored copies differ from the wheel's.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.api
import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT_PACKAGE = "agentplane"
# Hand-written subpackages of `agentplane` (the SDK): kept apart from the generated code,
# left alone by `make protos` and by the drift check.
HANDWRITTEN = ["client", "worker", "cli", "channel_options.py"]
GOOGLEAPIS = Path(google.api.__path__[0]).parent.parent
WKT = Path(grpc_tools.__path__[0]) / "_proto"
VENDORED = [
    "google/api/annotations.proto", "google/api/http.proto", "google/api/httpbody.proto",
    "google/api/field_behavior.proto", "google/api/resource.proto", "google/rpc/status.proto",
]  # fmt: skip


def generate(out: Path) -> None:
    """Run protoc with the python, grpc and mypy-protobuf plugins into `out`."""
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / OUT_PACKAGE).rglob("*.proto"))
    plugin_dir = Path(sys.executable).parent
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTOS}", f"-I{GOOGLEAPIS}", f"-I{WKT}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        f"--mypy_out={out}", f"--mypy_grpc_out={out}",
        # With comments, for the gateway's OpenAPI descriptions.
        f"--descriptor_set_out={out / OUT_PACKAGE / 'descriptors.binpb'}",
        "--include_source_info", "--include_imports",
        *files,
    ]  # fmt: skip
    package = out / OUT_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, cwd=PROTOS, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"protoc failed:\n{done.stdout}{done.stderr}")
    for directory in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (package / "py.typed").touch()


def differences(left: Path, right: Path) -> list[str]:
    """Relative paths that differ between two generated trees."""
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__", *HANDWRITTEN])
    diffs: list[str] = []

    def walk(c: filecmp.dircmp[str], prefix: str) -> None:
        diffs.extend(prefix + n for n in c.left_only + c.right_only + c.diff_files)
        for name, sub in c.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(cmp, "")
    # dircmp compares shallowly by stat first; confirm byte equality for the rest.
    for path in left.rglob("*"):
        rel = path.relative_to(left)
        if rel.parts[0] in HANDWRITTEN:
            continue
        other = right / rel
        if path.is_file() and other.is_file() and path.read_bytes() != other.read_bytes():
            diffs.append(str(rel))
    return sorted(set(diffs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code drifted")
    parser.add_argument(
        "--vendor-check", action="store_true", help="fail if protos/google differs from the wheel"
    )
    args = parser.parse_args()
    if args.vendor_check:
        stale = [r for r in VENDORED if (PROTOS / r).read_bytes() != (GOOGLEAPIS / r).read_bytes()]
        if stale:
            print("vendored googleapis protos differ from the installed wheel:", *stale)
            return 1
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / OUT_PACKAGE
        committed = ROOT / OUT_PACKAGE
        if args.check:
            diffs = differences(fresh, committed) if committed.exists() else ["agentplane/"]
            if diffs:
                print("generated code is out of date; run `make protos`:", *diffs, sep="\n  ")
                return 1
            print("generated code matches protos/")
            return 0
        for name in HANDWRITTEN:  # carried over untouched
            if (committed / name).is_dir():
                shutil.copytree(committed / name, fresh / name)
            elif (committed / name).exists():
                shutil.copy2(committed / name, fresh / name)
        shutil.rmtree(committed, ignore_errors=True)
        shutil.copytree(fresh, committed)
        print(f"generated {sum(1 for _ in committed.rglob('*.py'))} modules into {committed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
