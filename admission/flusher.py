"""The flusher: settles the outbox streams with the authority, then acknowledges, exactly once.

Cycle: read (own pending first, reclaimed, then new) -> Settle -> ack.lua per shard. Nothing is
acknowledged before the authority answered; a crash in between re-sends, the authority dedups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from admission import keys
from admission.authority import AuthorityClient, AuthorityRequestFailed
from admission.cache import RedisClient, honour_cancellation, lua_source, wallet_args
from admission.errors import REDIS_ERRORS, AuthorityUnavailable
from admission.metrics import authority_metrics
from creditservice.v1 import credit_pb2 as pb

log = logging.getLogger(__name__)

_KINDS = {"COMMIT": pb.COMMIT, "RELEASE": pb.RELEASE, "EXPIRE": pb.EXPIRE}
_ACKED = (pb.APPLIED, pb.DUPLICATE, pb.REJECTED)
_STATUS_LABEL = {pb.APPLIED: "applied", pb.DUPLICATE: "duplicate", pb.REJECTED: "rejected"}
MAX_BATCH = 10_000  # the authority's limit per Settle
_CLUSTER_POLL_MS = 100  # Redis Cluster: how often an idle flusher looks for new entries


class Sweeper(Protocol):
    """What the flusher needs of the engine to end forgotten holds (AdmissionEngine)."""

    async def sweep_expired(self, limit: int = 1000) -> int: ...


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    shard: int
    entry_id: str
    event: pb.SettlementEvent

    @property
    def uns_amount(self) -> int:
        """What this entry added to the wallet's uns (COMMIT amount), to take off on ack."""
        return self.event.amount if self.event.kind == pb.COMMIT else 0


@dataclass(slots=True)
class Batch:
    entries: list[OutboxEntry] = field(default_factory=list)
    gone: list[tuple[int, str]] = field(default_factory=list)  # pending, payload deleted

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def events(self) -> list[pb.SettlementEvent]:
        return [e.event for e in self.entries]


@dataclass(frozen=True, slots=True)
class AckReport:
    acked: int = 0  # entries whose XACK returned 1 (here, not by a racing flusher)
    unsettled_released: int = 0  # taken off the wallets' uns
    wallets_written: int = 0
    rejected: int = 0
    left_pending: int = 0  # results the authority did not give (stay pending, re-sent)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def parse_entry(shard: int, entry_id: str, fields: dict[Any, Any]) -> OutboxEntry:
    """An outbox entry as written by settle.lua or lease.lua; ValueError/KeyError when malformed.

    `quantity` is the entry's `n` as written (lease EXPIRE events: 0), 1 when it has none.
    """
    try:
        # Replies are bytes on the gateway's client: no per-field type dispatch.
        f = {k.decode(): v.decode() for k, v in fields.items()}
    except AttributeError:  # str already (a client with decode_responses)
        f = {_text(k): _text(v) for k, v in fields.items()}
    event = pb.SettlementEvent(
        event_id=f[keys.E_EVENT_ID],
        kind=_KINDS[f[keys.E_KIND]],
        project_id=f[keys.E_PROJECT],
        hold_id=f.get(keys.E_HOLD_ID, ""),
        held_amount=int(f.get(keys.E_HELD, "0")),
        amount=int(f.get(keys.E_AMOUNT, "0")),
        meter=f.get(keys.E_METER, ""),
        route=f.get(keys.E_ROUTE, ""),
        occurred_at_ms=int(f.get(keys.E_TIME_MS, "0")),
        gateway_id=f.get(keys.E_GATEWAY, ""),
        quantity=int(f.get(keys.E_QUANTITY, "1")),
    )
    return OutboxEntry(shard=shard, entry_id=entry_id, event=event)


