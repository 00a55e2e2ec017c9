"""One write transaction's bookkeeping: ledger seqs, change-log cursors, wallet saves.

Writers are serialized by the driver, so the next seq / cursor is the current maximum plus one and
numbers are handed out in commit order (a Watch reader never sees a later cursor commit first).
The change log keeps its newest row when pruned, so cursors never go back.
"""

from __future__ import annotations

from collections.abc import Iterable

from creditservice import domain
from creditservice.errors import FailedPrecondition
from creditservice.storage import queries
from creditservice.storage.driver import Tx
from creditservice.storage.rows import LEDGER
from creditservice.v1 import credit_pb2 as pb

CHANGE_COLUMNS = ("cursor", "project_id", "occurred_at_ms", "event")
WALLET_UPDATE = (
    "UPDATE wallets SET balance = ?, reserved = ?, state = ?, low_balance_threshold = ?, "
    "grace_period_seconds = ?, grace_until_ms = ?, overdraft_limit = ?, version = ?, "
    "updated_at_ms = ? WHERE project_id = ?"
)


def policy_of(w: pb.Wallet) -> domain.Policy:
    return domain.Policy(w.low_balance_threshold, w.grace_period_seconds, w.overdraft_limit)


def wallet_update_values(w: pb.Wallet) -> tuple[int | str, ...]:
    return (
        w.balance,
        w.reserved,
        w.state,
        w.low_balance_threshold,
        w.grace_period_seconds,
        w.grace_until_ms,
        w.overdraft_limit,
        w.version,
        w.updated_at_ms,
        w.project_id,
    )


class Work:
    """The changes a write transaction accumulates; `flush` writes the change log once."""

    def __init__(self, tx: Tx, now_ms: int) -> None:
        self.tx = tx
        self.now_ms = now_ms
        self._seq: int | None = None
        self._cursor: int | None = None
        self._changes: list[tuple[int, str, int, bytes]] = []
        self.last_cursor = 0

    async def next_seqs(self, count: int) -> int:
        """Reserve `count` consecutive ledger seqs; returns the first."""
        if self._seq is None:
            self._seq = int(await self.tx.fetchval("SELECT COALESCE(MAX(seq), 0) FROM ledger"))
        first = self._seq + 1
        self._seq += count
        return first

    async def next_cursor(self) -> int:
        if self._cursor is None:
            self._cursor = await queries.last_cursor(self.tx)
        self._cursor += 1
        return self._cursor

    async def emit(self, event: pb.WatchEvent, cursor: int = 0) -> int:
        """Append a change to this transaction's change log (cursor from `next_cursor` or given)."""
        event.cursor = cursor or await self.next_cursor()
        event.occurred_at_ms = self.now_ms
        self._changes.append(
            (event.cursor, event.project_id, self.now_ms, event.SerializeToString())
        )
        return event.cursor

    async def flush(self) -> None:
        if self._changes:
            await self.tx.insert_many("changes", CHANGE_COLUMNS, self._changes)
            self.last_cursor = self._changes[-1][0]
            self._changes = []

    # ------------------------------------------------------------ wallets

    async def wallet(self, project_id: str) -> pb.Wallet:
        return await queries.wallet(self.tx, project_id)

    def rebalance(self, w: pb.Wallet, new_balance: int) -> tuple[domain.Lifecycle, ...]:
        """Set the balance and the lifecycle state it implies; returns the events to emit."""
        t = domain.transition(w.state, w.grace_until_ms, new_balance, self.now_ms, policy_of(w))
        w.balance = new_balance
        w.state = t.state
        w.grace_until_ms = t.grace_until_ms
        return t.events

    def bump(self, w: pb.Wallet) -> None:
        w.version += 1
        w.updated_at_ms = self.now_ms
        w.available = w.balance - w.reserved

    async def save_wallet(self, w: pb.Wallet, events: Iterable[domain.Lifecycle] = ()) -> None:
        """Persist a changed wallet (new version) and log its snapshot and lifecycle events."""
        self.bump(w)
        await self.tx.execute(WALLET_UPDATE, *wallet_update_values(w))
        await self.log_wallet(w, events)

    async def log_wallet(self, w: pb.Wallet, events: Iterable[domain.Lifecycle]) -> None:
        await self.emit(pb.WatchEvent(project_id=w.project_id, wallet=w))
        for ev in events:
            await self.emit(lifecycle_event(w.project_id, ev))

    async def post(
        self,
        w: pb.Wallet,
        kind: pb.EntryKind.ValueType,
        amount: int,
        *,
        meter: str = "",
        reference: str = "",
        request_id: str = "",
        description: str = "",
        route: str = "",
        quantity: int = 0,
    ) -> pb.LedgerEntry:
        """Append one ledger entry, move the balance and save the wallet with its events."""
        after = w.balance + amount
        # Credits and adjustments are bounded; usage is never refused here (charged usage
        # is bounded by GRACE, overdraft and the per-amount maximum).
        if (amount > 0 and after > domain.MAX_BALANCE) or (
            kind == pb.ADJUSTMENT and after < -domain.MAX_BALANCE
        ):
            raise FailedPrecondition(
                f"the balance would be {after}, beyond the maximum of {domain.MAX_BALANCE} "
                "(either sign): refused"
            )
        entry = pb.LedgerEntry(
            seq=await self.next_seqs(1),
            project_id=w.project_id,
            kind=kind,
            amount=amount,
            balance_after=w.balance + amount,
            meter=meter,
            reference=reference,
            request_id=request_id,
            description=description,
            created_at_ms=self.now_ms,
            route=route,
            quantity=quantity,
        )
        await self.tx.execute(LEDGER.insert, *LEDGER.values(entry))
        events = self.rebalance(w, entry.balance_after)
        await self.save_wallet(w, events)
        return entry


def lifecycle_event(project_id: str, ev: domain.Lifecycle) -> pb.WatchEvent:
    return pb.WatchEvent(
        project_id=project_id,
        lifecycle=pb.LifecycleEvent(
            project_id=project_id,
            kind=ev.kind,
            from_state=ev.from_state,
            to_state=ev.to_state,
            balance=ev.balance,
            grace_until_ms=ev.grace_until_ms,
        ),
    )
