"""The house's layers hold (pyproject.toml [tool.importlinter]): generated code, then the
chassis, then the three services side by side, then the gateway; the SDK imports no
service code; no import cycles in the chassis, a service, the gateway, scripts or bench."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_are_kept() -> None:
    tool = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(tool)], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


HAND_WRITTEN = ["services", "gateway", "scripts", "bench", "examples",
                "agentplane/client", "agentplane/worker", "agentplane/cli"]  # fmt: skip


def _functions(blocks):  # type: ignore[no-untyped-def]
    """Every function radon found: methods and closures included."""
    for block in blocks:
        if hasattr(block, "methods"):  # a class
            yield from _functions(block.methods)
            yield from _functions(block.inner_classes)
        else:
            yield block
            yield from _functions(block.closures)


def test_no_hand_written_function_is_more_complex_than_12() -> None:
    """Cyclomatic complexity by radon (it counts boolean operators, as ruff's does not)."""
    from radon.complexity import cc_visit

    over = []
    for folder in HAND_WRITTEN:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for block in _functions(cc_visit(path.read_text())):
                if block.complexity > 12:
                    over.append(
                        f"{path.relative_to(ROOT)}:{block.lineno} {block.name} {block.complexity}"
                    )
    assert len(over) == 0, over


def test_store_calls_are_type_checked(tmp_path) -> None:
    """The Redis client is typed (a Protocol of the commands the stores use), so mypy
    catches a store that calls a command wrongly or misreads its reply (once the client
    was `Any`: nothing was checked)."""
    from mypy import api

    sample = tmp_path / "wrong_store.py"
    sample.write_text(
        "from services.common.redis import RedisClient\n\n\n"
        "async def wrong(redis: RedisClient) -> int:\n"
        "    found = await redis.hget('key')\n"  # a field is missing
        "    await redis.zadd('key', ['not', 'a', 'mapping'])\n"
        "    return await redis.get('key')\n"  # str | None is not int
    )
    out, _, status = api.run([str(sample), "--no-incremental", "--follow-imports=silent",
                              "--ignore-missing-imports", f"--config-file={ROOT / 'pyproject.toml'}"])  # fmt: skip
    assert status == 1, out
    assert 'Missing positional argument "key" in call to "hget"' in out, out
    assert 'Argument 2 to "zadd" of "RedisClient" has incompatible type' in out, out
    assert 'Incompatible return value type (got "str | None", expected "int")' in out, out
