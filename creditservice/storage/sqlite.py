"""SQLite backend: stdlib sqlite3 in WAL mode behind the shared store logic.

sqlite3 blocks, so every connection lives on its own single-thread executor: one writer (BEGIN
IMMEDIATE, serialized by an asyncio lock), one reader for short reads, and a fresh connection per
long snapshot (export) so an export never holds up the rest. `:memory:` uses the writer for all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

from creditservice.errors import (
    AlreadyExists,
    FailedPrecondition,
    ServiceError,
    Unavailable,
)
from creditservice.storage.driver import Row, Tx
from creditservice.storage.sqlstore import SqlStore

T = TypeVar("T")
log = logging.getLogger("creditservice.storage.sqlite")


def convert_error(exc: sqlite3.Error) -> ServiceError:
    """sqlite3 errors as service errors (the caller keeps `exc` as __cause__)."""
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        if "UNIQUE" in text or "PRIMARY KEY" in text:
            return AlreadyExists(f"storage: {text}")
        return FailedPrecondition(f"storage: {text}")
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return Unavailable(f"storage busy: {text}")
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in text:
        return Unavailable(f"storage closed: {text}")
    return ServiceError(f"storage error: {text}")


class _Conn:
    """One sqlite3 connection confined to its own thread."""

    def __init__(self, path: str, *, uri: bool = False) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="creditservice-sqlite"
        )
        self._path = path
        self._uri = uri
        self.db: sqlite3.Connection | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self.db is None:
                raise sqlite3.ProgrammingError("the store is closed")
            return fn(self.db)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.Error as exc:
            raise convert_error(exc) from exc

    def submit(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """Queue `fn` behind the statements already sent, without waiting for it: the thread
        runs them in order, so whatever is sent next runs after it. Errors are logged."""

        def call() -> None:
            if self.db is not None:
                fn(self.db)

        def done(fut: concurrent.futures.Future[None]) -> None:
            exc = fut.exception()
            if exc is not None:
                log.error("SQLite: %s failed: %r", getattr(fn, "__name__", fn), exc)

        self._executor.submit(call).add_done_callback(done)

    async def open(self, *pragmas: str) -> None:
        def connect() -> None:
            db = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, uri=self._uri
            )
            for pragma in pragmas:
                db.execute(pragma)
            self.db = db

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open SQLite database {self._path!r}: {exc}") from exc

    async def close(self) -> None:
        if self.db is not None:
            db, self.db = self.db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)


class _SqliteTx:
    """A transaction's statements, each run in the connection's thread. The BEGIN goes with
    the first statement: one hop between the event loop and the thread less per transaction
    (a hop costs about as much as a small query)."""

    def __init__(self, conn: _Conn, begin: str) -> None:
        self._conn = conn
        self._begin: str | None = begin
        self.began = False  # a statement was sent: the transaction needs its COMMIT

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        begin = self._begin
        if begin is None:
            return await self._conn.run(fn)
        self._begin = None
        self.began = True
        opened = False

        def first(db: sqlite3.Connection) -> T:
            nonlocal opened
            db.execute(begin)
            opened = True
            return fn(db)

        try:
            return await self._conn.run(first)
        except ServiceError:
            if not opened:  # the BEGIN itself failed (busy): the next statement sends it again
                self._begin = begin
                self.began = False
            raise

    async def execute(self, sql: str, *args: Any) -> None:
        await self._run(lambda db: db.execute(sql, args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._run(lambda db: db.executemany(sql, rows))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._run(lambda db: db.execute(sql, args).fetchall())

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = await self._run(lambda db: db.execute(sql, args).fetchone())
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    async def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        marks = ", ".join("?" * len(columns))
        await self.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        # The batch is at most 10,000 ids, well under SQLite's 32,766 parameter limit.
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")


def _end_read(db: sqlite3.Connection) -> None:
    """Ends a read transaction (nothing to keep: a failed COMMIT rolls back)."""
    try:
        db.execute("COMMIT")
    except sqlite3.Error:
        _rollback(db)
        raise


class SqliteDriver:
    backend = "sqlite"

    def __init__(self, path: str) -> None:
        self._path = path
        self._memory = path == ":memory:"
        self._writer = _Conn(path)
        self._reader = self._writer if self._memory else _Conn(path)
        self._write_lock = asyncio.Lock()
        self._read_lock = self._write_lock if self._memory else asyncio.Lock()

    async def start(self) -> None:
        await self._writer.open("PRAGMA busy_timeout = 5000")
        if not self._memory:
            await self._writer.run(lambda db: db.execute("PRAGMA journal_mode = WAL"))
        await self._writer.run(lambda db: db.execute("PRAGMA synchronous = NORMAL"))
        schema = resources.files(__package__).joinpath("schema_sqlite.sql").read_text()
        await self._writer.run(lambda db: db.executescript(schema))
        if not self._memory:
            await self._reader.open("PRAGMA busy_timeout = 5000", "PRAGMA query_only = ON")

    async def close(self) -> None:
        async with self._write_lock:
            if self._reader is not self._writer:
                await self._reader.close()
            await self._writer.close()

    @asynccontextmanager
    async def _transaction(
        self, conn: _Conn, begin: str, *, read_only: bool = False
    ) -> AsyncIterator[Tx]:
        # A cancelled await does not stop the statement in the thread; the ROLLBACK queued
        # behind it on the same single-thread executor still undoes it, so the connection is
        # never left inside a transaction.
        tx = _SqliteTx(conn, begin)
        try:
            yield tx
        except BaseException:
            await conn.run(_rollback)
            raise
        if not tx.began:  # nothing was sent, not even the BEGIN
            return
        if read_only:
            # Nothing to wait for: the COMMIT runs before anything sent after it (one
            # thread, in order), and a read has nothing to lose. One hop less per read.
            conn.submit(_end_read)
            return
        try:
            await conn.run(lambda db: db.execute("COMMIT"))
        except BaseException:
            await conn.run(_rollback)
            raise

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Tx]:
        async with self._write_lock, self._transaction(self._writer, "BEGIN IMMEDIATE") as tx:
            yield tx

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        async with self._read_lock, self._transaction(self._reader, "BEGIN", read_only=True) as tx:
            yield tx

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Tx]:
        if self._memory:
            async with self.read() as tx:
                yield tx
            return
        conn = _Conn(self._path)
        await conn.open("PRAGMA busy_timeout = 5000", "PRAGMA query_only = ON")
        try:
            async with self._transaction(conn, "BEGIN", read_only=True) as tx:
                yield tx
        finally:
            await conn.close()


def path_of(url: str) -> str:
    """sqlite:////abs/path.db -> /abs/path.db; sqlite:///rel.db -> rel.db; sqlite://:memory:."""
    rest = url.removeprefix("sqlite:")
    if rest in ("//:memory:", ":memory:", "///:memory:"):
        return ":memory:"
    if rest.startswith("///"):
        return rest[3:]
    if rest.startswith("//"):
        return rest[2:]
    return rest


async def open_sqlite(url: str) -> SqlStore:
    driver = SqliteDriver(path_of(url))
    try:
        await driver.start()
    except BaseException:
        await driver.close()
        raise
    return SqlStore(driver)
