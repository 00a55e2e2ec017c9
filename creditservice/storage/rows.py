"""Column layout of the storage tables and the conversions between rows and protobuf messages.

One `Table` per stored message; the column order here is the order every SELECT/INSERT uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from creditservice.storage.driver import Row
from creditservice.v1 import credit_pb2 as pb

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Table(Generic[M]):
    """A table whose columns map one to one onto fields of `message` (`renames`: column->field)."""

    name: str
    message: type[M]
    columns: tuple[str, ...]
    order_by: str
    renames: tuple[tuple[str, str], ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        renamed = dict(self.renames)
        return tuple(renamed.get(c, c) for c in self.columns)

    @property
    def select(self) -> str:
        return f"SELECT {', '.join(self.columns)} FROM {self.name}"

    @property
    def insert(self) -> str:
        marks = ", ".join("?" * len(self.columns))
        return f"INSERT INTO {self.name} ({', '.join(self.columns)}) VALUES ({marks})"

    def from_row(self, row: Row) -> M:
        return self.message(**dict(zip(self.fields, row, strict=True)))

    def values(self, msg: M) -> tuple[Any, ...]:
        return tuple(getattr(msg, f) for f in self.fields)


WALLETS = Table(
    "wallets",
    pb.Wallet,
    (
        "project_id",
        "organization_id",
        "balance",
        "reserved",
        "state",
        "low_balance_threshold",
        "grace_period_seconds",
        "grace_until_ms",
        "overdraft_limit",
        "version",
        "created_at_ms",
        "updated_at_ms",
    ),
    "project_id",
)
LEDGER = Table(
    "ledger",
    pb.LedgerEntry,
    (
        "seq",
        "project_id",
        "kind",
        "amount",
        "balance_after",
        "meter",
        "reference",
        "request_id",
        "description",
        "created_at_ms",
        "route",
        "quantity",
    ),
    "seq",
)
QUOTAS = Table(
    "quotas",
    pb.Quota,
    (
        "project_id",
        "name",
        "algorithm",
        "quota_limit",
        "window_seconds",
        "version",
        "updated_at_ms",
    ),
    "project_id, name",
    renames=(("quota_limit", "limit"),),
)
API_KEYS = Table(
    "api_keys",
    pb.ApiKey,
    ("key_id", "project_id", "name", "prefix", "created_at_ms", "revoked_at_ms"),
    "key_id",
)
RESERVATIONS = Table(
    "reservations",
    pb.Reservation,
    (
        "reservation_id",
        "project_id",
        "amount",
        "committed_amount",
        "state",
        "meter",
        "created_at_ms",
        "expires_at_ms",
        "ended_at_ms",
    ),
    "reservation_id",
)
APPLIED = Table(
    "applied_events",
    pb.AppliedEvent,
    ("event_id", "status", "error", "ledger_seq", "project_id"),
    "event_id",
)
IDEMPOTENCY = Table(
    "idempotency",
    pb.IdempotencyRecord,
    ("method", "request_id", "fingerprint", "code", "message", "response", "created_at_ms"),
    "method, request_id",
)


def wallet_from_row(row: Row) -> pb.Wallet:
    """A wallet with its derived `available` (balance minus active reservations)."""
    w = WALLETS.from_row(row)
    w.available = w.balance - w.reserved
    return w


def api_key_record_from_row(row: Row) -> pb.ApiKeyRecord:
    """Rows of `API_KEY_RECORD_SELECT`: the key's columns then its hash."""
    return pb.ApiKeyRecord(key=API_KEYS.from_row(row[:-1]), key_hash=row[-1])


API_KEY_RECORD_SELECT = f"SELECT {', '.join(API_KEYS.columns)}, key_hash FROM api_keys"
API_KEY_INSERT_COLUMNS: Sequence[str] = (*API_KEYS.columns, "key_hash")
