"""The store's logic, written once over the `Driver` interface and shared by SQLite and PostgreSQL.

Unary mutations run through `_mutate`: idempotency lookup, the change, the outcome record and the
change log in one transaction; a refused request records its error in a transaction of its own.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from creditservice import domain
from creditservice.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from creditservice.storage import queries as q
from creditservice.storage import settle as settle_mod
from creditservice.storage import transfer
from creditservice.storage.driver import Driver
from creditservice.storage.idempotency import RECORDABLE, IdempotencyKey, fingerprint
from creditservice.storage.journal import Work
from creditservice.storage.rows import (
    API_KEY_INSERT_COLUMNS,
    API_KEY_RECORD_SELECT,
    API_KEYS,
    LEDGER,
    QUOTAS,
    RESERVATIONS,
    WALLETS,
    api_key_record_from_row,
    wallet_from_row,
)
from creditservice.v1 import credit_pb2 as pb

R = TypeVar("R", bound=Message)

_ADJUST_KINDS = (pb.SLA_CREDIT, pb.REFUND, pb.ADJUSTMENT)


class SqlStore:
    """`Store` over any `Driver`; see creditservice.storage.base.Store for the contract."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self.backend = driver.backend
        self._listeners: list[Callable[[int], None]] = []

    async def close(self) -> None:
        await self._driver.close()

    def add_change_listener(self, callback: Callable[[int], None]) -> None:
        self._listeners.append(callback)

    def _notify(self, last_cursor: int) -> None:
        if last_cursor:
            for cb in self._listeners:
                cb(last_cursor)

    # ------------------------------------------------------------ idempotent mutations

    async def _mutate(
        self,
        method: str,
        req: Message,
        request_id: str,
        resp_type: type[R],
        *,
        now_ms: int,
        body: Callable[[Work], Awaitable[R]],
    ) -> R:
        key = IdempotencyKey(method, request_id, fingerprint(req))
        try:
            async with self._driver.write() as tx:
                prior = await key.lookup(tx)
                if prior is None:
                    work = Work(tx, now_ms)
                    resp = await body(work)
                    await key.record(tx, now_ms, response=resp.SerializeToString())
                    await work.flush()
        except RECORDABLE as err:
            # A driver error converted at the boundary carries its cause: not a final decision.
            if err.__cause__ is None:
                async with self._driver.write() as tx:
                    await key.record(tx, now_ms, error=err)
            raise
        if prior is not None:
            return key.replay(prior, resp_type)
        self._notify(work.last_cursor)
        return resp

    async def create_wallet(
        self, req: pb.CreateWalletRequest, now_ms: int
    ) -> pb.CreateWalletResponse:
        async def body(w: Work) -> pb.CreateWalletResponse:
            found = await w.tx.fetchval(
                "SELECT COUNT(*) FROM wallets WHERE project_id = ?", req.project_id
            )
            if found:
                raise AlreadyExists(f"project {req.project_id!r} already has a wallet")
            grace = domain.effective_grace_period(req.grace_period_seconds)
            policy = domain.Policy(req.low_balance_threshold, grace, req.overdraft_limit)
            t = domain.transition(domain.UNSPECIFIED, 0, 0, now_ms, policy)
            wallet = pb.Wallet(
                project_id=req.project_id,
                organization_id=req.organization_id,
                state=t.state,
                low_balance_threshold=req.low_balance_threshold,
                grace_period_seconds=grace,
                grace_until_ms=t.grace_until_ms,
                overdraft_limit=req.overdraft_limit,
                version=1,
                created_at_ms=now_ms,
                updated_at_ms=now_ms,
            )
            await w.tx.execute(WALLETS.insert, *WALLETS.values(wallet))
            await w.log_wallet(wallet, t.events)
            return pb.CreateWalletResponse(wallet=wallet)

        return await self._mutate(
            "CreateWallet", req, req.request_id, pb.CreateWalletResponse, now_ms=now_ms, body=body
        )

    async def top_up(self, req: pb.TopUpRequest, now_ms: int) -> pb.TopUpResponse:
        async def body(w: Work) -> pb.TopUpResponse:
            wallet = await w.wallet(req.project_id)
            entry = await w.post(
                wallet, pb.TOPUP, req.amount, reference=req.reference, request_id=req.request_id
            )
            return pb.TopUpResponse(wallet=wallet, entry=entry)

        return await self._mutate(
            "TopUp", req, req.request_id, pb.TopUpResponse, now_ms=now_ms, body=body
        )

    async def adjust(self, req: pb.AdjustRequest, now_ms: int) -> pb.AdjustResponse:
        async def body(w: Work) -> pb.AdjustResponse:
            if req.kind not in _ADJUST_KINDS:
                raise InvalidArgument("adjust takes SLA_CREDIT, REFUND or ADJUSTMENT")
            wallet = await w.wallet(req.project_id)
            # Credits are positive by kind; only ADJUSTMENT carries its own sign.
            amount = req.amount if req.kind == pb.ADJUSTMENT else abs(req.amount)
            entry = await w.post(
                wallet,
                req.kind,
                amount,
                reference=req.reference,
                request_id=req.request_id,
                description=req.reason,
            )
            return pb.AdjustResponse(wallet=wallet, entry=entry)

        return await self._mutate(
            "Adjust", req, req.request_id, pb.AdjustResponse, now_ms=now_ms, body=body
        )

    async def set_wallet_policy(
        self, req: pb.SetWalletPolicyRequest, now_ms: int
    ) -> pb.SetWalletPolicyResponse:
        async def body(w: Work) -> pb.SetWalletPolicyResponse:
            wallet = await w.wallet(req.project_id)
            wallet.low_balance_threshold = req.low_balance_threshold
            wallet.grace_period_seconds = domain.effective_grace_period(req.grace_period_seconds)
            wallet.overdraft_limit = req.overdraft_limit
            events = w.rebalance(wallet, wallet.balance)
            await w.save_wallet(wallet, events)
            return pb.SetWalletPolicyResponse(wallet=wallet)

        return await self._mutate(
            "SetWalletPolicy",
            req,
            req.request_id,
            pb.SetWalletPolicyResponse,
            now_ms=now_ms,
            body=body,
        )

    async def set_quota(self, req: pb.SetQuotaRequest, now_ms: int) -> pb.SetQuotaResponse:
        async def body(w: Work) -> pb.SetQuotaResponse:
            await w.wallet(req.quota.project_id)
            quota = pb.Quota()
            quota.CopyFrom(req.quota)
            quota.updated_at_ms = now_ms
            # The quota's version is the cursor of its change: it keeps growing across a
            # delete and re-create, so a cache never mistakes a new quota for an old one.
            quota.version = await w.next_cursor()
            await w.tx.execute(
                f"{QUOTAS.insert} ON CONFLICT (project_id, name) DO UPDATE SET "
                "algorithm = excluded.algorithm, quota_limit = excluded.quota_limit, "
                "window_seconds = excluded.window_seconds, version = excluded.version, "
                "updated_at_ms = excluded.updated_at_ms",
                *QUOTAS.values(quota),
            )
            change = pb.WatchEvent(project_id=quota.project_id, quota=pb.QuotaChange(quota=quota))
            await w.emit(change, cursor=quota.version)
            return pb.SetQuotaResponse(quota=quota)

        return await self._mutate(
            "SetQuota", req, req.request_id, pb.SetQuotaResponse, now_ms=now_ms, body=body
        )

    async def delete_quota(self, req: pb.DeleteQuotaRequest, now_ms: int) -> pb.DeleteQuotaResponse:
        async def body(w: Work) -> pb.DeleteQuotaResponse:
            quota = await q.quota(w.tx, req.project_id, req.name)
            await w.tx.execute(
                "DELETE FROM quotas WHERE project_id = ? AND name = ?", req.project_id, req.name
            )
            await w.emit(
                pb.WatchEvent(
                    project_id=req.project_id, quota=pb.QuotaChange(quota=quota, deleted=True)
                )
            )
            return pb.DeleteQuotaResponse(quota=quota)

        return await self._mutate(
            "DeleteQuota", req, req.request_id, pb.DeleteQuotaResponse, now_ms=now_ms, body=body
        )

    async def reserve(self, req: pb.ReserveRequest, now_ms: int) -> pb.ReserveResponse:
        async def body(w: Work) -> pb.ReserveResponse:
            wallet = await w.wallet(req.project_id)
            refusal = domain.reserve_refusal(
                wallet.state, wallet.available, req.amount, wallet.overdraft_limit
            )
            if refusal is not None:
                raise FailedPrecondition(refusal)
            ttl = req.ttl_seconds or domain.DEFAULT_RESERVATION_TTL_SECONDS
            res = pb.Reservation(
                reservation_id="res_" + secrets.token_hex(12),
                project_id=req.project_id,
                amount=req.amount,
                state=pb.ACTIVE,
                meter=req.meter or domain.DEFAULT_METER,
                created_at_ms=now_ms,
                expires_at_ms=now_ms + ttl * 1000,
            )
            await w.tx.execute(RESERVATIONS.insert, *RESERVATIONS.values(res))
            wallet.reserved += req.amount
            await w.save_wallet(wallet)
            return pb.ReserveResponse(reservation=res, wallet=wallet)

        return await self._mutate(
            "Reserve", req, req.request_id, pb.ReserveResponse, now_ms=now_ms, body=body
        )

    async def _end_reservation(
        self,
        w: Work,
        reservation_id: str,
        state: pb.ReservationState.ValueType,
        amount: int = 0,
        allow_overage: bool = False,
    ) -> tuple[pb.Reservation, pb.Wallet]:
        res = await q.reservation(w.tx, reservation_id)
        if res.state != pb.ACTIVE:
            raise FailedPrecondition(
                f"reservation {reservation_id!r} is {pb.ReservationState.Name(res.state)}"
            )
        if res.expires_at_ms <= w.now_ms:
            raise FailedPrecondition(f"reservation {reservation_id!r} has expired")
        if amount > res.amount and not allow_overage:
            raise FailedPrecondition(
                f"commit of {amount} exceeds the reservation of {res.amount} "
                "(allow_overage not set)"
            )
        res.state = state
        res.committed_amount = amount
        res.ended_at_ms = w.now_ms
        await q.save_reservation(w.tx, res)
        wallet = await w.wallet(res.project_id)
        wallet.reserved -= res.amount
        return res, wallet

    async def commit(self, req: pb.CommitRequest, now_ms: int) -> pb.CommitResponse:
        async def body(w: Work) -> pb.CommitResponse:
            res, wallet = await self._end_reservation(
                w, req.reservation_id, pb.COMMITTED, req.amount, req.allow_overage
            )
            resp = pb.CommitResponse(reservation=res)
            if req.amount > 0:
                entry = await w.post(
                    wallet,
                    pb.USAGE,
                    -req.amount,
                    meter=res.meter,
                    reference=res.reservation_id,
                    request_id=req.request_id,
                    quantity=1,
                )
                resp.entry.CopyFrom(entry)
            else:
                await w.save_wallet(wallet)
            resp.wallet.CopyFrom(wallet)
            return resp

        return await self._mutate(
            "Commit", req, req.request_id, pb.CommitResponse, now_ms=now_ms, body=body
        )

    async def release(self, req: pb.ReleaseRequest, now_ms: int) -> pb.ReleaseResponse:
        async def body(w: Work) -> pb.ReleaseResponse:
            res, wallet = await self._end_reservation(w, req.reservation_id, pb.RELEASED)
            await w.save_wallet(wallet)
            return pb.ReleaseResponse(reservation=res, wallet=wallet)

        return await self._mutate(
            "Release", req, req.request_id, pb.ReleaseResponse, now_ms=now_ms, body=body
        )

    async def record_usage(self, req: pb.RecordUsageRequest, now_ms: int) -> pb.RecordUsageResponse:
        async def body(w: Work) -> pb.RecordUsageResponse:
            wallet = await w.wallet(req.project_id)
            entry = await w.post(
                wallet,
                pb.USAGE,
                -req.amount,
                meter=req.meter or domain.DEFAULT_METER,
                request_id=req.request_id,
                description=req.description,
                quantity=req.quantity,
            )
            return pb.RecordUsageResponse(wallet=wallet, entry=entry)

        return await self._mutate(
            "RecordUsage", req, req.request_id, pb.RecordUsageResponse, now_ms=now_ms, body=body
        )

    async def issue_api_key(
        self, req: pb.IssueApiKeyRequest, key_id: str, key_hash: str, prefix: str, now_ms: int
    ) -> pb.IssueApiKeyResponse:
        async def body(w: Work) -> pb.IssueApiKeyResponse:
            await w.wallet(req.project_id)
            clash = await w.tx.fetchval(
                "SELECT COUNT(*) FROM api_keys WHERE key_id = ? OR key_hash = ?", key_id, key_hash
            )
            if clash:
                raise AlreadyExists("an API key with that id or secret exists")
            key = pb.ApiKey(
                key_id=key_id,
                project_id=req.project_id,
                name=req.name,
                prefix=prefix,
                created_at_ms=now_ms,
            )
            await w.tx.insert_many(
                "api_keys", API_KEY_INSERT_COLUMNS, [(*API_KEYS.values(key), key_hash)]
            )
            return pb.IssueApiKeyResponse(key=key)

        return await self._mutate(
            "IssueApiKey", req, req.request_id, pb.IssueApiKeyResponse, now_ms=now_ms, body=body
        )

    async def revoke_api_key(
        self, req: pb.RevokeApiKeyRequest, now_ms: int
    ) -> pb.RevokeApiKeyResponse:
        async def body(w: Work) -> pb.RevokeApiKeyResponse:
            row = await w.tx.fetchrow(f"{API_KEY_RECORD_SELECT} WHERE key_id = ?", req.key_id)
            if row is None:
                raise NotFound(f"API key {req.key_id!r} not found")
            rec = api_key_record_from_row(row)
            if rec.key.revoked_at_ms == 0:
                rec.key.revoked_at_ms = now_ms
                await w.tx.execute(
                    "UPDATE api_keys SET revoked_at_ms = ? WHERE key_id = ?", now_ms, req.key_id
                )
                revoked = pb.ApiKeyRevoked(
                    key_id=req.key_id, key_hash=rec.key_hash, project_id=rec.key.project_id
                )
                await w.emit(pb.WatchEvent(project_id=rec.key.project_id, key_revoked=revoked))
            return pb.RevokeApiKeyResponse(key=rec.key)

        return await self._mutate(
            "RevokeApiKey", req, req.request_id, pb.RevokeApiKeyResponse, now_ms=now_ms, body=body
        )

    async def settle(self, events: Sequence[pb.SettlementEvent], now_ms: int) -> pb.SettleResponse:
        async with self._driver.write() as tx:
            work = Work(tx, now_ms)
            resp = await settle_mod.settle_batch(work, events)
            await work.flush()
        self._notify(work.last_cursor)
        return resp

    # ------------------------------------------------------------ reads

    async def get_wallet(self, project_id: str) -> pb.Wallet:
        async with self._driver.read() as tx:
            return await q.wallet(tx, project_id)

    async def list_wallets(
        self, organization_id: str, page_size: int, page_token: str
    ) -> tuple[list[pb.Wallet], str]:
        size = q.page_size_of(page_size)
        after = q.decode_token("w", page_token) if page_token else ""
        where, args = ["project_id > ?"], [after]
        if organization_id:
            where.append("organization_id = ?")
            args.append(organization_id)
        async with self._driver.read() as tx:
            rows = await tx.fetch(
                f"{WALLETS.select} WHERE {' AND '.join(where)} ORDER BY project_id LIMIT ?",
                *args,
                size + 1,
            )
        wallets = [wallet_from_row(r) for r in rows[:size]]
        token = q.encode_token("w", wallets[-1].project_id) if len(rows) > size else ""
        return wallets, token

    async def list_transactions(
        self, project_id: str, page_size: int, page_token: str
    ) -> tuple[list[pb.LedgerEntry], str]:
        size = q.page_size_of(page_size)
        before = 2**63 - 1
        if page_token:
            value = q.decode_token("t", page_token)
            if not value.isdigit():
                raise InvalidArgument("malformed page_token")
            before = int(value)
        async with self._driver.read() as tx:
            await q.wallet(tx, project_id)
            rows = await tx.fetch(
                f"{LEDGER.select} WHERE project_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                project_id,
                before,
                size + 1,
            )
        entries = [LEDGER.from_row(r) for r in rows[:size]]
        token = q.encode_token("t", entries[-1].seq) if len(rows) > size else ""
        return entries, token

    async def explain_usage(
        self, project_id: str, since_ms: int, until_ms: int
    ) -> pb.ExplainUsageResponse:
        until = until_ms if until_ms > 0 else 2**63 - 1
        async with self._driver.read() as tx:
            wallet = await q.wallet(tx, project_id)
            rows = await tx.fetch(
                "SELECT meter, CAST(-SUM(amount) AS BIGINT), CAST(SUM(quantity) AS BIGINT), "
                "COUNT(*) FROM ledger WHERE project_id = ? AND kind = ? "
                "AND created_at_ms >= ? AND created_at_ms < ? GROUP BY meter ORDER BY meter",
                project_id,
                pb.USAGE,
                since_ms,
                until,
            )
        meters = [pb.MeterUsage(meter=m, amount=a, quantity=q, entries=n) for m, a, q, n in rows]
        total = sum(m.amount for m in meters)
        return pb.ExplainUsageResponse(meters=meters, total_amount=total, wallet=wallet)

    async def get_quota(self, project_id: str, name: str) -> pb.Quota:
        async with self._driver.read() as tx:
            return await q.quota(tx, project_id, name)

    async def list_quotas(self, project_id: str) -> list[pb.Quota]:
        async with self._driver.read() as tx:
            await q.wallet(tx, project_id)
            return await q.quotas(tx, project_id)

    async def get_reservation(self, reservation_id: str) -> pb.Reservation:
        async with self._driver.read() as tx:
            return await q.reservation(tx, reservation_id)

    async def get_snapshot(self, project_id: str) -> pb.ProjectSnapshot:
        async with self._driver.read() as tx:
            wallet = await q.wallet(tx, project_id)
            quotas = await q.quotas(tx, project_id)
            cursor = await q.last_cursor(tx)
        return pb.ProjectSnapshot(wallet=wallet, quotas=quotas, cursor=cursor)

    async def resolve_api_key(self, key_hash: str) -> pb.ApiKey:
        async with self._driver.read() as tx:
            row = await tx.fetchrow(f"{API_KEYS.select} WHERE key_hash = ?", key_hash)
        if row is None:
            raise NotFound("unknown API key")
        return API_KEYS.from_row(row)

    async def resolve_api_key_with_snapshot(
        self, key_hash: str
    ) -> tuple[pb.ApiKey, pb.ProjectSnapshot | None]:
        """The key and, when it is not revoked and its project has a wallet, that project's
        snapshot, read in one transaction."""
        async with self._driver.read() as tx:
            row = await tx.fetchrow(f"{API_KEYS.select} WHERE key_hash = ?", key_hash)
            if row is None:
                raise NotFound("unknown API key")
            key = API_KEYS.from_row(row)
            if key.revoked_at_ms or not key.project_id:
                return key, None
            try:
                wallet = await q.wallet(tx, key.project_id)
            except NotFound:
                return key, None
            quotas = await q.quotas(tx, key.project_id)
            cursor = await q.last_cursor(tx)
        return key, pb.ProjectSnapshot(wallet=wallet, quotas=quotas, cursor=cursor)

    # ------------------------------------------------------------ change log

    async def changes_after(self, cursor: int, limit: int) -> list[pb.WatchEvent]:
        async with self._driver.read() as tx:
            rows = await tx.fetch(
                "SELECT event FROM changes WHERE cursor > ? ORDER BY cursor LIMIT ?",
                cursor,
                max(limit, 1),
            )
        return [pb.WatchEvent.FromString(bytes(r[0])) for r in rows]

    async def last_cursor(self) -> int:
        async with self._driver.read() as tx:
            return await q.last_cursor(tx)

    async def oldest_cursor(self) -> int:
        async with self._driver.read() as tx:
            return int(await tx.fetchval("SELECT COALESCE(MIN(cursor), 0) FROM changes"))

    async def prune_changes(self, keep_after_ms: int) -> int:
        """Drop changes older than `keep_after_ms`, always keeping the newest (cursor floor)."""
        async with self._driver.write() as tx:
            newest = await q.last_cursor(tx)
            count = int(
                await tx.fetchval(
                    "SELECT COUNT(*) FROM changes WHERE occurred_at_ms < ? AND cursor < ?",
                    keep_after_ms,
                    newest,
                )
            )
            if count:
                await tx.execute(
                    "DELETE FROM changes WHERE occurred_at_ms < ? AND cursor < ?",
                    keep_after_ms,
                    newest,
                )
        return count

    # ------------------------------------------------------------ jobs

    async def expire_grace(self, now_ms: int) -> int:
        async with self._driver.write() as tx:
            work = Work(tx, now_ms)
            rows = await tx.fetch(
                f"{WALLETS.select} WHERE state = ? AND grace_until_ms <= ? ORDER BY project_id",
                domain.GRACE,
                now_ms,
            )
            for row in rows:
                wallet = wallet_from_row(row)
                t = domain.expire_grace(wallet.state, wallet.grace_until_ms, wallet.balance, now_ms)
                wallet.state = t.state
                await work.save_wallet(wallet, t.events)
            await work.flush()
        self._notify(work.last_cursor)
        return len(rows)

    async def expire_reservations(self, now_ms: int) -> int:
        async with self._driver.write() as tx:
            work = Work(tx, now_ms)
            rows = await tx.fetch(
                f"{RESERVATIONS.select} WHERE state = ? AND expires_at_ms <= ? "
                "ORDER BY reservation_id",
                pb.ACTIVE,
                now_ms,
            )
            released: dict[str, int] = {}
            for row in rows:
                res = RESERVATIONS.from_row(row)
                res.state = pb.EXPIRED_RESERVATION
                res.ended_at_ms = now_ms
                await q.save_reservation(tx, res)
                released[res.project_id] = released.get(res.project_id, 0) + res.amount
            for project_id, amount in released.items():
                wallet = await work.wallet(project_id)
                wallet.reserved -= amount
                await work.save_wallet(wallet)
            await work.flush()
        self._notify(work.last_cursor)
        return len(rows)

    # ------------------------------------------------------------ export / import / verify

    def export(self) -> AsyncIterator[pb.ExportRecord]:
        return transfer.export_records(self._driver)

    async def import_records(self, records: AsyncIterator[pb.ExportRecord]) -> pb.ImportResponse:
        return await transfer.import_records(self._driver, records)

    async def verify(self) -> list[str]:
        return await transfer.verify(self._driver)
