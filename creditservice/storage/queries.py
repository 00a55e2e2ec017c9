"""Small reads shared by the store's operations, and the opaque page tokens of its listings."""

from __future__ import annotations

import base64
import binascii

from creditservice.errors import InvalidArgument, NotFound
from creditservice.storage.driver import Tx
from creditservice.storage.rows import QUOTAS, RESERVATIONS, WALLETS, wallet_from_row
from creditservice.v1 import credit_pb2 as pb

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size_of(page_size: int) -> int:
    return DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)


def encode_token(kind: str, value: str | int) -> str:
    """An opaque page token: urlsafe base64 of `kind:last-key` (kind stops cross-use)."""
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode_token(kind: str, token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument("malformed page_token") from exc
    prefix, sep, value = raw.partition(":")
    if prefix != kind or not sep or not value:
        raise InvalidArgument("malformed page_token")
    return value


async def wallet(tx: Tx, project_id: str) -> pb.Wallet:
    row = await tx.fetchrow(f"{WALLETS.select} WHERE project_id = ?", project_id)
    if row is None:
        raise NotFound(f"project {project_id!r} has no wallet")
    return wallet_from_row(row)


async def quota(tx: Tx, project_id: str, name: str) -> pb.Quota:
    row = await tx.fetchrow(f"{QUOTAS.select} WHERE project_id = ? AND name = ?", project_id, name)
    if row is None:
        raise NotFound(f"project {project_id!r} has no quota {name!r}")
    return QUOTAS.from_row(row)


async def quotas(tx: Tx, project_id: str) -> list[pb.Quota]:
    rows = await tx.fetch(f"{QUOTAS.select} WHERE project_id = ? ORDER BY name", project_id)
    return [QUOTAS.from_row(r) for r in rows]


async def reservation(tx: Tx, reservation_id: str) -> pb.Reservation:
    row = await tx.fetchrow(f"{RESERVATIONS.select} WHERE reservation_id = ?", reservation_id)
    if row is None:
        raise NotFound(f"reservation {reservation_id!r} not found")
    return RESERVATIONS.from_row(row)


async def save_reservation(tx: Tx, res: pb.Reservation) -> None:
    await tx.execute(
        "UPDATE reservations SET state = ?, committed_amount = ?, ended_at_ms = ? "
        "WHERE reservation_id = ?",
        res.state,
        res.committed_amount,
        res.ended_at_ms,
        res.reservation_id,
    )


async def last_cursor(tx: Tx) -> int:
    return int(await tx.fetchval("SELECT COALESCE(MAX(cursor), 0) FROM changes"))
