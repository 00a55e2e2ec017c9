"""The authority's operations, one method per RPC: validate, authorize, call the store; Watch.

Transport-free: the gRPC servicer and the REST mapping both call these methods, so every rule
(who may do what, which inputs are valid, how Watch streams) lives here and nowhere else.

Access rules (invariant 8, tenant isolation):
- admin only: every mutation, Settle, ListWallets, ResolveApiKey, Export, Import;
- the project's own API key or the admin: GetWallet, ListTransactions, ExplainUsage, GetQuota,
  ListQuotas, GetReservation, CheckAdmission, GetAdmissionSnapshot, Watch of that project.
Admin-only operations check the credential before the input; project reads validate the input
first because the project id is part of the check.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from creditservice import validation
from creditservice.auth import Authenticator, hash_secret
from creditservice.clock import Clock
from creditservice.errors import NotFound, PermissionDenied, Unauthenticated
from creditservice.principal import Principal
from creditservice.storage.base import Store
from creditservice.v1 import credit_pb2 as pb

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
WATCH_BATCH = 1000


class ChangeSignal:
    """Wakes every Watch stream of this process after a committed change.

    `version` lets a waiter that read the store after taking a version notice changes committed
    in between: waiting on an outdated version returns at once, so no wake-up is lost.
    """

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        fired, self._event = self._event, asyncio.Event()
        fired.set()

    async def wait(self, seen_version: int, timeout_s: float) -> None:
        if self.version != seen_version:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)


class ChangeFeed:
    """Reads the change log once per process on behalf of every Watch stream.

    It keeps the newest changes in memory as one contiguous run of the log (every change with
    base < cursor <= head). Streams at or after `base` are served from memory; a stream further
    behind reads the store itself. New changes are fetched by one task at a time (single
    flight), and only when something may be new: the signal moved since the last fetch, the last
    fetch filled a whole batch, or a poll interval passed (changes of other processes). So the
    database sees one query per change or poll interval, however many streams are open.
    """

    def __init__(
        self, store: Store, signal: ChangeSignal, poll_s: float, capacity: int = 10_000
    ) -> None:
        self._store = store
        self._signal = signal
        self._poll_s = poll_s
        self._capacity = capacity
        self._events: list[pb.WatchEvent] = []
        self._cursors: list[int] = []
        self._base = -1  # -1: not started; the first fetch starts at the log's end
        self._head = -1
        self._fetch: asyncio.Task[None] | None = None
        self._fetched_version = -1
        self._fetched_at = float("-inf")
        self._more = False

    async def after(self, cursor: int, limit: int) -> list[pb.WatchEvent]:
        """Up to `limit` changes with a cursor > `cursor`, oldest first."""
        if self._head < 0 or cursor >= self._head:
            await self._refresh()
        if cursor < self._base:
            return await self._store.changes_after(cursor, limit)
        i = bisect.bisect_right(self._cursors, cursor)
        return self._events[i : i + limit]

    async def drain(self) -> None:
        """Wait for an in-flight fetch (before the store closes); its failure is not ours."""
        task = self._fetch
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    async def _refresh(self) -> None:
        now = asyncio.get_running_loop().time()
        fresh = self._signal.version == self._fetched_version and not self._more
        if self._head >= 0 and fresh and now - self._fetched_at < self._poll_s:
            return
        if self._fetch is None:
            self._fetch = asyncio.create_task(self._fetch_once())
        # Shielded: one stream going away must not cancel the fetch the others wait for.
        await asyncio.shield(self._fetch)

    async def _fetch_once(self) -> None:
        version = self._signal.version
        started = asyncio.get_running_loop().time()
        try:
            if self._head < 0:
                self._head = self._base = await self._store.last_cursor()
            batch = await self._store.changes_after(self._head, WATCH_BATCH)
            if batch:
                self._events.extend(batch)
                self._cursors.extend(e.cursor for e in batch)
                self._head = batch[-1].cursor
            if len(self._events) > 2 * self._capacity:
                drop = len(self._events) - self._capacity
                self._base = self._cursors[drop - 1]
                del self._events[:drop], self._cursors[:drop]
            self._more = len(batch) >= WATCH_BATCH
            self._fetched_version = version
            self._fetched_at = started
        finally:
            self._fetch = None


@dataclass(frozen=True, slots=True)
class JobsReport:
    grace_expired: int = 0
    reservations_expired: int = 0
    changes_pruned: int = 0


class CreditCore:
    """One instance per authority process; `store` is the only state it touches."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        admin_token: str,
        *,
        heartbeat_interval_s: float = 5.0,
        watch_poll_interval_s: float = 0.25,
        key_cache_ttl_s: float = 1.0,
        change_retention_s: float = 7 * 24 * 3600.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.signal = ChangeSignal()
        self.feed = ChangeFeed(store, self.signal, watch_poll_interval_s)
        # The store reports every commit that appended changes, whoever caused it (RPCs, jobs,
        # imports), so Watch wakes without each operation remembering to notify.
        store.add_change_listener(lambda _cursor: self.signal.notify())
        self._auth = Authenticator(admin_token, store.resolve_api_key, key_cache_ttl_s)
        self._heartbeat_s = heartbeat_interval_s
        self._poll_s = watch_poll_interval_s
        self._retention_ms = int(change_retention_s * 1000)
        self._closed = False

    async def authenticate(self, token: str | None) -> Principal:
        """Principal of a bearer token; missing or invalid -> errors.Unauthenticated."""
        return await self._auth.authenticate(token)

    def close(self) -> None:
        """Ends every open Watch stream (graceful shutdown)."""
        self._closed = True
        self.signal.notify()

    async def drain(self) -> None:
        """After close() and the transports stopped: wait for work still using the store."""
        await self.feed.drain()

    async def _mutate(
        self, principal: Principal, check: Callable[[], None], call: Callable[[int], Awaitable[T]]
    ) -> T:
        principal.require_admin()
        check()
        return await call(self.clock.now_ms())

    # ------------------------------------------------------------------ wallets

    async def CreateWallet(
        self, request: pb.CreateWalletRequest, principal: Principal
    ) -> pb.CreateWalletResponse:
        return await self._mutate(
            principal,
            lambda: validation.create_wallet(request),
            lambda now: self.store.create_wallet(request, now),
        )

    async def GetWallet(
        self, request: pb.GetWalletRequest, principal: Principal
    ) -> pb.GetWalletResponse:
        validation.get_wallet(request)
        principal.require_project(request.project_id)
        return pb.GetWalletResponse(wallet=await self.store.get_wallet(request.project_id))

    async def ListWallets(
        self, request: pb.ListWalletsRequest, principal: Principal
    ) -> pb.ListWalletsResponse:
        # A project key never lists: an organization's wallets belong to other projects too.
        principal.require_admin()
        validation.list_wallets(request)
        wallets, token = await self.store.list_wallets(
            request.organization_id, request.page_size or DEFAULT_PAGE_SIZE, request.page_token
        )
        return pb.ListWalletsResponse(wallets=wallets, next_page_token=token)

    async def TopUp(self, request: pb.TopUpRequest, principal: Principal) -> pb.TopUpResponse:
        return await self._mutate(
            principal,
            lambda: validation.top_up(request),
            lambda now: self.store.top_up(request, now),
        )

    async def Adjust(self, request: pb.AdjustRequest, principal: Principal) -> pb.AdjustResponse:
        return await self._mutate(
            principal,
            lambda: validation.adjust(request),
            lambda now: self.store.adjust(request, now),
        )

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, principal: Principal
    ) -> pb.ListTransactionsResponse:
        validation.list_transactions(request)
        principal.require_project(request.project_id)
        entries, token = await self.store.list_transactions(
            request.project_id, request.page_size or DEFAULT_PAGE_SIZE, request.page_token
        )
        return pb.ListTransactionsResponse(entries=entries, next_page_token=token)

    async def SetWalletPolicy(
        self, request: pb.SetWalletPolicyRequest, principal: Principal
    ) -> pb.SetWalletPolicyResponse:
        return await self._mutate(
            principal,
            lambda: validation.set_wallet_policy(request),
            lambda now: self.store.set_wallet_policy(request, now),
        )

    async def ExplainUsage(
        self, request: pb.ExplainUsageRequest, principal: Principal
    ) -> pb.ExplainUsageResponse:
        validation.explain_usage(request)
        principal.require_project(request.project_id)
        # until_ms 0 = up to now: the store reads it as unbounded ([since, until) otherwise).
        return await self.store.explain_usage(
            request.project_id, request.since_ms, request.until_ms
        )

    # ------------------------------------------------------------------ quotas

    async def SetQuota(
        self, request: pb.SetQuotaRequest, principal: Principal
    ) -> pb.SetQuotaResponse:
        return await self._mutate(
            principal,
            lambda: validation.set_quota(request),
            lambda now: self.store.set_quota(request, now),
        )

    async def GetQuota(
        self, request: pb.GetQuotaRequest, principal: Principal
    ) -> pb.GetQuotaResponse:
        validation.get_quota(request)
        principal.require_project(request.project_id)
        return pb.GetQuotaResponse(
            quota=await self.store.get_quota(request.project_id, request.name)
        )

    async def ListQuotas(
        self, request: pb.ListQuotasRequest, principal: Principal
    ) -> pb.ListQuotasResponse:
        validation.list_quotas(request)
        principal.require_project(request.project_id)
        return pb.ListQuotasResponse(quotas=await self.store.list_quotas(request.project_id))

    async def DeleteQuota(
        self, request: pb.DeleteQuotaRequest, principal: Principal
    ) -> pb.DeleteQuotaResponse:
        return await self._mutate(
            principal,
            lambda: validation.delete_quota(request),
            lambda now: self.store.delete_quota(request, now),
        )

    # ------------------------------------------------------------------ reservations

    async def Reserve(self, request: pb.ReserveRequest, principal: Principal) -> pb.ReserveResponse:
        return await self._mutate(
            principal,
            lambda: validation.reserve(request),
            lambda now: self.store.reserve(request, now),
        )

    async def Commit(self, request: pb.CommitRequest, principal: Principal) -> pb.CommitResponse:
        return await self._mutate(
            principal,
            lambda: validation.commit(request),
            lambda now: self.store.commit(request, now),
        )

    async def Release(self, request: pb.ReleaseRequest, principal: Principal) -> pb.ReleaseResponse:
        return await self._mutate(
            principal,
            lambda: validation.release(request),
            lambda now: self.store.release(request, now),
        )

    async def GetReservation(
        self, request: pb.GetReservationRequest, principal: Principal
    ) -> pb.GetReservationResponse:
        validation.get_reservation(request)
        reservation = await self.store.get_reservation(request.reservation_id)
        principal.require_project(reservation.project_id)
        return pb.GetReservationResponse(reservation=reservation)

    # ------------------------------------------------------------------ settlement and usage

    async def Settle(self, request: pb.SettleRequest, principal: Principal) -> pb.SettleResponse:
        return await self._mutate(
            principal,
            lambda: validation.settle(request.events),
            lambda now: self.store.settle(request.events, now),
        )

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, principal: Principal
    ) -> pb.RecordUsageResponse:
        return await self._mutate(
            principal,
            lambda: validation.record_usage(request),
            lambda now: self.store.record_usage(request, now),
        )

    async def CheckAdmission(
        self, request: pb.CheckAdmissionRequest, principal: Principal
    ) -> pb.CheckAdmissionResponse:
        validation.check_admission(request)
        principal.require_project(request.project_id)
        try:
            wallet = await self.store.get_wallet(request.project_id)
        except NotFound:
            return pb.CheckAdmissionResponse(
                allowed=False, reason=pb.ADMISSION_REASON_UNKNOWN_PROJECT
            )
        reason = admission_reason(wallet, request.cost)
        return pb.CheckAdmissionResponse(
            allowed=reason == pb.ADMISSION_REASON_ADMITTED, reason=reason, wallet=wallet
        )

    async def GetAdmissionSnapshot(
        self, request: pb.GetAdmissionSnapshotRequest, principal: Principal
    ) -> pb.GetAdmissionSnapshotResponse:
        validation.get_admission_snapshot(request)
        principal.require_project(request.project_id)
        return pb.GetAdmissionSnapshotResponse(
            snapshot=await self.store.get_snapshot(request.project_id)
        )

    # ------------------------------------------------------------------ api keys

    async def IssueApiKey(
        self, request: pb.IssueApiKeyRequest, principal: Principal
    ) -> pb.IssueApiKeyResponse:
        """The secret is in the response of the first call only.

        A replay with the same request_id returns the stored key without the secret: only its
        hash was ever stored, so the authority cannot show it again (issue a new key instead).
        """
        principal.require_admin()
        validation.issue_api_key(request)
        secret = "cg_" + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        response = await self.store.issue_api_key(
            request, key_id, hash_secret(secret), secret[:10], self.clock.now_ms()
        )
        if response.key.key_id != key_id:
            return pb.IssueApiKeyResponse(key=response.key)
        return pb.IssueApiKeyResponse(key=response.key, secret=secret)

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, principal: Principal
    ) -> pb.RevokeApiKeyResponse:
        response = await self._mutate(
            principal,
            lambda: validation.revoke_api_key(request),
            lambda now: self.store.revoke_api_key(request, now),
        )
        self._auth.forget(request.key_id)
        return response

    async def ResolveApiKey(
        self, request: pb.ResolveApiKeyRequest, principal: Principal
    ) -> pb.ResolveApiKeyResponse:
        principal.require_admin()
        validation.resolve_api_key(request)
        if not request.include_snapshot:
            return pb.ResolveApiKeyResponse(key=await self.store.resolve_api_key(request.key_hash))
        # One read: the key and its project's snapshot (none for a revoked key, or a project
        # without a wallet: the key still resolves).
        key, snapshot = await self.store.resolve_api_key_with_snapshot(request.key_hash)
        return pb.ResolveApiKeyResponse(key=key, snapshot=snapshot)

    # ------------------------------------------------------------------ export / import

    async def Export(
        self, request: pb.ExportRequest, principal: Principal
    ) -> AsyncIterator[pb.ExportRecord]:
        principal.require_admin()
        async for record in self.store.export():
            yield record

    async def Import(
        self, records: AsyncIterator[pb.ExportRecord], principal: Principal
    ) -> pb.ImportResponse:
        principal.require_admin()
        return await self.store.import_records(records)

    # ------------------------------------------------------------------ watch

    async def Watch(
        self, request: pb.WatchRequest, principal: Principal
    ) -> AsyncIterator[pb.WatchEvent]:
        """Changes after `request.after_cursor` (0 = from now on), then live, until close().

        Theory of operation: the stream reads the change log from its cursor through `feed`
        (shared by all streams). After each committed change of this process `signal` wakes it
        at once; a poll every `watch_poll_interval_s` picks up changes of other processes
        sharing the database. A
        Heartbeat opens the stream (once any ResyncRequired is sent) and repeats while idle; its
        cursor is the position scanned so far, from which resuming is safe. A cursor older than
        the retained log, or newer than the log's end (another database), first yields
        ResyncRequired: the client must refill every cache.
        """
        validation.watch(request)
        wanted = _watch_scope(request, principal)
        store = self.store
        cursor = request.after_cursor
        last = await store.last_cursor()
        if cursor == 0:
            cursor = last
        elif cursor > last:
            yield _resync(last, self.clock.now_ms(), f"cursor {cursor} is ahead of the log")
            cursor = last
        else:
            oldest = await store.oldest_cursor()
            first_kept = oldest if oldest else last + 1
            if cursor < first_kept - 1:
                yield _resync(
                    first_kept - 1, self.clock.now_ms(), f"changes after {cursor} were pruned"
                )
                cursor = first_kept - 1

        # Announce the start position at once: the client knows the stream is live and where.
        yield _heartbeat(cursor, self.clock.now_ms())
        loop = asyncio.get_running_loop()
        next_heartbeat = loop.time() + self._heartbeat_s
        while not self._closed:
            seen = self.signal.version
            changes = await self.feed.after(cursor, WATCH_BATCH)
            if changes and changes[0].cursor > cursor + 1:
                # A gap: either cursors skip numbers, or pruning overtook this slow stream.
                oldest = await store.oldest_cursor()
                if cursor < oldest - 1:
                    reason = f"changes after {cursor} were pruned"
                    yield _resync(oldest - 1, self.clock.now_ms(), reason)
            for event in changes:
                cursor = event.cursor
                if wanted is not None and event.project_id not in wanted:
                    continue
                if (
                    not principal.admin
                    and event.HasField("key_revoked")
                    and event.key_revoked.key_id == principal.key_id
                ):
                    raise Unauthenticated("API key revoked")
                yield event
                next_heartbeat = loop.time() + self._heartbeat_s
            if len(changes) >= WATCH_BATCH:
                continue
            now = loop.time()
            if now >= next_heartbeat:
                yield _heartbeat(cursor, self.clock.now_ms())
                next_heartbeat = now + self._heartbeat_s
            await self.signal.wait(seen, min(self._poll_s, max(next_heartbeat - now, 0.0)))

    # ------------------------------------------------------------------ jobs

    async def run_jobs_once(self) -> JobsReport:
        """One pass of every lifecycle job at the clock's current time (tests, ManualClock)."""
        grace = await self.expire_grace_once()
        reservations = await self.expire_reservations_once()
        pruned = await self.prune_changes_once()
        return JobsReport(grace, reservations, pruned)

    async def expire_grace_once(self) -> int:
        """GRACE wallets past their deadline become EXPIRED."""
        return await self.store.expire_grace(self.clock.now_ms())

    async def expire_reservations_once(self) -> int:
        return await self.store.expire_reservations(self.clock.now_ms())

    async def prune_changes_once(self) -> int:
        return await self.store.prune_changes(self.clock.now_ms() - self._retention_ms)


