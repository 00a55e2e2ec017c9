"""The SQLite driver's transactions (creditservice/storage/sqlite.py): its BEGIN travels with the
first statement, so a BEGIN that fails must not leave the next statements outside a transaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from creditservice.errors import ServiceError
from creditservice.storage.sqlite import SqliteDriver


async def _count(driver: SqliteDriver) -> int:
    async with driver.read() as tx:
        return int(await tx.fetchval("SELECT count(*) FROM scratch"))


async def test_a_failed_begin_is_sent_again_and_keeps_the_transaction_atomic(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "a.db")
    holder, other = SqliteDriver(path), SqliteDriver(path)  # two processes on one file
    await holder.start()
    await other.start()
    try:
        async with holder.write() as tx:
            await tx.execute("CREATE TABLE scratch (x INTEGER)")
        # Fail at once instead of waiting 5 s for the lock.
        await other._writer.run(lambda db: db.execute("PRAGMA busy_timeout = 0"))
        with pytest.raises(RuntimeError, match="undo"):
            async with other.write() as tx:
                async with holder.write() as held:
                    await held.execute("INSERT INTO scratch VALUES (1)")
                    # The other writer's BEGIN IMMEDIATE meets the lock; its caller goes on.
                    with pytest.raises(ServiceError):
                        await tx.execute("INSERT INTO scratch VALUES (2)")
                await tx.execute("INSERT INTO scratch VALUES (3)")  # BEGIN sent again here
                raise RuntimeError("undo")
        # Rolled back: the statement after the failed BEGIN was inside a transaction.
        assert await _count(holder) == 1
        async with other.write() as tx:
            await tx.execute("INSERT INTO scratch VALUES (4)")
        assert await _count(holder) == 2
    finally:
        await other.close()
        await holder.close()


async def test_an_empty_transaction_sends_nothing(tmp_path: Path) -> None:
    driver = SqliteDriver(str(tmp_path / "b.db"))
    await driver.start()
    try:
        async with driver.write() as tx:
            pass
        assert not tx.began  # type: ignore[attr-defined]
        async with driver.read() as tx:
            assert await tx.fetchval("SELECT 1") == 1
        assert tx.began  # type: ignore[attr-defined]
    finally:
        await driver.close()


async def test_a_read_sees_every_write_committed_before_it(tmp_path: Path) -> None:
    """A read transaction's COMMIT is not waited for: it runs, in the reader's thread, before
    the next read's BEGIN. Were it still open, the next read would see the old snapshot (WAL)."""
    driver = SqliteDriver(str(tmp_path / "c.db"))
    await driver.start()
    try:
        async with driver.write() as tx:
            await tx.execute("CREATE TABLE scratch (x INTEGER)")
        for i in range(1, 51):
            async with driver.write() as tx:
                await tx.execute("INSERT INTO scratch VALUES (?)", i)
            assert await _count(driver) == i
        async with driver.snapshot() as tx:
            assert await tx.fetchval("SELECT max(x) FROM scratch") == 50
    finally:
        await driver.close()
