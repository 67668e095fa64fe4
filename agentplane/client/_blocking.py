"""The blocking twin of AgentplaneClient, for code without an event loop: the same
options and behaviour (retries, idempotency keys, the guard, batching); each call blocks.
It runs an AgentplaneClient on an event loop of its own, in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from agentplane.client._client import AgentplaneClient, BudgetGuard

Result = TypeVar("Result")


class Client:
    """`with Client(token=...) as client: client.agents.GetAgent(request)`. Stubs are
    `agents`, `threads`, `usage_service` (every RPC, typed by its request); `budget.guard`
    is a plain context manager; `usage.record()` buffers like the async client's."""

    def __init__(self, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="agentplane-client", daemon=True
        )
        self._thread.start()
        self.aio = AgentplaneClient(**options)  # channels open on first use, in its loop
        self.agents = _Stub(self, "agents")
        self.threads = _Stub(self, "threads")
        self.usage_service = _Stub(self, "usage_service")
        self.budget = _Budget(self)
        self.usage = _Usage(self)

    def run(self, work: Coroutine[Any, Any, Result]) -> Result:
        """Run a coroutine on the client's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def close(self) -> None:
        """Send what is buffered, close the channels, stop the loop's thread."""
        if self._loop.is_running():
            self.run(self.aio.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()


class _Stub:
    def __init__(self, client: Client, stub: str) -> None:
        self._client, self._stub = client, stub

    def __getattr__(self, rpc: str) -> Callable[[Any], Any]:
        client = self._client

        def call(request: Any) -> Any:
            async def invoke() -> Any:
                method = getattr(getattr(client.aio, self._stub), rpc)
                return await client.aio.call(method, request)

            return client.run(invoke())

        return call


class _Budget:
    def __init__(self, client: Client) -> None:
        self._client = client

    def guard(self, thread_id: str, **options: Any) -> _Guard:
        return _Guard(self._client, self._client.aio.budget.guard(thread_id, **options))


class _Guard:
    def __init__(self, client: Client, guard: BudgetGuard) -> None:
        self._client, self.guard = client, guard

    def record(self, **usage: Any) -> None:
        self.guard.record(**usage)

    def __enter__(self) -> _Guard:
        self._client.run(self.guard.__aenter__())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:  # fmt: skip
        self._client.run(self.guard.__aexit__(kind, error, trace))


class _Usage:
    def __init__(self, client: Client) -> None:
        self._client = client

    def record(self, **fields: Any) -> str:
        async def buffer() -> str:
            return self._client.aio.usage.record(**fields)

        return self._client.run(buffer())

    def flush(self) -> None:
        self._client.run(self._client.aio.usage.flush())

    @property
    def sent(self) -> int:
        return self._client.aio.usage.sent
