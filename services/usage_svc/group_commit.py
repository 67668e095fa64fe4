"""Group commit: callers submit one item each and await its own answer; items that arrive
while a batch is being written wait for the next one, so under load batches grow by
themselves and at low load an item is written at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from services.common import tuning

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(self, write: Callable[[Sequence[T]], Awaitable[list[R]]]) -> None:
        self._write = write
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Future[None] | None = None

    async def submit(self, item: T) -> R:
        """Write `item` with whatever else is waiting; its own answer (or the batch's
        failure)."""
        waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, waiter))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_pending())
        return await waiter

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = (
                self._pending[: tuning.MAX_GROUP_COMMIT],
                self._pending[tuning.MAX_GROUP_COMMIT :],
            )
            # A caller that gave up while waiting (its deadline passed) is not written for:
            # no write happens after a handler's deadline.
            batch = [(item, waiter) for item, waiter in batch if not waiter.done()]
            if batch:
                await self._write_batch(batch)

    async def _write_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._write([item for item, _ in batch])
        except Exception as exc:  # every waiter of the batch sees the failure
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for (_, waiter), outcome in zip(batch, outcomes, strict=True):
            if not waiter.done():  # a waiter past its deadline has been cancelled
                waiter.set_result(outcome)
