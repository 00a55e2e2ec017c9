from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from tests.services import RedisCluster, RedisProcess


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
