"""Fixtures of the admission tests: Redis clients, a test policy, a snapshot filler test double.

The filler stands in for the authority fill only: it writes the wallet hash exactly as
COMMON.md describes (snap ver state low od gu held uns unsl) and the quota overrides.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from admission import keys
from admission.authority import AuthorityClient, AuthorityClientConfig
from admission.engine import AdmissionEngine
from admission.errors import AuthorityUnavailable
from admission.policy import Policy, parse_policy
from admission.redis_client import RedisSettings, build_client
from admission.store import Client
from creditservice.server import AuthorityServer
from tests.services import RedisCluster, RedisProcess

TEST_POLICY = """
[settings]
shards = 16
max_cost = 1000000
unsettled_limit = 1000000
hold_ttl_seconds = 300
credit_retry_after_seconds = 30

[quotas.requests]
kind = "rate"
limit = 5
window_seconds = 60

[quotas.heavy]
kind = "rate"
limit = 10
window_seconds = 10

[quotas.concurrent]
kind = "concurrency"
limit = 2

[[routes]]
name = "chat"
method = "POST"
path = "/v1/chat/**"
cost = 10
commit = "overage"
quotas = ["requests", "concurrent"]

[[routes]]
name = "embed"
method = "POST"
path = "/v1/embed"
cost = 5
quotas = ["heavy"]
weight = 3

[[routes]]
name = "models"
method = "GET"
path = "/v1/models"
quotas = ["requests"]

[[routes]]
name = "status"
method = "GET"
path = "/v1/status"

[[routes]]
name = "shadowed"
method = "POST"
path = "/v1/shadow"
cost = 10
quotas = ["requests"]
shadow = true

[[routes]]
name = "lenient"
method = "POST"
path = "/v1/lenient"
cost = 1
on_redis_down = "allow"
"""


@dataclass
class WalletSnapshot:
    snap: int
    ver: int = 1
    state: int = 1
    low: int = 0
    od: int = 0
    gu: int = 0
    unsl: int = 1_000_000
    quotas: dict[str, str] = field(default_factory=dict)


class DictFiller:
    """SnapshotFiller test double: projects known to a dict, single flight per project."""

    def __init__(self, client: Client, shards: int = 16) -> None:
        self.client = client
        self.shards = shards
        self.projects: dict[str, WalletSnapshot] = {}
        self.calls = 0
        self.down = False
        self._inflight: dict[str, asyncio.Future[bool]] = {}

    async def fill(self, project_id: str) -> bool:
        fut = self._inflight.get(project_id)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[project_id] = fut
        try:
            result = await self._fill(project_id)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            del self._inflight[project_id]
        fut.set_result(result)
        return result

    async def _fill(self, project_id: str) -> bool:
        self.calls += 1
        if self.down:
            raise AuthorityUnavailable("test authority is down")
        snap = self.projects.get(project_id)
        if snap is None:
            return False
        await write_snapshot(self.client, project_id, snap, self.shards)
        return True


async def write_snapshot(
    client: Client, project_id: str, snap: WalletSnapshot, shards: int = 16
) -> None:
    shard = keys.shard_of(project_id, shards)
    await client.hset(  # type: ignore[misc]
        keys.wallet(shard, project_id),
        mapping={
            keys.W_SNAPSHOT: snap.snap,
            keys.W_VERSION: snap.ver,
            keys.W_STATE: snap.state,
            keys.W_LOW_THRESHOLD: snap.low,
            keys.W_OVERDRAFT: snap.od,
            keys.W_GRACE_UNTIL: snap.gu,
            keys.W_HELD: 0,
            keys.W_UNSETTLED: 0,
            keys.W_UNSETTLED_LIMIT: snap.unsl,
        },
    )
    qd = keys.quota_defs(shard, project_id)
    await client.delete(qd)
    if snap.quotas:
        await client.hset(qd, mapping=snap.quotas)  # type: ignore[misc]


def new_project(prefix: str = "p") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def admission_policy() -> Policy:
    return parse_policy(TEST_POLICY, "test-policy.toml")


# The production default (0.25 s) is for a healthy Redis; on a loaded shared test machine a
# first cluster contact (slot map, script loads) can take longer. The Redis-down test checks
# the defaults separately.
TEST_TIMEOUT_S = 2.0


@pytest.fixture
async def admission_redis(redis_proc: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = build_client(
        RedisSettings(
            url=redis_proc.url, socket_timeout_s=TEST_TIMEOUT_S, connect_timeout_s=TEST_TIMEOUT_S
        )
    )
    assert isinstance(client, aioredis.Redis)
    yield client
    await client.aclose()


@pytest.fixture
async def admission_cluster(
    redis_cluster_proc: RedisCluster,
) -> AsyncIterator[aioredis.RedisCluster]:
    client = build_client(
        RedisSettings(
            url=redis_cluster_proc.url,
            cluster=True,
            socket_timeout_s=TEST_TIMEOUT_S,
            connect_timeout_s=TEST_TIMEOUT_S,
        )
    )
    assert isinstance(client, aioredis.RedisCluster)
    yield client
    await client.aclose()


@pytest.fixture
async def admission_engine(
    admission_redis: aioredis.Redis, admission_policy: Policy
) -> AsyncIterator[tuple[AdmissionEngine, DictFiller]]:
    filler = DictFiller(admission_redis)
    engine = AdmissionEngine(admission_redis, admission_policy, filler, gateway_id="gw-test")
    yield engine, filler
    await engine.drain()


class ShardClock:
    """The virtual clock of the admission scripts: ms added to Redis TIME per shard."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.touched: set[int] = set()

    async def advance(self, shard: int, ms: int) -> None:
        self.touched.add(shard)
        await self.client.incrby(keys.clock_offset(shard), ms)

    async def reset(self) -> None:
        if self.touched:
            await self.client.delete(*(keys.clock_offset(s) for s in self.touched))
        self.touched.clear()


@pytest.fixture
async def shard_clock(admission_redis: aioredis.Redis) -> AsyncIterator[ShardClock]:
    clock = ShardClock(admission_redis)
    yield clock
    await clock.reset()


async def wallet_of(client: Client, project_id: str, shards: int = 16) -> dict[str, int]:
    raw = await client.hgetall(keys.wallet(keys.shard_of(project_id, shards), project_id))  # type: ignore[misc]
    return {k.decode(): int(v) for k, v in raw.items()}


async def outbox_events(client: Client, project_id: str, shards: int = 16) -> list[dict[str, str]]:
    entries = await client.xrange(keys.outbox(keys.shard_of(project_id, shards)))
    events = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
    return [e for e in events if e[keys.E_PROJECT] == project_id]


@pytest.fixture
async def rclient(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on a logical database only this test uses: its outbox streams are its own."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    await client.aclose()


def authority_client_for(srv: AuthorityServer) -> AuthorityClient:
    return AuthorityClient(
        AuthorityClientConfig(target=srv.grpc_target, token=srv.config.admin_token, timeout_s=2.0)
    )


@pytest.fixture
async def auth_client(authority: AuthorityServer) -> AsyncIterator[AuthorityClient]:
    async with authority_client_for(authority) as client:
        yield client


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()
