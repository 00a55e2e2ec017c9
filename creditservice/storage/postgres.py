"""PostgreSQL backend: an asyncpg pool behind the shared store logic.

Writers are serialized (an in-process lock plus a transaction-scoped advisory lock, so several
authority processes on one database also commit one at a time); reads run in parallel in
REPEATABLE READ read-only transactions. `schema=NAME` in the DSN query selects a private schema.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from creditservice.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from creditservice.storage.driver import Row, Tx
from creditservice.storage.sqlstore import SqlStore

# Arbitrary constant naming "the creditservice writer" among advisory locks of this database.
_WRITER_LOCK_KEY = 0x6372656469747376
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")
_COPY_MIN_ROWS = 32
_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    OSError,
)


def convert_error(exc: BaseException) -> ServiceError:
    """asyncpg / socket errors as service errors (the caller keeps `exc` as __cause__)."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AlreadyExists(f"storage: {exc}")
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return FailedPrecondition(f"storage: {exc}")
    if isinstance(exc, _TRANSIENT):
        return Unavailable(f"storage unavailable: {exc}")
    return ServiceError(f"storage error: {exc}")


@lru_cache(maxsize=512)
def to_dollar(sql: str) -> str:
    """`?` placeholders as asyncpg's `$1, $2, ...` (the shared SQL has no `?` in literals)."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


class _PgTx:
    def __init__(self, conn: asyncpg.Connection, schema: str | None) -> None:
        self._conn = conn
        self._schema = schema

    async def execute(self, sql: str, *args: Any) -> None:
        try:
            await self._conn.execute(to_dollar(sql), *args)
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            raise convert_error(exc) from exc

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            await self._conn.executemany(to_dollar(sql), rows)
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            raise convert_error(exc) from exc

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            rows: list[Row] = await self._conn.fetch(to_dollar(sql), *args)
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            raise convert_error(exc) from exc
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        try:
            row: Row | None = await self._conn.fetchrow(to_dollar(sql), *args)
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            raise convert_error(exc) from exc
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self._conn.fetchval(to_dollar(sql), *args)
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            raise convert_error(exc) from exc

    async def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        if len(rows) < _COPY_MIN_ROWS:
            marks = ", ".join("?" * len(columns))
            await self.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
            )
            return
        try:
            await self._conn.copy_records_to_table(
                table, records=rows, columns=list(columns), schema_name=self._schema
            )
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            raise convert_error(exc) from exc

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        # Not `= ANY(?)`: a cached generic plan of that may scan the table; a join on unnest
        # keeps the index lookups whatever the plan.
        return f"{column} IN (SELECT unnest(?::text[]))", [list(values)]


class PostgresDriver:
    backend = "postgresql"

    def __init__(self, pool: asyncpg.Pool, schema: str | None) -> None:
        self._pool = pool
        self._schema = schema
        self._write_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _transaction(self, **options: Any) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire() as conn, conn.transaction(**options):
                yield conn
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            raise convert_error(exc) from exc

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Tx]:
        async with self._write_lock, self._transaction() as conn:
            tx = _PgTx(conn, self._schema)
            await tx.execute("SELECT pg_advisory_xact_lock(?)", _WRITER_LOCK_KEY)
            yield tx

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        async with self._transaction(isolation="repeatable_read", readonly=True) as conn:
            yield _PgTx(conn, self._schema)

    def snapshot(self) -> AbstractAsyncContextManager[Tx]:
        return self.read()


def split_dsn(dsn: str) -> tuple[str, str | None]:
    """The DSN without our `schema=` query parameter, and that schema name (validated)."""
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    if not schemas:
        return dsn, None
    schema = schemas[-1]
    if not _SCHEMA_NAME.match(schema):
        raise InvalidArgument(f"invalid schema name {schema!r}")
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


async def open_postgres(url: str) -> SqlStore:
    dsn, schema = split_dsn(url)
    settings = {"search_path": schema} if schema else {}
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _WRITER_LOCK_KEY)
                if schema:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                    await conn.execute(f'SET LOCAL search_path TO "{schema}"')
                ddl = resources.files(__package__).joinpath("schema_postgres.sql").read_text()
                await conn.execute(ddl)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=8, server_settings=settings, timeout=10
        )
    except (asyncpg.PostgresError, *_TRANSIENT) as exc:
        raise convert_error(exc) from exc
    return SqlStore(PostgresDriver(pool, schema))
