"""Redis clients for the admission path: short timeouts and no retries, so a dead Redis costs
one timeout (a 503 or a degraded allow), never seconds of redis-py's default backoff.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from admission.store import Client


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """How to reach Redis. `cluster` selects RedisCluster (the URL names one startup node)."""

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    socket_timeout_s: float = 0.25
    connect_timeout_s: float = 0.25
    max_connections: int = 64


def no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def build_client(settings: RedisSettings) -> Client:
    """A client for admission; close it with `await client.aclose()`."""
    if settings.cluster:
        return aioredis.RedisCluster.from_url(
            settings.url,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.connect_timeout_s,
            retry=no_retry(),
            max_connections=settings.max_connections,
        )
    # Blocking pool: a burst waits for a free connection (bounded by the timeout) instead of
    # failing at max_connections; batching keeps the number needed small anyway.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.connect_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=no_retry(),
    )
    # from_pool: the client owns the pool, so aclose() closes its connections too.
    return aioredis.Redis.from_pool(pool)


def build_waiting_client(settings: RedisSettings, wait_s: float) -> Client:
    """A client for blocking reads (XREADGROUP ... BLOCK): its socket timeout covers the wait.

    The admission client's short timeout would cut a blocking read off; this one is kept apart
    (two connections at most) so that the admission path keeps failing fast.
    """
    if settings.cluster:
        raise ValueError("a blocking read cannot cover a cluster's shards: poll instead")
    return build_client(
        replace(settings, socket_timeout_s=settings.socket_timeout_s + wait_s, max_connections=2)
    )
