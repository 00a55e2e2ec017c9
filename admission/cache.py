"""The Redis cache of authority state: cold fills, the Watch push stream, periodic reconcile.

Theory of operation: a fill reads a snapshot (taken at Watch cursor S) and writes it with
apply_snapshot.lua; Watch events that arrive while a fill of their project is in flight are
buffered and replayed after it when their cursor is > S, so a fill never undoes a newer change.
Wallet writes are versioned (older versions never overwrite newer ones); held/uns are never
touched here. Events for projects nobody cached are ignored: a later fill reads them fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from importlib import resources
from typing import Any, Protocol, TypeAlias

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from admission import keys
from admission.authority import AuthorityClient, AuthorityRequestFailed
from admission.decision import QuotaKind
from admission.errors import REDIS_ERRORS, AuthorityUnavailable, redis_unreachable
from admission.metrics import AuthorityMetrics, authority_metrics
from creditservice.v1 import credit_pb2 as pb

log = logging.getLogger(__name__)

# Explicit aliases: where redis is not installed (the mypyc build environment) both sides are
# Any, and mypy would take a bare `A | B` of two Anys for a variable, not a type.
RedisClient: TypeAlias = Redis | RedisCluster

_WALLET_KEY = re.compile(
    r"^" + keys.PREFIX + r":\{" + keys.PREFIX + r"(\d+)\}:w:([a-z0-9][a-z0-9_-]{0,62})$"
)


def honour_cancellation() -> None:
    """Re-raise a cancellation that a library swallowed.

    redis-py 8.1 can turn the CancelledError of a command cut in half into a connection error
    and retry the command; the task then goes on with cancelling() > 0. Long-lived loops call
    this once per round so that cancel() still ends them.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def lua_source(name: str) -> str:
    """A script of admission/lua, read as package data."""
    return resources.files("admission").joinpath("lua", name).read_text(encoding="utf-8")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def quota_value(quota: pb.Quota) -> str:
    """The quota_defs encoding of a quota: "rate:limit:window_seconds" or "concurrency:limit:0"."""
    if quota.algorithm == pb.CONCURRENCY:
        return f"{QuotaKind.CONCURRENCY.value}:{quota.limit}:0"
    return f"{QuotaKind.RATE.value}:{quota.limit}:{quota.window_seconds}"


def wallet_args(wallet: pb.Wallet) -> list[int]:
    """snap ver state low od gu, the order apply_snapshot.lua and ack.lua take them in."""
    return [
        wallet.available,
        wallet.version,
        int(wallet.state),
        wallet.low_balance_threshold,
        wallet.overdraft_limit,
        wallet.grace_until_ms,
    ]


