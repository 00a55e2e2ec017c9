from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests import services
from tests.services import RedisCluster, RedisProcess, start_redis


async def test_redis_fixture_is_a_real_server(redis_proc: RedisProcess) -> None:
    r = aioredis.Redis.from_url(redis_proc.url)
    assert await r.ping()
    await r.aclose()


async def test_postgres_fixture_is_a_private_database(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    name = await conn.fetchval("select current_database()")
    await conn.close()
    assert name.startswith("cg_test_")


async def test_redis_cluster_fixture_has_three_masters(redis_cluster_proc: RedisCluster) -> None:
    rc = aioredis.RedisCluster(host="127.0.0.1", port=redis_cluster_proc.nodes[0].port)
    await rc.initialize()
    assert len(rc.get_primaries()) == 3
    await rc.aclose()


def test_postgres_dsn_from_the_environment_then_bootstrap_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/bootstrap.sh writes .pg-dsn.env when it starts PostgreSQL itself, so that the
    README's `scripts/bootstrap.sh && python3 -m pytest` finds it without CI's wrapper."""
    dsn_file = tmp_path / ".pg-dsn.env"
    monkeypatch.setattr(services, "_BOOTSTRAP_DSN_FILE", dsn_file)
    monkeypatch.delenv("CREDITGATE_TEST_PG_DSN", raising=False)
    assert services.postgres_admin_dsn() == "postgresql://postgres@127.0.0.1:5432/test"
    dsn_file.write_text("CREDITGATE_TEST_PG_DSN=postgresql://u:p@127.0.0.1:5432/postgres\n")
    assert services.postgres_admin_dsn() == "postgresql://u:p@127.0.0.1:5432/postgres"
    monkeypatch.setenv("CREDITGATE_TEST_PG_DSN", "postgresql://env@127.0.0.1:5432/test")
    assert services.postgres_admin_dsn() == "postgresql://env@127.0.0.1:5432/test"


def test_a_stopped_redis_leaves_no_directory_behind() -> None:
    node = start_redis()
    assert (node.workdir / "redis.log").exists()
    node.stop()
    assert node.proc.poll() is not None
    assert not node.workdir.exists()
