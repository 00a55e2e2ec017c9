"""Settle: apply a gateway batch of ended holds in one transaction, deduplicated by event_id.

Hot path (thousands of events per call): one SELECT for the batch's known event ids, one for its
wallets, a plain loop per event, then bulk inserts; lifecycle computed once per wallet per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from creditservice import domain
from creditservice.storage.journal import WALLET_UPDATE, Work, wallet_update_values
from creditservice.storage.rows import APPLIED, LEDGER, WALLETS, wallet_from_row
from creditservice.v1 import credit_pb2 as pb

_APPLIED = pb.APPLIED
_DUPLICATE = pb.DUPLICATE
_REJECTED = pb.REJECTED
_COMMIT = pb.COMMIT
_USAGE = pb.USAGE
_KINDS = frozenset((pb.COMMIT, pb.RELEASE, pb.EXPIRE))


async def settle_batch(work: Work, events: Sequence[pb.SettlementEvent]) -> pb.SettleResponse:
    """Apply `events` within `work`'s transaction; results in request order.

    A known event answers DUPLICATE with its first result (REJECTED again if it was rejected);
    a repeat inside the batch counts as known. `wallets` holds every wallet an event of this
    batch was applied to or answered DUPLICATE for; only a wallet whose balance moved gets a
    new version and a change. A DUPLICATE's wallet matters: the gateway takes the event's
    amount off its unsettled sum when it acknowledges the answer, so it needs the balance that
    already includes the event (a re-sent batch whose first answer was lost).
    A COMMIT's USAGE entry records the event's `quantity`, the requests it stands for (0, as
    from a gateway older than the field, means 1); a negative quantity is REJECTED.
    """
    resp = pb.SettleResponse()
    if not events:
        return resp
    tx = work.tx
    now = work.now_ms

    cond, args = tx.in_list("event_id", list(dict.fromkeys(e.event_id for e in events)))
    known: dict[str, tuple[int, str, int]] = {
        r[0]: (r[1], r[2], r[3])
        for r in await tx.fetch(
            f"SELECT event_id, status, error, ledger_seq FROM applied_events WHERE {cond}", *args
        )
    }
    cond, args = tx.in_list("project_id", list(dict.fromkeys(e.project_id for e in events)))
    wallets = {
        w.project_id: w
        for w in map(wallet_from_row, await tx.fetch(f"{WALLETS.select} WHERE {cond}", *args))
    }
    balances = {pid: w.balance for pid, w in wallets.items()}

    seq = await work.next_seqs(len(events)) - 1  # unused seqs are not kept: MAX(seq) decides
    touched: dict[str, None] = {}
    ledger_rows: list[tuple[object, ...]] = []
    applied_rows: list[tuple[object, ...]] = []
    add_result = resp.results.add
    for e in events:
        eid = e.event_id
        first = known.get(eid)
        if first is not None:
            status, error, lseq = first
            if status != _REJECTED and e.project_id in wallets:
                touched[e.project_id] = None
            add_result(
                event_id=eid,
                status=_REJECTED if status == _REJECTED else _DUPLICATE,
                error=error,
                ledger_seq=lseq,
            )
            continue
        pid = e.project_id
        balance = balances.get(pid)
        kind = e.kind
        amount = e.amount
        quantity = e.quantity
        lseq = 0
        error = ""
        if balance is None:
            status, error = _REJECTED, f"unknown project {pid!r}"
        elif kind not in _KINDS or amount < 0:
            status, error = _REJECTED, "invalid settlement event (kind or amount)"
        elif quantity < 0:
            status = _REJECTED
            error = f"invalid settlement event (quantity must be >= 0, got {quantity})"
        else:
            status = _APPLIED
            touched[pid] = None
            if kind == _COMMIT and amount > 0:
                seq += 1
                lseq = seq
                balance -= amount
                balances[pid] = balance
                ledger_rows.append(
                    (seq, pid, _USAGE, -amount, balance, e.meter or domain.DEFAULT_METER,
                     eid, "", "", now, e.route, quantity or 1)
                )  # fmt: skip
        known[eid] = (status, error, lseq)
        applied_rows.append((eid, status, error, lseq, pid))
        add_result(event_id=eid, status=status, error=error, ledger_seq=lseq)

    updates = []
    for pid in touched:
        wallet = wallets[pid]
        if balances[pid] != wallet.balance:
            lifecycle = work.rebalance(wallet, balances[pid])
            work.bump(wallet)
            updates.append(wallet_update_values(wallet))
            await work.log_wallet(wallet, lifecycle)
        resp.wallets.append(wallet)
    if updates:
        await tx.executemany(WALLET_UPDATE, updates)
    if ledger_rows:
        await tx.insert_many(LEDGER.name, LEDGER.columns, ledger_rows)
    if applied_rows:
        await tx.insert_many(APPLIED.name, APPLIED.columns, applied_rows)
    return resp