class SnapshotStore:
    """The Redis side: writes snapshots and quota entries of one project with one script call."""

    def __init__(self, redis: RedisClient, *, shards: int = keys.DEFAULT_SHARDS) -> None:
        self.redis = redis
        self.shards = shards
        self._script = redis.register_script(lua_source("apply_snapshot.lua"))

    def _keys(self, project_id: str) -> list[str]:
        shard = keys.shard_of(project_id, self.shards)
        return [keys.wallet(shard, project_id), keys.quota_defs(shard, project_id)]

    async def _call(self, project_id: str, args: list[Any]) -> tuple[bool, bool]:
        cached, written = await self._script(keys=self._keys(project_id), args=args)
        return bool(int(cached)), bool(int(written))

    async def fill(
        self, snapshot: pb.ProjectSnapshot, unsettled_limit: int | None, *, mode: str = "fill"
    ) -> bool:
        """Write a whole snapshot (creating the wallet when missing); True if the wallet changed.

        `unsettled_limit` None leaves unsl unset: admit.lua then uses the policy's limit.
        `mode` "repair" also rewrites a wallet of the same version (reconcile, lifecycle
        refresh); "reset" writes it whatever the cached version (resync).
        """
        pairs: list[Any] = []
        for quota in snapshot.quotas:
            pairs += [quota.name, quota_value(quota)]
        unsl = "" if unsettled_limit is None else unsettled_limit
        args = [mode, *wallet_args(snapshot.wallet), unsl]
        _, written = await self._call(snapshot.wallet.project_id, [*args, *pairs])
        return written

    async def apply_wallet(self, wallet: pb.Wallet) -> tuple[bool, bool]:
        """(cached, written): a newer wallet version for a cached project."""
        return await self._call(wallet.project_id, ["wallet", *wallet_args(wallet)])

    async def set_quota(self, quota: pb.Quota) -> bool:
        cached, _ = await self._call(quota.project_id, ["qset", quota.name, quota_value(quota)])
        return cached

    async def delete_quota(self, project_id: str, name: str) -> bool:
        cached, _ = await self._call(project_id, ["qdel", name])
        return cached

    async def is_cached(self, project_id: str) -> bool:
        return bool(await self.redis.exists(self._keys(project_id)[0]))

    async def has_snapshot(self, project_id: str) -> bool:
        """Whether the wallet holds a snapshot (what the scripts call not cold)."""
        return bool(await self.redis.hexists(self._keys(project_id)[0], keys.W_SNAPSHOT))

    async def read_wallet(self, project_id: str) -> dict[str, int] | None:
        raw = await self.redis.hgetall(self._keys(project_id)[0])
        if not raw:
            return None
        return {_text(k): int(_text(v)) for k, v in raw.items()}

    async def read_quotas(self, project_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self._keys(project_id)[1])
        return {_text(k): _text(v) for k, v in raw.items()}

    async def cached_projects(self) -> AsyncIterator[str]:
        """Every project with a wallet hash in Redis (SCAN on every node of a cluster)."""
        pattern = f"{keys.PREFIX}:{{{keys.PREFIX}*}}:w:*"
        seen: set[str] = set()
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            found = _WALLET_KEY.match(_text(key))
            if found and found.group(2) not in seen:
                seen.add(found.group(2))
                yield found.group(2)

    async def forget_api_keys(self) -> int:
        """Delete every cached API key mapping (resync: revocations may have been missed)."""
        deleted = 0
        async for key in self.redis.scan_iter(match=keys.api_key("*"), count=1000):
            deleted += int(await self.redis.delete(key))
        return deleted


# A number, a function of the wallet, or None for the engine's policy default (invariant 7).
UnsettledLimit: TypeAlias = int | Callable[[pb.Wallet], int] | None


RECORDING_LIMIT = 10_000


class _Recording:
    """Project events delivered during one authority call (CacheFiller.recording)."""

    __slots__ = ("events", "overflowed")

    def __init__(self) -> None:
        self.events: list[pb.WatchEvent] = []
        self.overflowed = False

    def add(self, event: pb.WatchEvent) -> None:
        if len(self.events) >= RECORDING_LIMIT:
            self.overflowed = True
            return
        self.events.append(event)


