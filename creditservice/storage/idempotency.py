"""Idempotency of unary mutations: one record per (method, request_id) with its first outcome.

"Same parameters" means the same fingerprint: SHA-256 of the request's deterministic
serialization. A recorded success replays its response bytes; a recorded failure its error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from creditservice.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    from_code,
)
from creditservice.storage.driver import Row, Tx

R = TypeVar("R", bound=Message)

# Decisions of the store about the data, final for a request id; anything else (a driver error,
# Unavailable) may be transient and is not recorded.
RECORDABLE = (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition)
_CODES = {status.value[0]: status for status in grpc.StatusCode}


def fingerprint(req: Message) -> str:
    return hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    method: str
    request_id: str
    fingerprint: str

    async def lookup(self, tx: Tx) -> Row | None:
        return await tx.fetchrow(
            "SELECT fingerprint, code, message, response FROM idempotency "
            "WHERE method = ? AND request_id = ?",
            self.method,
            self.request_id,
        )

    def replay(self, prior: Sequence[object], resp_type: type[R]) -> R:
        """The recorded response, or the recorded error raised again."""
        stored_fp, code, message, response = prior
        if stored_fp != self.fingerprint:
            raise FailedPrecondition(
                f"request_id {self.request_id!r} was used for a different {self.method} request"
            )
        if code:
            status = _CODES.get(int(str(code)))
            raise from_code(status, str(message)) if status else ServiceError(str(message))
        assert isinstance(response, bytes | bytearray | memoryview)
        return resp_type.FromString(bytes(response))

    async def record(
        self,
        tx: Tx,
        now_ms: int,
        *,
        error: ServiceError | None = None,
        response: bytes = b"",
    ) -> None:
        sql = (
            "INSERT INTO idempotency (method, request_id, fingerprint, code, message, response, "
            "created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        code, message = (0, "") if error is None else (error.code.value[0], error.message)
        if error is not None:
            # A failure is recorded after its rollback, in a transaction of its own: a concurrent
            # first attempt may have recorded its outcome meanwhile, and the first one wins.
            sql += " ON CONFLICT (method, request_id) DO NOTHING"
        await tx.execute(
            sql, self.method, self.request_id, self.fingerprint, code, message, response, now_ms
        )
