"""Session-scoped real services; function-scoped clients live in the tests that use them.

Each area keeps its fixtures in its own module, loaded here as a plugin.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import (
    RedisCluster,
    RedisProcess,
    private_postgres_database,
    start_redis,
    start_redis_cluster,
)

pytest_plugins = [
    "tests.fixtures_authority",
    "tests.fixtures_admission",
    "tests.fixtures_gateway",
]


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    proc = start_redis()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> str:
    """A logical database of the session redis-server that only this test uses."""
    return redis_proc.fresh_db_url()


@pytest.fixture(scope="session")
def redis_cluster_proc() -> Iterator[RedisCluster]:
    cluster = start_redis_cluster(3)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    with private_postgres_database() as dsn:
        yield dsn
