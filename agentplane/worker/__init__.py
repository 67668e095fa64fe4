"""Run an agent: its inbox, a handler per message, acknowledgements, WORKING/IDLE.

    async def handle(message: thread_pb2.Message) -> None: ...
    Worker(agent_id, handle, token=AGENT_TOKEN).run_forever()   # until SIGTERM / Ctrl-C

- receives the agent's inbox (`ReceiveMessages`, consumer `consumer`) and calls `handler`
  for each message, at most `concurrency` at once;
- acknowledges a message when its handler returns; when it raises, the message is not
  acknowledged and comes again (the worker reopens its stream, which delivers pending
  messages first) — after `max_attempts` deliveries it is acknowledged and handed to
  `dead_letter` (by default: logged; `dead_letter_thread` posts it there as an operator
  message, which needs a manager's token);
- marks the agent WORKING while any handler runs and IDLE when none does
  (`StartTask`/`CompleteTask`, which an agent's own token may call on itself);
- receives nothing while the agent is PAUSED (the service holds deliveries back);
- reconnects with backoff when a service restarts or is unreachable;
- stops cleanly: on SIGTERM/SIGINT (`run_forever`) or when `stop` is set, it stops
  receiving, lets running handlers finish, marks the agent IDLE and returns.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.client._client import AgentplaneClient, new_key
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T

log = logging.getLogger("agentplane.worker")
Handler = Callable[[thread_pb2.Message], Awaitable[None]]
DeadLetter = Callable[[thread_pb2.Message, BaseException], Awaitable[None]]


class Worker:
    def __init__(
        self, agent_id: str, handler: Handler, *, token: str | None = None,
        client: AgentplaneClient | None = None, consumer: str = "default",
        concurrency: int = 4, max_attempts: int = 3, dead_letter: DeadLetter | None = None,
        dead_letter_thread: str = "", **client_options: Any,
    ) -> None:  # fmt: skip
        self.agent_id = agent_id
        self.handler = handler
        self.client = client or AgentplaneClient(token=token, **client_options)
        self.consumer = consumer
        self.max_attempts = max_attempts
        self.dead_letter = dead_letter or self._post_dead_letter
        self.dead_letter_thread = dead_letter_thread
        self.handled = 0  # messages acknowledged after their handler returned
        self.dead = 0  # messages given up after max_attempts
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._reopen = asyncio.Event()  # a handler failed: read the pending ones again
        self._task_lock = asyncio.Lock()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve the inbox until `stop` is set."""
        stop = stop or asyncio.Event()
        backoff = 0
        while not stop.is_set():
            try:
                await self._serve(stop)
                backoff = 0
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.NOT_FOUND,
                ):
                    raise  # a retry cannot fix these  # fmt: skip
                wait = self.client.retry.wait_s(backoff)
                backoff = min(backoff + 1, 8)
                log.warning("inbox stream ended (%s); reconnecting in %.1fs", exc.code().name, wait)
                await _sleep_or_stop(stop, wait)
        await self._drain()

    def run_forever(self) -> None:
        """`run` until SIGTERM or SIGINT, then stop cleanly (the process exits 0)."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                await self.run(stop)
            finally:
                await self.client.close()

        asyncio.run(main())

    async def _serve(self, stop: asyncio.Event) -> None:
        """One inbox stream, until stop, a failed handler (reopen) or the stream's end."""
        self._reopen.clear()
        stream = self.client.threads.ReceiveMessages(
            T.ReceiveMessagesRequest(agent_id=self.agent_id, consumer=self.consumer),
            metadata=self.client.metadata,
        )
        reader = asyncio.ensure_future(stream.read())
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._reopen.wait())]
        try:
            while True:
                done, _ = await asyncio.wait([reader, *waits], return_when=asyncio.FIRST_COMPLETED)
                if reader not in done:
                    return  # stopping, or reopening after a failure
                delivery = reader.result()
                if delivery is grpc.aio.EOF:
                    return
                await self._slots.acquire()
                task = asyncio.ensure_future(self._handle(delivery))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                reader = asyncio.ensure_future(stream.read())
        finally:
            for pending in (reader, *waits):
                pending.cancel()
            stream.cancel()
            if self._reopen.is_set():
                await self._drain()  # the failed one is pending again: let the rest finish

    async def _handle(self, delivery: T.ReceiveMessagesResponse) -> None:
        try:
            await self._working(+1)
            try:
                await self.handler(delivery.message)
            except Exception as exc:  # the handler's failure: redeliver, or give up
                if delivery.delivery_count < self.max_attempts:
                    log.warning(
                        "handler failed on message %s (attempt %d of %d): %s: %s",
                        delivery.message.id, delivery.delivery_count, self.max_attempts,
                        type(exc).__name__, exc, exc_info=exc,
                    )  # fmt: skip
                    self._reopen.set()
                    return
                await self.dead_letter(delivery.message, exc)
                self.dead += 1
            else:
                self.handled += 1
            await self.client.call(
                self.client.threads.AckMessages,
                T.AckMessagesRequest(agent_id=self.agent_id, ack_ids=[delivery.ack_id]),
            )
        finally:
            await self._working(-1)
            self._slots.release()

    async def _working(self, change: int) -> None:
        """WORKING while any handler runs, IDLE when none does."""
        async with self._task_lock:
            self._busy += change
            try:
                if change > 0 and self._busy == 1:
                    await self.client.call(self.client.agents.StartTask, A.StartTaskRequest(
                        agent_id=self.agent_id, task="handling inbox messages"))  # fmt: skip
                elif change < 0 and self._busy == 0:
                    done = A.CompleteTaskRequest(agent_id=self.agent_id)
                    await self.client.call(self.client.agents.CompleteTask, done)
            except grpc.aio.AioRpcError as exc:  # e.g. PAUSED meanwhile: bookkeeping only
                log.info("status not changed: %s", exc.details())

    async def _drain(self) -> None:
        if self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def _post_dead_letter(self, message: thread_pb2.Message, error: BaseException) -> None:
        log.error(
            "giving up on message %s after %d attempts: %s: %s",
            message.id, self.max_attempts, type(error).__name__, error, exc_info=error,
        )  # fmt: skip
        if self.dead_letter_thread:
            payload = {"message_id": message.id, "thread_id": message.thread_id,
                       "error": str(error)}  # fmt: skip
            request = T.InjectMessageRequest(
                to=self.agent_id, thread_id=self.dead_letter_thread,
                payload_type="dead_letter", request_id=new_key(),
            )  # fmt: skip
            request.payload.update(payload)
            await self.client.call(self.client.threads.InjectMessage, request)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
