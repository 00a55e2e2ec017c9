"""The admission engine on a 3-master Redis Cluster: one slot per call, shards on every node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from admission import keys
from admission.decision import AdmitRequest, Reason
from admission.engine import AdmissionEngine
from admission.policy import Policy
from tests.fixtures_admission import (
    DictFiller,
    ShardClock,
    WalletSnapshot,
    new_project,
    outbox_events,
    wallet_of,
)

Engine = tuple[AdmissionEngine, DictFiller]


@pytest.fixture
async def cluster_engine(
    admission_cluster: aioredis.RedisCluster, admission_policy: Policy
) -> AsyncIterator[Engine]:
    filler = DictFiller(admission_cluster)
    engine = AdmissionEngine(admission_cluster, admission_policy, filler, gateway_id="gw-cl")
    yield engine, filler
    await engine.drain()


@pytest.fixture
async def cluster_clock(admission_cluster: aioredis.RedisCluster) -> AsyncIterator[ShardClock]:
    clock = ShardClock(admission_cluster)
    yield clock
    for shard in clock.touched:  # one key per call: each lives in its own slot
        await admission_cluster.delete(keys.clock_offset(shard))


def req(engine: AdmissionEngine, route: str, project: str) -> AdmitRequest:
    r = engine.policy.route(route)
    assert r is not None
    return engine.request_for(r, project)


async def spread_projects(
    engine: AdmissionEngine, filler: DictFiller, client: aioredis.RedisCluster, n: int
) -> list[str]:
    """n new projects whose shards cover every master (random names alone may miss one)."""
    await client.initialize()
    masters = {node.name for node in client.get_primaries()}
    projects: list[str] = []
    nodes: set[str] = set()
    while len(projects) < n or nodes != masters:
        p = new_project("cl")
        node = client.get_node_from_key(keys.wallet(engine.shard_of(p), p)).name
        if len(projects) >= n - len(masters - nodes) and node in nodes:
            continue  # keep the last places for masters not covered yet
        nodes.add(node)
        filler.projects[p] = WalletSnapshot(snap=1000)
        projects.append(p)
    assert len(masters) == 3 and len(projects) == n
    return projects


async def test_admit_commit_release_on_every_node(
    cluster_engine: Engine, admission_cluster: aioredis.RedisCluster
) -> None:
    engine, filler = cluster_engine
    projects = await spread_projects(engine, filler, admission_cluster, 16)
    ds = await asyncio.gather(*(engine.admit(req(engine, "chat", p)) for p in projects))
    assert all(d.admitted and d.hold is not None for d in ds), [
        (d.reason, d.detail) for d in ds if not d.admitted
    ]
    assert filler.calls == len(projects)
    outs = await asyncio.gather(
        *(
            engine.commit(d.hold, 4) if i % 2 else engine.release(d.hold)
            for i, d in enumerate(ds)
            if d.hold is not None
        )
    )
    assert all(o.ok for o in outs)
    for i, p in enumerate(projects):
        w = await wallet_of(admission_cluster, p)
        assert w["held"] == 0 and w["uns"] == (4 if i % 2 else 0)
        events = await outbox_events(admission_cluster, p)
        assert [e["k"] for e in events] == ["COMMIT" if i % 2 else "RELEASE"]


async def test_one_call_per_shard_per_tick(
    cluster_engine: Engine, admission_cluster: aioredis.RedisCluster
) -> None:
    engine, filler = cluster_engine
    projects = await spread_projects(engine, filler, admission_cluster, 16)
    await asyncio.gather(*(engine.admit(req(engine, "status", p)) for p in projects))  # warm
    trips = engine.stats.round_trips
    ds = await asyncio.gather(
        *(engine.admit(req(engine, "embed", p)) for p in projects for _ in range(3))
    )
    assert all(d.admitted for d in ds)
    shards = {engine.shard_of(p) for p in projects}
    # No cluster pipelines with EVALSHA (redis-py#2914): one concurrent call per shard.
    assert engine.stats.round_trips - trips == len(shards)


async def test_denials_and_quotas_on_cluster(
    cluster_engine: Engine, admission_cluster: aioredis.RedisCluster
) -> None:
    engine, filler = cluster_engine
    p = new_project("cl")
    filler.projects[p] = WalletSnapshot(snap=15, quotas={"requests": "rate:3:60"})
    a = await engine.admit(req(engine, "chat", p))
    assert a.admitted and a.quotas[0].limit == 3 and a.quotas[0].remaining == 2
    b = await engine.admit(req(engine, "chat", p))
    assert not b.admitted and b.reason is Reason.INSUFFICIENT_CREDITS
    assert (await engine.admit(req(engine, "models", p))).admitted
    assert (await engine.admit(req(engine, "models", p))).admitted
    c = await engine.admit(req(engine, "models", p))
    assert not c.admitted and c.reason is Reason.RATE_LIMITED and c.retry_after_seconds == 60
    bad = await engine.admit(AdmitRequest(p, "chat", cost=-5))
    assert bad.reason is Reason.INVALID_REQUEST
    unknown = await engine.admit(req(engine, "chat", new_project("cl")))
    assert unknown.reason is Reason.UNKNOWN_PROJECT


async def test_sweep_on_cluster(
    cluster_engine: Engine, admission_cluster: aioredis.RedisCluster, cluster_clock: ShardClock
) -> None:
    engine, filler = cluster_engine
    projects = await spread_projects(engine, filler, admission_cluster, 12)
    holds = []
    for p in projects:
        r = req(engine, "chat", p)
        d = await engine.admit(
            AdmitRequest(p, r.route, r.cost, r.meter, r.quotas, hold_ttl_seconds=1)
        )
        assert d.hold is not None
        holds.append(d.hold)
    for shard in {h.shard for h in holds}:
        await cluster_clock.advance(shard, 2000)
    assert await engine.sweep_expired() == len(holds)
    for h in holds:
        w = await wallet_of(admission_cluster, h.project_id)
        assert w["held"] == 0
        assert (
            int(await admission_cluster.get(keys.concurrency(h.shard, h.project_id, "concurrent")))
            == 0
        )
        assert [e["k"] for e in await outbox_events(admission_cluster, h.project_id)] == ["EXPIRE"]
        assert (await engine.commit(h)).state == "EXPIRED"


async def test_cancelled_caller_on_cluster(
    cluster_engine: Engine, admission_cluster: aioredis.RedisCluster
) -> None:
    engine, filler = cluster_engine
    p = new_project("cl")
    filler.projects[p] = WalletSnapshot(snap=100)
    await engine.admit(req(engine, "status", p))
    task = asyncio.create_task(engine.admit(req(engine, "chat", p)))
    await asyncio.sleep(0)  # one tick: queued, not yet sent
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.drain()
    w = await wallet_of(admission_cluster, p)
    assert w["held"] == 0
    assert [e["k"] for e in await outbox_events(admission_cluster, p)] == ["RELEASE"]
