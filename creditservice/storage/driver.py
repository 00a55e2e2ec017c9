"""The narrow SQL interface the shared store logic needs from a backend (SQLite or PostgreSQL).

SQL is written once with `?` placeholders in the common subset of both dialects; a driver turns
it into its own form, runs it, and converts its errors into creditservice.errors at the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Row = Sequence[Any]


class Tx(Protocol):
    """One transaction on one connection."""

    async def execute(self, sql: str, *args: Any) -> None: ...
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None: ...

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """A `column IN (values)` condition (text values) and the parameters it takes."""
        ...


class Driver(Protocol):
    backend: str

    def write(self) -> AbstractAsyncContextManager[Tx]:
        """A read-write transaction; writers are serialized (one at a time, in commit order)."""
        ...

    def read(self) -> AbstractAsyncContextManager[Tx]:
        """A short read-only transaction that sees one consistent state."""
        ...

    def snapshot(self) -> AbstractAsyncContextManager[Tx]:
        """A long read-only transaction (export) that does not hold up reads or writes."""
        ...

    async def close(self) -> None: ...