class CacheFiller:
    """Implements ports.SnapshotFiller: one authority call per project at a time per process."""

    def __init__(
        self,
        redis: RedisClient,
        authority: AuthorityClient,
        *,
        unsettled_limit: UnsettledLimit = None,
        shards: int = keys.DEFAULT_SHARDS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = SnapshotStore(redis, shards=shards)
        self.authority = authority
        self._unsettled_limit = unsettled_limit
        self._metrics = authority_metrics(registry)
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        # Told the project of every buffered event applied after a fill (the leases).
        self.project_listeners: tuple[Callable[[str], None], ...] = ()
        self._buffers: dict[str, list[pb.WatchEvent]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Open recordings (see recording()): every project event delivered meanwhile.
        self._recordings: list[_Recording] = []

    def unsettled_limit(self, wallet: pb.Wallet) -> int | None:
        limit = self._unsettled_limit
        return limit(wallet) if callable(limit) else limit

    async def fill(self, project_id: str) -> bool:
        """Fill the project's snapshot; False when the authority does not know the project."""
        return await self._single_flight(project_id, "fill")

    async def refresh(self, project_id: str, *, reset: bool = False) -> bool:
        """A fill that starts after every change seen so far (waits out a fill in flight).

        `reset` overwrites the cached wallet even when its version is higher (resync).
        """
        await self.filled(project_id)
        return await self._single_flight(project_id, "reset" if reset else "repair")

    async def _single_flight(self, project_id: str, mode: str) -> bool:
        fut = self._inflight.get(project_id)
        if fut is None:
            # Buffering starts before the authority call, so no event between the snapshot
            # read and its write slips past unapplied.
            self._buffers[project_id] = []
            fut = asyncio.ensure_future(self._fill(project_id, mode))
            self._inflight[project_id] = fut
            fut.add_done_callback(lambda f: self._done(project_id, f))
        else:
            self._metrics.cache_fills.labels(result="shared").inc()
        # A caller giving up (cancelled) must not cancel the fill others wait for.
        return await asyncio.shield(fut)

    def _done(self, project_id: str, fut: asyncio.Future[bool]) -> None:
        if self._inflight.get(project_id) is fut:
            del self._inflight[project_id]
        self._buffers.pop(project_id, None)
        if not fut.cancelled():
            fut.exception()  # retrieved here: every waiter may have been cancelled

    async def _fill(self, project_id: str, mode: str) -> bool:
        if mode == "fill" and await self.store.has_snapshot(project_id):
            # Landed since Redis answered cold: another gateway's fill, or a snapshot offered
            # with a key whose write ended just before this fill began.
            self._metrics.cache_fills.labels(result="landed").inc()
            await self._replay(project_id, -1)
            return True
        try:
            snapshot = await self.authority.get_snapshot(project_id)
        except AuthorityUnavailable:
            self._metrics.cache_fills.labels(result="unavailable").inc()
            raise
        except AuthorityRequestFailed as err:
            # e.g. a gateway token the authority refuses: to admission the authority is as
            # good as unreachable (ports.SnapshotFiller promises only AuthorityUnavailable).
            self._metrics.cache_fills.labels(result="error").inc()
            log.error("cache fill of %s refused by the authority: %s", project_id, err)
            raise AuthorityUnavailable(str(err)) from err
        if snapshot is None:
            self._metrics.cache_fills.labels(result="unknown").inc()
            return False
        await self.store.fill(snapshot, self.unsettled_limit(snapshot.wallet), mode=mode)
        self._metrics.cache_fills.labels(result="filled").inc()
        await self._replay(project_id, snapshot.cursor)
        return True

    @contextlib.contextmanager
    def recording(self) -> Iterator[_Recording]:
        """Records the project events the Watch delivers while the block runs.

        Around an authority call that returns a snapshot (a key resolution, see offer()): an
        event after the snapshot may arrive before the reply, when its project is not cached
        yet and so nothing applies it. At most RECORDING_LIMIT events are kept; past that
        the recording is marked overflowed and offer() ignores its snapshot.
        """
        recording = _Recording()
        self._recordings.append(recording)
        try:
            yield recording
        finally:
            self._recordings.remove(recording)

    async def offer(self, snapshot: pb.ProjectSnapshot, recording: _Recording) -> bool:
        """Fill the cache from a snapshot that came with another call (a key resolution), if
        the project is not cached yet: the first request of a new project then needs no
        GetAdmissionSnapshot call. True when the project is cached afterwards.

        The events recorded during that call (and any that arrive until the write is done)
        are applied after the snapshot when their cursor is above its cursor, as for a fill.
        A project with a fill in flight, or an overflowed recording, is left to the fill.
        """
        fut = self.offer_nowait(snapshot, recording)
        return False if fut is None else await asyncio.shield(fut)

    def offer_nowait(
        self, snapshot: pb.ProjectSnapshot, recording: _Recording
    ) -> asyncio.Future[bool] | None:
        """offer(), started and not waited for: its write is the project's fill in flight
        (a fill asked for meanwhile waits for it). None when there is nothing to offer."""
        project_id = snapshot.wallet.project_id
        if recording.overflowed or not project_id or project_id in self._inflight:
            return None
        # No await here: the recording ends where the buffer starts, so every event after the
        # snapshot is seen by one or the other.
        self._buffers[project_id] = [
            e for e in recording.events if (e.project_id or _event_project(e)) == project_id
        ]
        fut = asyncio.ensure_future(self._offered(snapshot))
        self._inflight[project_id] = fut
        fut.add_done_callback(lambda f: self._done(project_id, f))
        return fut

    async def filled(self, project_id: str) -> None:
        """Wait until no fill of the project is in flight (one started by offer_nowait, say)."""
        while (pending := self._inflight.get(project_id)) is not None:
            await asyncio.wait([pending])

    async def _offered(self, snapshot: pb.ProjectSnapshot) -> bool:
        project_id = snapshot.wallet.project_id
        try:
            await self.store.fill(snapshot, self.unsettled_limit(snapshot.wallet), mode="offer")
        except REDIS_ERRORS as err:
            self._metrics.cache_fills.labels(result="offer_failed").inc()
            if redis_unreachable(err):
                raise  # a fill's write would fail too, after an authority call
            # Refused (an error reply): the usual fill, still as this in-flight fill, so the
            # requests waiting for it and the event buffer carry over.
            log.warning("writing the snapshot offered for %s failed: %r", project_id, err)
            return await self._fill(project_id, "fill")
        self._metrics.cache_fills.labels(result="offered").inc()
        await self._replay(project_id, snapshot.cursor)
        return True

    async def _replay(self, project_id: str, after_cursor: int) -> None:
        while True:
            buffered = self._buffers.get(project_id)
            if not buffered:
                # No await between the check and the removal: the Watch task sees either the
                # buffer (and appends) or no buffer (and applies directly), never a gap.
                self._buffers.pop(project_id, None)
                return
            self._buffers[project_id] = []
            applied = False
            for event in buffered:
                if event.cursor > after_cursor:
                    await self._apply(event)
                    applied = True
            if applied:
                # As for an event applied at once: the leases decide nothing more from a
                # reply that may predate it (a sync can reach Redis between the snapshot's
                # write and this replay when the write was offered and not waited for).
                for listener in self.project_listeners:
                    listener(project_id)

    async def on_event(self, event: pb.WatchEvent) -> None:
        """Apply a project-scoped Watch event (wallet, quota, lifecycle) to Redis."""
        for recording in self._recordings:
            recording.add(event)
        buffer = self._buffers.get(event.project_id)
        if buffer is not None:
            buffer.append(event)
            return
        await self._apply(event)

    async def _apply(self, event: pb.WatchEvent) -> None:
        which = event.WhichOneof("change")
        if which == "wallet":
            await self.store.apply_wallet(event.wallet)
        elif which == "quota":
            quota = event.quota.quota
            project_id = quota.project_id or event.project_id
            if event.quota.deleted:
                await self.store.delete_quota(project_id, quota.name)
            else:
                await self.store.set_quota(quota)
        elif which == "lifecycle":
            # A lifecycle event carries no wallet version: re-read the wallet instead of
            # writing its state unversioned (which could undo a newer top-up).
            project_id = event.lifecycle.project_id or event.project_id
            if await self.store.is_cached(project_id):
                self.spawn(self.refresh(project_id), f"lifecycle refresh {project_id}")

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(lambda t: self._reap(t, what))

    def _reap(self, task: asyncio.Task[Any], what: str) -> None:
        self._background.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            log.warning("%s failed: %r", what, err)

    async def refresh_all(self, concurrency: int = 16, *, reset: bool = True) -> int:
        """Re-read every cached project from the authority (Watch resync). Returns the count."""
        limit = asyncio.Semaphore(concurrency)
        count = 0

        async def one(project_id: str) -> None:
            async with limit:
                await self.refresh(project_id, reset=reset)

        async with asyncio.TaskGroup() as group:
            async for project_id in self.store.cached_projects():
                group.create_task(one(project_id))
                count += 1
        return count

    async def aclose(self, fills_within_s: float = 2.0) -> None:
        # A snapshot write offered with a key outlives its request: let fills land first.
        if self._inflight:
            await asyncio.wait(set(self._inflight.values()), timeout=fills_within_s)
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class KeyCache(Protocol):
    """The local API key cache the Watch stream keeps honest (admission.identity)."""

    def evict(self, key_hash: str) -> None: ...

    def clear(self) -> None: ...

    def set_watch_connected(self, connected: bool) -> None: ...


_STREAM_ERRORS = (AuthorityUnavailable, AuthorityRequestFailed, RedisError, TimeoutError)


# The authority refused the gateway's credential: it will keep refusing until an operator sets
# the token, so reconnecting every second only fills the log.
_REFUSED_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


class WatchSubscriber:
    """Applies the authority's Watch stream to Redis until cancelled; reconnects from its cursor.

    Invariant 6: a change reaches Redis within one event of its push; reconnect backoff is
    capped at `backoff_max_s` (default 1 s) so an outage ends with a prompt catch-up. A refused
    credential (UNAUTHENTICATED, PERMISSION_DENIED) is retried with a backoff capped at
    `refused_backoff_max_s` instead, and each distinct refusal is logged once.
    """

    def __init__(
        self,
        filler: CacheFiller,
        *,
        key_caches: tuple[KeyCache, ...] = (),
        project_listeners: tuple[Callable[[str], None], ...] = (),
        start_cursor: int = 0,
        resync_on_start: bool = True,
        idle_timeout_s: float = 15.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 1.0,
        refused_backoff_max_s: float = 30.0,
        registry: CollectorRegistry | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.filler = filler
        self.store = filler.store
        self.authority = filler.authority
        self.key_caches = key_caches
        # Told the project id of every wallet, quota or lifecycle change once it is applied
        # to Redis (lease mode: a process stops deciding from what it last read).
        self.project_listeners = project_listeners
        self.resync_on_start = resync_on_start
        self.idle_timeout_s = idle_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.refused_backoff_max_s = refused_backoff_max_s
        self._sleep = sleep  # tests count the waits instead of waiting
        # The refusal last logged; cleared once the stream connects (a new refusal is news).
        self._refusal_logged: str | None = None
        # 0 = "from now on" until the first event says where we are; a caller that knows a
        # cursor (e.g. of a snapshot it just filled) passes it so nothing after it is missed.
        self.cursor = start_cursor
        self.connected = asyncio.Event()
        self.resyncs = 0
        self._metrics: AuthorityMetrics = authority_metrics(registry)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="creditgate-watch")

    async def aclose(self) -> None:
        # The flag ends the loop even if redis-py turns the cancellation of a command into a
        # connection error (it can), which the loop would otherwise take for an outage.
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_connected(self, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            await self.connected.wait()

    def _set_connected(self, connected: bool) -> None:
        if connected == self.connected.is_set():
            return
        if connected:
            self.connected.set()
        else:
            self.connected.clear()
        self._metrics.watch_connected.set(1 if connected else 0)
        for cache in self.key_caches:
            cache.set_watch_connected(connected)

    async def run(self) -> None:
        backoff = self.backoff_initial_s
        first = True
        try:
            while not self._stopping:
                cap = self.backoff_max_s
                try:
                    async for event in self._stream():
                        backoff = self.backoff_initial_s
                        if not self.connected.is_set():
                            self._set_connected(True)
                            self._connected_after_refusal()
                            if first and self.resync_on_start:
                                self.filler.spawn(self._resync("start"), "resync on start")
                            first = False
                        await self.handle(event)
                        honour_cancellation()
                    log.info("Watch stream ended by the authority; reconnecting")
                except AuthorityRequestFailed as err:
                    if err.code in _REFUSED_CODES:
                        cap = self.refused_backoff_max_s
                        self._log_refusal(err)
                    else:
                        log.warning("Watch stream interrupted at cursor %d: %r", self.cursor, err)
                except (AuthorityUnavailable, RedisError, TimeoutError) as err:
                    log.warning("Watch stream interrupted at cursor %d: %r", self.cursor, err)
                self._set_connected(False)
                if self._stopping:
                    return
                honour_cancellation()
                self._metrics.watch_reconnects.inc()
                # After refusals the backoff may be above a transient error's cap: min() again.
                delay = min(backoff, cap)
                await self._sleep(delay)
                backoff = min(delay * 2, cap)
        finally:
            self._set_connected(False)

    def _log_refusal(self, err: AuthorityRequestFailed) -> None:
        message = str(err)
        if message == self._refusal_logged:
            log.debug("Watch still refused: %s", message)
            return
        self._refusal_logged = message
        log.error(
            "Watch: the authority refused the gateway's token: set --token / "
            "CREDITGATE_ADMIN_TOKEN (GatewayConfig.authority_token) to the authority's admin "
            "token (%s). Until then cached wallets, quotas and key revocations are not updated; "
            "retrying with a backoff of up to %g s, logged again only if the error changes",
            message,
            self.refused_backoff_max_s,
        )

    def _connected_after_refusal(self) -> None:
        if self._refusal_logged is not None:
            self._refusal_logged = None
            log.info("Watch: the authority accepts the gateway's token now; stream connected")

    async def _stream(self) -> AsyncIterator[pb.WatchEvent]:
        stream = self.authority.watch(self.cursor)
        try:
            while True:
                # Heartbeats keep an idle stream talking; silence means a dead peer.
                async with asyncio.timeout(self.idle_timeout_s):
                    try:
                        event = await anext(stream)
                    except StopAsyncIteration:
                        return
                yield event
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def handle(self, event: pb.WatchEvent) -> None:
        """Apply one event; the cursor advances only after it is applied (resume replays it)."""
        which = event.WhichOneof("change") or "none"
        self._metrics.watch_events.labels(kind=which).inc()
        if which in ("wallet", "quota", "lifecycle"):
            await self.filler.on_event(event)
            for listener in self.project_listeners:
                listener(event.project_id or _event_project(event))
        elif which == "key_revoked":
            key_hash = event.key_revoked.key_hash
            # Local first: a lookup in flight then sees the eviction and does not write the
            # mapping back to Redis after our DEL.
            for cache in self.key_caches:
                cache.evict(key_hash)
            await self.store.redis.delete(keys.api_key(key_hash))
        elif which == "resync":
            log.warning("Watch asks for a resync: %s", event.resync.reason)
            self.filler.spawn(self._resync(event.resync.reason), "resync")
            # The authority's log restarts here (it may be behind our old cursor).
            self.cursor = event.cursor
            return
        self.cursor = max(self.cursor, event.cursor)

    async def _resync(self, why: str) -> None:
        # Revocations may have been missed: forget every cached key mapping, locally too.
        for cache in self.key_caches:
            cache.clear()
        await self.store.forget_api_keys()
        refreshed = await self.filler.refresh_all()
        self.resyncs += 1
        log.info("resync (%s): %d cached projects re-read", why, refreshed)


class Reconciler:
    """Periodically compares cached wallets and quotas with the authority and repairs drift."""

    def __init__(
        self,
        filler: CacheFiller,
        *,
        interval_s: float = 60.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.filler = filler
        self.store = filler.store
        self.interval_s = interval_s
        self._metrics = authority_metrics(registry)
        self._stopping = False

    def stop(self) -> None:
        """End run() after the current pass (then cancel its task: it may be sleeping)."""
        self._stopping = True

    async def run(self) -> None:
        while not self._stopping:
            honour_cancellation()
            await asyncio.sleep(self.interval_s)
            try:
                await self.run_once()
            except (AuthorityUnavailable, AuthorityRequestFailed, *REDIS_ERRORS) as err:
                honour_cancellation()
                log.warning("reconcile pass failed: %r", err)

    async def run_once(self) -> list[str]:
        """One pass over every cached project; returns the projects found stale (repaired)."""
        drifted: list[str] = []
        async for project_id in self.store.cached_projects():
            snapshot = await self.filler.authority.get_snapshot(project_id)
            if snapshot is None:
                log.warning("cached project %s is unknown to the authority", project_id)
                continue
            if await self._stale(project_id, snapshot):
                drifted.append(project_id)
                log.warning("cache drift on project %s: repairing", project_id)
                await self.filler.refresh(project_id)
        self._metrics.drift_projects.set(len(drifted))
        self._metrics.drift.inc(len(drifted))
        return drifted

    async def _stale(self, project_id: str, snapshot: pb.ProjectSnapshot) -> bool:
        cached = await self.store.read_wallet(project_id)
        if cached is None:
            return False
        w = snapshot.wallet
        if cached.get(keys.W_VERSION, -1) < w.version:
            return True
        if cached.get(keys.W_VERSION, -1) == w.version and (
            cached.get(keys.W_SNAPSHOT) != w.available or cached.get(keys.W_STATE) != int(w.state)
        ):
            return True
        quotas = {q.name: quota_value(q) for q in snapshot.quotas}
        return await self.store.read_quotas(project_id) != quotas


def _event_project(event: pb.WatchEvent) -> str:
    which = event.WhichOneof("change")
    if which == "wallet":
        return event.wallet.project_id
    if which == "quota":
        return event.quota.quota.project_id
    if which == "lifecycle":
        return event.lifecycle.project_id
    return ""
