"""Per-tick batching: operations queued in one event-loop tick go to Redis together.

The Redis call runs in a task of its own, so a cancelled caller cannot cut it off half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from admission.store import AdmitOp, AdmitResult, SettleOp, SettleResult, Store

OrphanHandler = Callable[[AdmitOp, AdmitResult], None]


class Batcher:
    """Queues operations per shard and flushes them all with one Store.run per tick.

    Theory of operation: the first operation of a tick creates the task that runs the batch.
    A new task's first step runs in a later loop iteration, so every caller that runs before it
    (e.g. the tasks of one gather, or the requests aiohttp dispatched in one loop iteration)
    joins the same batch; the task takes the queues when it starts. Callers await plain
    futures. A caller cancelled while waiting cancels only its future; when the batch returns
    an admitted hold for a cancelled future, `on_orphan` gets it so the engine can release the
    hold nobody will end.
    """

    def __init__(self, store: Store, on_orphan: OrphanHandler) -> None:
        self._store = store
        self._on_orphan = on_orphan
        self._admits: dict[int, list[tuple[AdmitOp, asyncio.Future[AdmitResult]]]] = {}
        self._settles: dict[int, list[tuple[SettleOp, asyncio.Future[SettleResult]]]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def admit(self, op: AdmitOp) -> asyncio.Future[AdmitResult]:
        fut: asyncio.Future[AdmitResult] = asyncio.get_running_loop().create_future()
        self._admits.setdefault(op.shard, []).append((op, fut))
        self._schedule()
        return fut

    def settle(self, op: SettleOp) -> asyncio.Future[SettleResult]:
        fut: asyncio.Future[SettleResult] = asyncio.get_running_loop().create_future()
        self._settles.setdefault(op.shard, []).append((op, fut))
        self._schedule()
        return fut

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    async def drain(self) -> None:
        """Wait until every batch handed to Redis has come back."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _schedule(self) -> None:
        # One task per tick, created at once: a call_soon hop before it would cost a loop
        # iteration per batch and batch nothing more.
        if not self._scheduled:
            self._scheduled = True
            task = asyncio.get_running_loop().create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        self._scheduled = False
        admits, self._admits = self._admits, {}
        settles, self._settles = self._settles, {}
        if not admits and not settles:
            return
        try:
            a_res, s_res = await self._store.run(
                {s: [op for op, _ in items] for s, items in admits.items()},
                {s: [op for op, _ in items] for s, items in settles.items()},
            )
        except BaseException as exc:
            # Not a Redis error (those come back as values): fail every waiter, then re-raise.
            for a_items in admits.values():
                for _, afut in a_items:
                    _fail(afut, exc)
            for s_items in settles.values():
                for _, sfut in s_items:
                    _fail(sfut, exc)
            raise
        for shard, a_items in admits.items():
            ares = a_res[shard]
            for i, (op, afut) in enumerate(a_items):
                if isinstance(ares, BaseException):
                    _fail(afut, ares)
                elif afut.cancelled():
                    if ares[i].hold_created:
                        self._on_orphan(op, ares[i])
                else:
                    afut.set_result(ares[i])
        for shard, s_items in settles.items():
            sres = s_res[shard]
            for i, (_, sfut) in enumerate(s_items):
                if isinstance(sres, BaseException):
                    _fail(sfut, sres)
                elif not sfut.done():
                    sfut.set_result(sres[i])


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if fut.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(exc)
        # A cancelled caller never retrieves it; mark it seen so asyncio does not log it.
        with contextlib.suppress(BaseException):
            fut.exception()
