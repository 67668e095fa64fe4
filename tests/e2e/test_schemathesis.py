"""A bounded schemathesis run against the gateway's own /openapi.json: no 5xx, and no
response that violates the schema. Loopback only; a fixed number of examples per route."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import ADMIN_TOKEN
from tests.helpers.servers import serve_gateway

ST = Path(sys.executable).parent / "st"


@pytest.mark.timeout(300)
async def test_schemathesis_finds_no_server_errors_or_schema_violations(cluster) -> None:
    if cluster.redis_cluster:
        pytest.skip("one run (standalone Redis) is enough for the HTTP contract")
    if not ST.exists() and not shutil.which("st"):
        pytest.fail("schemathesis is not installed (part of the dev extra)")
    async with serve_gateway(cluster) as url:
        process = await asyncio.create_subprocess_exec(
            str(ST) if ST.exists() else "st", "run", f"{url}/openapi.json",
            "--max-examples", "8", "--workers", "1", "--request-timeout", "5",
            "--checks", "not_a_server_error,response_schema_conformance",
            "--phases", "examples,fuzzing", "--seed", "20261125",
            "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), 280)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-8000:]