def admission_reason(wallet: pb.Wallet, cost: int) -> pb.AdmissionReason.ValueType:
    """The authority's admission rule, the same as the gateways' (DESIGN.md, wallet table)."""
    if wallet.state == pb.EXPIRED:
        return pb.ADMISSION_REASON_WALLET_EXPIRED
    if cost == 0:
        return pb.ADMISSION_REASON_ADMITTED
    if wallet.state == pb.GRACE:
        return pb.ADMISSION_REASON_WALLET_GRACE
    if wallet.available - cost < -wallet.overdraft_limit:
        return pb.ADMISSION_REASON_INSUFFICIENT_CREDITS
    return pb.ADMISSION_REASON_ADMITTED


def _watch_scope(request: pb.WatchRequest, principal: Principal) -> frozenset[str] | None:
    """Projects a stream may carry; None = all (admin without a filter)."""
    if principal.admin:
        return frozenset(request.project_ids) if request.project_ids else None
    own = principal.project_id
    if own is None:
        raise PermissionDenied("this credential may not watch")
    for pid in request.project_ids:
        principal.require_project(pid)
    return frozenset((own,))


def _heartbeat(cursor: int, now_ms: int) -> pb.WatchEvent:
    return pb.WatchEvent(cursor=cursor, occurred_at_ms=now_ms, heartbeat=pb.Heartbeat())


def _resync(cursor: int, now_ms: int, reason: str) -> pb.WatchEvent:
    return pb.WatchEvent(
        cursor=cursor, occurred_at_ms=now_ms, resync=pb.ResyncRequired(reason=reason)
    )
