"""Export, import and verify: the logical stream that rebuilds an identical authority elsewhere.

Stream order: header, wallets (by project_id), quotas (project_id, name), API keys (key_id),
reservations (reservation_id), ledger entries (seq), applied events (event_id), idempotency
records (method, request_id), trailer. Digest rule: SHA-256 over every record before the trailer
(header included), each fed as an 8-byte big-endian length followed by
`record.SerializeToString(deterministic=True)`; the trailer carries its lowercase hex, the number
of records before it, the number of ledger entries and the sum of their amounts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from creditservice import domain
from creditservice.errors import FailedPrecondition, InvalidArgument
from creditservice.storage.driver import Driver, Row, Tx
from creditservice.storage.rows import (
    API_KEY_INSERT_COLUMNS,
    API_KEY_RECORD_SELECT,
    API_KEYS,
    APPLIED,
    IDEMPOTENCY,
    LEDGER,
    QUOTAS,
    RESERVATIONS,
    WALLETS,
    Table,
    api_key_record_from_row,
    wallet_from_row,
)
from creditservice.v1 import credit_pb2 as pb

FORMAT_VERSION = 1
CHUNK = 1000
_MAX_PROBLEMS = 100


@dataclass(frozen=True)
class _Section:
    """One kind of record: where its rows live and how a row becomes a record and back."""

    field: str
    table: str
    select: str
    key_columns: tuple[str, ...]
    columns: Sequence[str]
    to_record: Callable[[Row], pb.ExportRecord]
    to_row: Callable[[pb.ExportRecord], tuple[Any, ...]]


def _plain(field_name: str, table: Table[Any], keys: tuple[str, ...]) -> _Section:
    def to_record(row: Row) -> pb.ExportRecord:
        rec = pb.ExportRecord()
        getattr(rec, field_name).CopyFrom(table.from_row(row))
        return rec

    def to_row(rec: pb.ExportRecord) -> tuple[Any, ...]:
        return table.values(getattr(rec, field_name))

    return _Section(field_name, table.name, table.select, keys, table.columns, to_record, to_row)


SECTIONS: tuple[_Section, ...] = (
    _Section(
        "wallet",
        WALLETS.name,
        WALLETS.select,
        ("project_id",),
        WALLETS.columns,
        lambda row: pb.ExportRecord(wallet=wallet_from_row(row)),
        lambda rec: WALLETS.values(rec.wallet),
    ),
    _plain("quota", QUOTAS, ("project_id", "name")),
    _Section(
        "api_key",
        "api_keys",
        API_KEY_RECORD_SELECT,
        ("key_id",),
        API_KEY_INSERT_COLUMNS,
        lambda row: pb.ExportRecord(api_key=api_key_record_from_row(row)),
        lambda rec: (*API_KEYS.values(rec.api_key.key), rec.api_key.key_hash),
    ),
    _plain("reservation", RESERVATIONS, ("reservation_id",)),
    _plain("entry", LEDGER, ("seq",)),
    _plain("applied_event", APPLIED, ("event_id",)),
    _plain("idempotency", IDEMPOTENCY, ("method", "request_id")),
)
_BY_FIELD = {s.field: s for s in SECTIONS}


@dataclass
class Digest:
    """The running digest and counts of a stream (see the module docstring for the rule)."""

    sha: Any = field(default_factory=hashlib.sha256)
    records: int = 0
    ledger_entries: int = 0
    ledger_sum: int = 0

    def add(self, rec: pb.ExportRecord) -> None:
        data = rec.SerializeToString(deterministic=True)
        self.sha.update(len(data).to_bytes(8, "big"))
        self.sha.update(data)
        self.records += 1
        if rec.HasField("entry"):
            self.ledger_entries += 1
            self.ledger_sum += rec.entry.amount

    def trailer(self) -> pb.ExportTrailer:
        return pb.ExportTrailer(
            records=self.records,
            ledger_entries=self.ledger_entries,
            ledger_sum=self.ledger_sum,
            digest=self.sha.hexdigest(),
        )


async def _scan(tx: Tx, section: _Section) -> AsyncIterator[Row]:
    """Every row of a section in key order, fetched in chunks (keyset pagination)."""
    keys = ", ".join(section.key_columns)
    marks = ", ".join("?" * len(section.key_columns))
    last: tuple[Any, ...] | None = None
    while True:
        if last is None:
            rows = await tx.fetch(f"{section.select} ORDER BY {keys} LIMIT ?", CHUNK)
        else:
            rows = await tx.fetch(
                f"{section.select} WHERE ({keys}) > ({marks}) ORDER BY {keys} LIMIT ?",
                *last,
                CHUNK,
            )
        for row in rows:
            yield row
        if len(rows) < CHUNK:
            return
        last = tuple(rows[-1][: len(section.key_columns)])


async def export_records(driver: Driver) -> AsyncIterator[pb.ExportRecord]:
    digest = Digest()
    async with driver.snapshot() as tx:
        header = pb.ExportRecord(
            header=pb.ExportHeader(
                format_version=FORMAT_VERSION,
                source_backend=driver.backend,
                exported_at_ms=int(time.time() * 1000),
            )
        )
        digest.add(header)
        yield header
        for section in SECTIONS:
            async for row in _scan(tx, section):
                rec = section.to_record(row)
                digest.add(rec)
                yield rec
    yield pb.ExportRecord(trailer=digest.trailer())


async def _is_empty(tx: Tx) -> bool:
    for section in SECTIONS:
        if await tx.fetchrow(f"SELECT 1 FROM {section.table} LIMIT 1") is not None:
            return False
    return True


async def import_records(
    driver: Driver, records: AsyncIterator[pb.ExportRecord]
) -> pb.ImportResponse:
    """Load a stream into an empty store in one transaction: all of it, or nothing."""
    digest = Digest()
    wallets = 0
    trailer: pb.ExportTrailer | None = None
    async with driver.write() as tx:
        if not await _is_empty(tx):
            raise FailedPrecondition("import needs an empty store")
        pending: dict[str, list[tuple[Any, ...]]] = {s.field: [] for s in SECTIONS}
        async for rec in records:
            kind = rec.WhichOneof("record")
            if trailer is not None:
                raise InvalidArgument("records after the trailer")
            if kind == "trailer":
                trailer = rec.trailer
                continue
            if digest.records == 0:
                if kind != "header":
                    raise InvalidArgument("the stream must start with a header")
                if rec.header.format_version != FORMAT_VERSION:
                    raise InvalidArgument(f"unsupported export format {rec.header.format_version}")
            elif kind == "header" or kind is None:
                raise InvalidArgument(f"unexpected record {kind!r} in the stream")
            digest.add(rec)
            if kind == "header":
                continue
            section = _BY_FIELD[kind]
            wallets += kind == "wallet"
            batch = pending[kind]
            batch.append(section.to_row(rec))
            if len(batch) >= CHUNK:
                await tx.insert_many(section.table, section.columns, batch)
                batch.clear()
        if trailer is None:
            raise InvalidArgument("the stream ended without a trailer")
        expected = digest.trailer()
        if _trailer_key(trailer) != _trailer_key(expected):
            raise InvalidArgument(
                "export trailer does not match the records (digest or counts): refused"
            )
        for section in SECTIONS:
            if pending[section.field]:
                await tx.insert_many(section.table, section.columns, pending[section.field])
        # The digest proves the stream is whole, not that it is right: anyone can recompute
        # it. What the store derives from the ledger must agree with the ledger, as verify()
        # checks it, or the import would create (or lose) money.
        problems = await _problems(tx)
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise InvalidArgument(
                f"the export contradicts itself: {shown}{more}: refused, nothing imported"
            )
    return pb.ImportResponse(
        records=digest.records,
        wallets=wallets,
        ledger_entries=digest.ledger_entries,
        digest=expected.digest,
    )


def _trailer_key(t: Message) -> bytes:
    return t.SerializeToString(deterministic=True)


# ---------------------------------------------------------------- verify

_CHECKS: tuple[tuple[str, str], ...] = (
    (
        "SELECT w.project_id, w.balance, COALESCE(s.total, 0) FROM wallets w LEFT JOIN "
        "(SELECT project_id, CAST(SUM(amount) AS BIGINT) AS total FROM ledger "
        "GROUP BY project_id) s ON s.project_id = w.project_id "
        "WHERE w.balance <> COALESCE(s.total, 0) ORDER BY w.project_id",
        "wallet {0}: stored balance {1} != ledger sum {2}",
    ),
    (
        "SELECT seq, project_id, balance_after, running FROM (SELECT seq, project_id, "
        "balance_after, CAST(SUM(amount) OVER (PARTITION BY project_id ORDER BY seq "
        "ROWS UNBOUNDED PRECEDING) AS BIGINT) AS running FROM ledger) t "
        "WHERE running <> balance_after ORDER BY seq",
        "ledger seq {0} ({1}): balance_after {2} != running sum {3}",
    ),
    (
        "SELECT DISTINCT project_id FROM ledger "
        "WHERE project_id NOT IN (SELECT project_id FROM wallets) ORDER BY project_id",
        "ledger entries of {0}, which has no wallet",
    ),
    (
        "SELECT w.project_id, w.reserved, COALESCE(r.total, 0) FROM wallets w LEFT JOIN "
        "(SELECT project_id, CAST(SUM(amount) AS BIGINT) AS total FROM reservations "
        f"WHERE state = {pb.ACTIVE} GROUP BY project_id) r ON r.project_id = w.project_id "
        "WHERE w.reserved <> COALESCE(r.total, 0) ORDER BY w.project_id",
        "wallet {0}: stored reserved {1} != active reservations {2}",
    ),
    (
        f"SELECT seq, kind, amount FROM ledger WHERE (kind = {pb.USAGE} AND amount >= 0) "
        f"OR (kind IN ({pb.TOPUP}, {pb.REFUND}, {pb.SLA_CREDIT}) AND amount <= 0) "
        f"OR kind NOT IN ({pb.TOPUP}, {pb.USAGE}, {pb.REFUND}, {pb.SLA_CREDIT}, "
        f"{pb.ADJUSTMENT}) ORDER BY seq",
        "ledger seq {0}: kind {1} with amount {2} has the wrong sign",
    ),
    (
        # What the gateways' Redis scripts compute exactly (domain.MAX_BALANCE).
        f"SELECT project_id, balance FROM wallets WHERE balance > {domain.MAX_BALANCE} "
        f"OR balance < -{domain.MAX_BALANCE} ORDER BY project_id",
        f"wallet {{0}}: balance {{1}} beyond the maximum of {domain.MAX_BALANCE} (either sign)",
    ),
    (
        "SELECT a.event_id, a.ledger_seq FROM applied_events a LEFT JOIN ledger l "
        "ON l.seq = a.ledger_seq WHERE a.ledger_seq <> 0 "
        "AND (l.seq IS NULL OR l.reference <> a.event_id) ORDER BY a.event_id",
        "applied event {0}: ledger seq {1} is missing or not its entry",
    ),
)


async def verify(driver: Driver) -> list[str]:
    """Recompute what the store caches from the ledger; one line per disagreement."""
    async with driver.snapshot() as tx:
        return await _problems(tx)


async def _problems(tx: Tx) -> list[str]:
    problems: list[str] = []
    for sql, template in _CHECKS:
        rows = await tx.fetch(f"{sql} LIMIT {_MAX_PROBLEMS}")
        problems.extend(template.format(*r) for r in rows)
    rows = await tx.fetch(
        "SELECT project_id, state, balance, low_balance_threshold, grace_until_ms "
        "FROM wallets ORDER BY project_id"
    )
    for project_id, state, balance, threshold, grace_until in rows:
        if not domain.state_is_consistent(state, balance, threshold):
            problems.append(
                f"wallet {project_id}: state {pb.WalletState.Name(state)} "
                f"does not fit balance {balance} (threshold {threshold})"
            )
        elif (state in (domain.GRACE, domain.EXPIRED)) != (grace_until != 0):
            problems.append(f"wallet {project_id}: grace_until_ms {grace_until} in {state}")
    return problems