def _stream_entries(reply: Any) -> Iterable[tuple[str, list[Any]]]:
    """(stream name, entries) from an XREADGROUP reply, RESP2 (list) or RESP3 (dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [
            (_text(name), list(value[0] if value and isinstance(value[0], list) else value))
            for name, value in reply.items()
        ]
    return [(_text(name), list(entries)) for name, entries in reply]


_Take = Callable[[Iterable[OutboxEntry]], None]


class Flusher:
    """Consumer of keys.OUTBOX_GROUP on every shard's outbox; one per process is enough.

    Several flushers (processes, nodes) may run: the consumer group splits the entries, and a
    dead one's entries are reclaimed with XAUTOCLAIM after `claim_idle_ms`. When given an
    engine (`sweeper`), it also runs the hold-expiry sweeper loop. After a part batch,
    run() waits `linger_ms` before the next read (bigger, cheaper batches; 0 turns it off).
    """

    def __init__(
        self,
        redis: RedisClient,
        authority: AuthorityClient,
        *,
        shards: int = keys.DEFAULT_SHARDS,
        gateway_id: str,
        batch_size: int = 1000,
        block_ms: int = 100,
        claim_idle_ms: int = 30_000,
        poison_deliveries: int = 10,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        observe_interval_s: float = 5.0,
        sweeper: Sweeper | None = None,
        sweep_interval_ms: int = 1000,
        registry: CollectorRegistry | None = None,
        linger_ms: int = 50,
        waiter: RedisClient | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}, got {batch_size}")
        self.redis = redis
        self.authority = authority
        self.shards = shards
        self.consumer = f"{gateway_id}-{os.getpid()}"
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.poison_deliveries = poison_deliveries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.observe_interval_s = observe_interval_s
        self.sweeper = sweeper
        self.sweep_interval_ms = sweep_interval_ms
        self._ack = redis.register_script(lua_source("ack.lua"))
        self._metrics = authority_metrics(registry)
        self._groups_ready = False
        # Shards whose own pending entries must be read again (start, or after a failure),
        # with the id to continue after.
        self._replay_from: dict[int, str] = {s: "0" for s in range(shards)}
        self._claim_from: dict[int, str] = {s: "0-0" for s in range(shards)}
        self._next_claim = 0.0
        self._rotation = 0
        self._carry: list[OutboxEntry] = []
        # Entries the authority refuses as malformed: kept pending (never silently dropped),
        # left out of batches so they cannot block the others.
        self.poisoned: set[tuple[int, str]] = set()
        self._stopping = asyncio.Event()
        self._shard_by_stream = {keys.outbox(s): s for s in range(shards)}
        self.linger_ms = linger_ms
        # The idle wait (XREADGROUP BLOCK block_ms) runs on `waiter` when given: a client
        # whose socket timeout outlasts the block, so an idle flusher wakes seldom.
        self.waiter = waiter if waiter is not None else redis

    # ---------------------------------------------------------------- setup

    def _after_redis_error(self, err: BaseException) -> None:
        """A Redis that lost its data (restarted without persistence, flushed) answers NOGROUP:
        the streams and the consumer group are made again before the next read, or nothing
        would ever settle again."""
        if isinstance(err, ResponseError) and "NOGROUP" in str(err):
            log.error("outbox consumer group missing (Redis lost its data?): creating it again")
            self._groups_ready = False
            self._replay_from = {s: "0" for s in range(self.shards)}
            self._claim_from = {s: "0-0" for s in range(self.shards)}
            self.poisoned.clear()  # ids of the lost streams

    async def ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for shard in range(self.shards):
            try:
                await self.redis.xgroup_create(
                    keys.outbox(shard), keys.OUTBOX_GROUP, id="0", mkstream=True
                )
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise
        self._groups_ready = True

    # ---------------------------------------------------------------- read

    async def read_batch(self, *, block: bool = False) -> Batch:
        """Up to batch_size entries: own pending first, then reclaimed, then new ones."""
        await self.ensure_groups()
        batch = Batch()
        seen: set[tuple[int, str]] = set()

        def take(entries: Iterable[OutboxEntry]) -> None:
            for entry in entries:
                ident = (entry.shard, entry.entry_id)
                if ident in seen or ident in self.poisoned:
                    continue
                seen.add(ident)
                if len(batch) < self.batch_size:
                    batch.entries.append(entry)
                else:
                    self._carry.append(entry)

        carry, self._carry = self._carry, []
        take(carry)
        try:
            await self._read_into(batch, take, block)
        except BaseException:
            # The batch is lost with this error: what it carried over goes back (after a
            # Redis data loss the carried entries may be the only copy left).
            carried = {id(e) for e in carry}
            self._carry[:0] = [e for e in batch.entries if id(e) in carried]
            raise
        return batch

    async def _read_into(self, batch: Batch, take: _Take, block: bool) -> None:
        order = [(self._rotation + i) % self.shards for i in range(self.shards)]
        self._rotation = (self._rotation + 1) % self.shards
        for shard in order:
            if len(batch) >= self.batch_size:
                break
            if shard in self._replay_from:
                await self._read_own_pending(shard, batch, take)
        if time.monotonic() >= self._next_claim:
            for shard in order:
                if len(batch) >= self.batch_size:
                    break
                await self._reclaim(shard, batch, take)
            self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
        if not isinstance(self.redis, RedisCluster) and len(batch) < self.batch_size:
            # One command for every shard (up to `room` entries from each; the surplus is
            # carried to the next batch): 16 round trips per cycle were most of a cycle's cost.
            room = self.batch_size - len(batch)
            streams: dict[Any, Any] = {keys.outbox(s): ">" for s in order}
            reply = await self.redis.xreadgroup(
                keys.OUTBOX_GROUP, self.consumer, streams, count=room
            )
            self._take_streams(reply, take, batch)
        else:
            for shard in order:
                room = self.batch_size - len(batch)
                if room <= 0:
                    break
                reply = await self.redis.xreadgroup(
                    keys.OUTBOX_GROUP, self.consumer, {keys.outbox(shard): ">"}, count=room
                )
                take(self._parse(shard, reply, batch))
        if not batch.entries and not batch.gone and block and self.block_ms > 0:
            await self._wait_for_new(take, batch)

    async def _read_own_pending(self, shard: int, batch: Batch, take: _Take) -> None:
        # drain() may replay while run() still does (tests, a shutdown racing a cycle): the
        # cursor can be gone or moved by the other one; the authority dedups a re-sent event.
        start = self._replay_from.get(shard)
        if start is None:
            return
        room = max(self.batch_size - len(batch), 1)
        reply = await self.redis.xreadgroup(
            keys.OUTBOX_GROUP, self.consumer, {keys.outbox(shard): start}, count=room
        )
        raw_ids = [_text(i) for _, entries in _stream_entries(reply) for i, _ in entries]
        if raw_ids:
            self._replay_from[shard] = max(raw_ids, key=_id_key)
        else:
            self._replay_from.pop(shard, None)
        take(self._parse(shard, reply, batch))

    async def _reclaim(self, shard: int, batch: Batch, take: _Take) -> None:
        room = max(self.batch_size - len(batch), 1)
        reply = await self.redis.xautoclaim(
            keys.outbox(shard),
            keys.OUTBOX_GROUP,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_from[shard],
            count=room,
        )
        next_start, claimed = _text(reply[0]), reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        self._claim_from[shard] = next_start
        for entry_id in deleted:
            # Redis already dropped these from the PEL: their settlement is lost. Loud.
            log.error(
                "outbox %s: pending entry %s was deleted before settlement",
                keys.outbox(shard),
                _text(entry_id),
            )
        entries = []
        for entry_id, fields in claimed:
            entry = self._entry(shard, _text(entry_id), fields, batch)
            if entry is not None:
                entries.append(entry)
        if entries:
            log.info("reclaimed %d outbox entries of shard %d", len(entries), shard)
        take(entries)

    async def _wait_for_new(self, take: _Take, batch: Batch) -> None:
        if isinstance(self.redis, RedisCluster):
            # Shards live on different nodes: one blocking read cannot cover them all, so
            # this polls, and at most every _CLUSTER_POLL_MS (the lag of a new entry).
            await asyncio.sleep(min(self.block_ms, _CLUSTER_POLL_MS) / 1000)
            return
        streams: dict[Any, Any] = {keys.outbox(s): ">" for s in range(self.shards)}
        reply = await self.waiter.xreadgroup(
            keys.OUTBOX_GROUP, self.consumer, streams, count=self.batch_size, block=self.block_ms
        )
        self._take_streams(reply, take, batch)

    def _take_streams(self, reply: Any, take: _Take, batch: Batch) -> None:
        """Entries of a multi-stream XREADGROUP reply, each with its shard."""
        by_name = self._shard_by_stream
        for name, entries in _stream_entries(reply):
            take(self._parse(by_name[name], [[name, entries]], batch))

    def _parse(self, shard: int, reply: Any, batch: Batch) -> list[OutboxEntry]:
        out: list[OutboxEntry] = []
        for _, entries in _stream_entries(reply):
            for entry_id, fields in entries:
                entry = self._entry(shard, _text(entry_id), fields, batch)
                if entry is not None:
                    out.append(entry)
        return out

    def _entry(self, shard: int, entry_id: str, fields: Any, batch: Batch) -> OutboxEntry | None:
        if not fields:
            batch.gone.append((shard, entry_id))
            return None
        try:
            return parse_entry(shard, entry_id, fields)
        except (KeyError, ValueError) as err:
            if (shard, entry_id) not in self.poisoned:
                log.error(
                    "outbox %s entry %s is malformed (%r): left pending",
                    keys.outbox(shard),
                    entry_id,
                    err,
                )
                self.poisoned.add((shard, entry_id))
            return None

    # ---------------------------------------------------------------- send + ack

    async def send(self, batch: Batch) -> pb.SettleResponse:
        """One Settle call for the batch; raises AuthorityUnavailable / AuthorityRequestFailed."""
        if not batch.entries:
            return pb.SettleResponse()
        self._metrics.settle_requests.inc()
        self._metrics.settle_batch_size.observe(len(batch))
        started = time.perf_counter()
        try:
            reply = await self.authority.settle(batch.events)
        except AuthorityUnavailable:
            self._metrics.settle_errors.labels(code="UNAVAILABLE").inc()
            raise
        except AuthorityRequestFailed as err:
            self._metrics.settle_errors.labels(code=err.code).inc()
            raise
        finally:
            self._metrics.settle_duration.observe(time.perf_counter() - started)
        return reply

    async def ack(self, batch: Batch, reply: pb.SettleResponse) -> AckReport:
        """XACK what the authority answered for; uns decremented only where XACK returned 1."""
        if batch.entries and len(reply.results) != len(batch.entries):
            log.error(
                "Settle answered %d results for %d events: nothing acknowledged",
                len(reply.results),
                len(batch.entries),
            )
            return AckReport(left_pending=len(batch.entries))
        per_shard: dict[int, list[OutboxEntry]] = {}
        rejected = left = 0
        for entry, result in zip(batch.entries, reply.results, strict=True):
            if result.event_id and result.event_id != entry.event.event_id:
                log.error("Settle result order mismatch at %s: left pending", entry.entry_id)
                left += 1
                continue
            if result.status not in _ACKED:
                left += 1
                continue
            self._metrics.settle_events.labels(status=_STATUS_LABEL[result.status]).inc()
            if result.status == pb.REJECTED:
                rejected += 1
                self._metrics.settle_rejected.inc()
                log.error(
                    "authority rejected settlement event %s (project %s, amount %d): %s",
                    entry.event.event_id,
                    entry.event.project_id,
                    entry.event.amount,
                    result.error,
                )
            per_shard.setdefault(entry.shard, []).append(entry)
        gone: dict[int, list[str]] = {}
        for shard, entry_id in batch.gone:
            log.error(
                "outbox %s: pending entry %s has no payload; acknowledging it",
                keys.outbox(shard),
                entry_id,
            )
            gone.setdefault(shard, []).append(entry_id)
        wallets: dict[int, list[pb.Wallet]] = {}
        for wallet in reply.wallets:
            wallets.setdefault(keys.shard_of(wallet.project_id, self.shards), []).append(wallet)
        acked = released = written = 0
        for shard in sorted(set(per_shard) | set(gone)):
            a, r, w, clamped = await self._ack_shard(
                shard, per_shard.get(shard, []), gone.get(shard, []), wallets.get(shard, [])
            )
            acked, released, written = acked + a, released + r, written + w
            if clamped:
                self._metrics.settle_uns_clamped.inc(clamped)
                log.warning("shard %d: %d acknowledged commits exceeded uns", shard, clamped)
        return AckReport(acked, released, written, rejected, left)

    async def _ack_shard(
        self, shard: int, entries: list[OutboxEntry], gone: list[str], wallets: list[pb.Wallet]
    ) -> tuple[int, int, int, int]:
        wallet_keys: list[str] = []
        index: dict[str, int] = {}

        def key_index(project_id: str) -> int:
            key = keys.wallet(shard, project_id)
            if key not in index:
                wallet_keys.append(key)
                index[key] = len(wallet_keys) + 1  # KEYS[1] is the stream
            return index[key]

        args: list[Any] = [keys.OUTBOX_GROUP, len(entries) + len(gone)]
        for entry in entries:
            args += [entry.entry_id, key_index(entry.event.project_id), entry.uns_amount]
        for entry_id in gone:
            args += [entry_id, 1, 0]
        args.append(len(wallets))
        for wallet in wallets:
            args += [key_index(wallet.project_id), *wallet_args(wallet)]
        res = await self._ack(keys=[keys.outbox(shard), *wallet_keys], args=args)
        a, r, w, c = (int(x) for x in res)
        return a, r, w, c

    async def flush_once(self, *, block: bool = False) -> int:
        """One read + Settle + ack cycle; returns the entries acknowledged by this flusher."""
        batch = await self.read_batch(block=block)
        if not batch.entries and not batch.gone:
            return 0
        try:
            try:
                reply = await self.send(batch)
            except AuthorityRequestFailed as err:
                if err.code != "INVALID_ARGUMENT" or len(batch) == 0:
                    raise
                return await self._isolate(batch)
            report = await self.ack(batch, reply)
        except BaseException:
            # Nothing (more) is acknowledged: the batch goes first into the next one (after a
            # Redis data loss it may be the only copy; the authority ignores an event it has
            # applied), and own pending entries are read again.
            self._carry[:0] = batch.entries
            self._replay_all()
            raise
        if report.left_pending:
            self._replay_all()
        return report.acked

    async def _isolate(self, batch: Batch) -> int:
        """Bisect a batch the authority refuses as invalid: settle the good, park the bad."""
        if len(batch) == 1:
            entry = batch.entries[0]
            self.poisoned.add((entry.shard, entry.entry_id))
            log.error(
                "outbox %s entry %s (event %s) is refused by the authority as invalid: "
                "left pending, reported as poison",
                keys.outbox(entry.shard),
                entry.entry_id,
                entry.event.event_id,
            )
            if batch.gone:
                report = await self.ack(Batch(gone=batch.gone), pb.SettleResponse())
                return report.acked
            return 0
        half = len(batch) // 2
        acked = 0
        for part in (Batch(batch.entries[:half], batch.gone), Batch(batch.entries[half:])):
            try:
                reply = await self.send(part)
            except AuthorityRequestFailed as err:
                if err.code != "INVALID_ARGUMENT":
                    raise
                acked += await self._isolate(part)
                continue
            acked += (await self.ack(part, reply)).acked
        return acked

    def _replay_all(self) -> None:
        """Read own pending entries again from the start of every shard. The carried entries
        stay: they are taken first, and a pending copy of one is skipped as already seen."""
        self._replay_from = {s: "0" for s in range(self.shards)}

    # ---------------------------------------------------------------- loops

    def stop(self) -> None:
        """Ask run() to return after the current cycle (never cut a Redis command in half)."""
        self._stopping.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def run(self) -> None:
        """Flush until stop() or cancellation; errors back off (capped, exponential), their
        entries stay pending. stop() is the gentler way: it never cuts a Redis command.
        """
        self._stopping.clear()
        sweeper = None
        if self.sweeper is not None:
            sweeper = asyncio.create_task(self._sweep_loop(), name="creditgate-sweeper")
        backoff = self.backoff_initial_s
        next_observe = 0.0
        try:
            while not self._stopping.is_set():
                honour_cancellation()
                try:
                    if time.monotonic() >= next_observe:
                        next_observe = time.monotonic() + self.observe_interval_s
                        await self.observe()
                    acked = await self.flush_once(block=True)
                    backoff = self.backoff_initial_s
                    if 0 < acked < self.batch_size and self.linger_ms > 0:
                        # A part batch: let the outbox fill a little, so that each Settle
                        # and ack carries more events (the lag stays far below 1 s).
                        await self._pause(self.linger_ms / 1000)
                except (AuthorityUnavailable, AuthorityRequestFailed, *REDIS_ERRORS) as err:
                    honour_cancellation()
                    self._after_redis_error(err)
                    log.warning("flush failed, retrying in %.2fs: %r", backoff, err)
                    await self._pause(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
        finally:
            self._stopping.set()
            if sweeper is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    async def drain(self, timeout_s: float) -> int:
        """Flush what the outbox holds now (shutdown); returns the entries acknowledged."""
        # A run() cancelled while an XREADGROUP reply was on its way left entries delivered to
        # this consumer (pending) that no cycle saw: read our own pending list again first.
        self._replay_all()
        total = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                if self.sweeper is not None:
                    await self.sweeper.sweep_expired()
                regrouped = False
                while True:
                    try:
                        n = await self.flush_once()
                    except ResponseError as err:
                        if regrouped or "NOGROUP" not in str(err):
                            raise
                        regrouped = True
                        self._after_redis_error(err)
                        continue
                    total += n
                    if n == 0 and not self._carry:
                        break
        return total

    async def _sweep_loop(self) -> None:
        assert self.sweeper is not None
        while not self._stopping.is_set():
            honour_cancellation()
            try:
                swept = await self.sweeper.sweep_expired()
                if swept:
                    self._metrics.holds_swept.inc(swept)
            except Exception as err:  # the loop must outlive a failed pass
                honour_cancellation()
                log.warning("hold sweep failed: %r", err)
            await self._pause(self.sweep_interval_ms / 1000)

    async def observe(self) -> None:
        """Refresh the outbox gauges and trim acknowledged entries from the streams."""
        await self.ensure_groups()
        secs, micros = await self.redis.time()
        now_ms = int(secs) * 1000 + int(micros) // 1000
        for shard in range(self.shards):
            await self._observe_shard(shard, now_ms)

    async def _observe_shard(self, shard: int, now_ms: int) -> None:
        stream = keys.outbox(shard)
        label = str(shard)
        # Order matters: the last-delivered id is read BEFORE the pending summary, so every
        # entry below min(oldest pending, last delivered) is known to be acknowledged.
        groups = await self.redis.xinfo_groups(stream)
        keep_from = next(
            (
                _text(g["last-delivered-id"])
                for g in groups
                if _text(g["name"]) == keys.OUTBOX_GROUP
            ),
            "0-0",
        )
        summary = await self.redis.xpending(stream, keys.OUTBOX_GROUP)
        pending = int(summary.get("pending", 0) or 0)
        self._metrics.outbox_pending.labels(shard=label).set(pending)
        oldest = summary.get("min")
        poison = 0
        age = 0.0
        if pending and oldest:
            oldest_id = _text(oldest)
            age = max(now_ms - _stream_id_ms(oldest_id), 0) / 1000
            keep_from = min(keep_from, oldest_id, key=_id_key)
            rows = await self.redis.xpending_range(
                stream, keys.OUTBOX_GROUP, min="-", max="+", count=1000
            )
            poison = sum(
                1
                for row in rows
                if int(row["times_delivered"]) > self.poison_deliveries
                or (shard, _text(row["message_id"])) in self.poisoned
            )
        self._metrics.outbox_oldest_pending_age.labels(shard=label).set(age)
        self._metrics.outbox_poison.labels(shard=label).set(poison)
        # Approximate trimming removes only whole stream nodes below the id: never an entry
        # that is pending or not yet delivered.
        if keep_from != "0-0":
            await self.redis.xtrim(stream, minid=keep_from, approximate=True)
        self._metrics.outbox_length.labels(shard=label).set(await self.redis.xlen(stream))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
