"""Flusher against a real Redis and a real authority: settle, ack exactly once, reclaim, reject."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from admission import keys
from admission.authority import AuthorityClient
from admission.cache import CacheFiller
from admission.decision import Hold, Reason
from admission.engine import AdmissionEngine
from admission.flusher import Flusher
from admission.policy import Policy, parse_policy
from admission.redis_client import RedisSettings, build_client, build_waiting_client
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc
from tests.fixtures_authority import admin_md, make_wallet, new_project_id
from tests.services import RedisCluster

SHARDS = 16

POLICY = """
[settings]
shards = 16
max_cost = 1000000
unsettled_limit = {unsl}
hold_ttl_seconds = 300

[[routes]]
name = "charge"
method = "POST"
path = "/charge"
cost = 10
commit = "overage"
"""


def make_policy(unsettled_limit: int = 1_000_000) -> Policy:
    return parse_policy(POLICY.format(unsl=unsettled_limit), "flusher-test.toml")


async def ledger_usage(stub: pb_grpc.CreditServiceAsyncStub, token: str, project_id: str) -> int:
    """Sum of USAGE charged in the authority ledger (positive), read page by page."""
    total: int = 0
    page = ""
    while True:
        reply = await stub.ListTransactions(
            pb.ListTransactionsRequest(project_id=project_id, page_size=1000, page_token=page),
            metadata=admin_md(token),
            timeout=10,
        )
        total += sum(int(-e.amount) for e in reply.entries if e.kind == pb.USAGE)
        page = reply.next_page_token
        if not page:
            return total


async def wallet_hash(client: aioredis.Redis, project_id: str) -> dict[str, int]:
    raw: dict[Any, Any] = await client.hgetall(
        keys.wallet(keys.shard_of(project_id, SHARDS), project_id)
    )
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


async def charge(engine: AdmissionEngine, project_id: str) -> Hold:
    route = engine.policy.route("charge")
    assert route is not None
    decision = await engine.admit(engine.request_for(route, project_id))
    assert decision.admitted, decision
    assert decision.hold is not None
    return decision.hold


# `rclient` (tests/fixtures_admission.py) is on a logical database of this test's own, so the
# outbox streams hold only this test's entries.


@pytest.fixture
async def engine(
    rclient: aioredis.Redis, auth_client: AuthorityClient, registry: CollectorRegistry
) -> AsyncIterator[AdmissionEngine]:
    policy = make_policy()
    filler = CacheFiller(
        rclient,
        auth_client,
        unsettled_limit=policy.settings.unsettled_limit,
        shards=SHARDS,
        registry=registry,
    )
    eng = AdmissionEngine(rclient, policy, filler, gateway_id="gw-flush")
    yield eng
    await eng.drain()
    await filler.aclose()


def flusher_for(
    rclient: aioredis.Redis,
    client: AuthorityClient,
    registry: CollectorRegistry,
    gateway_id: str = "flusher-test",
    **kw: Any,
) -> Flusher:
    return Flusher(rclient, client, shards=SHARDS, gateway_id=gateway_id, registry=registry, **kw)


async def drain_all(flusher: Flusher) -> int:
    total = 0
    while (n := await flusher.flush_once()) > 0:
        total += n
    return total


async def test_commits_and_releases_settle_exactly(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=1000)
    holds = [await charge(engine, pid) for _ in range(4)]
    committed = 0
    for hold, amount in zip(holds[:3], (7, 10, 25), strict=True):
        outcome = await engine.commit(hold, amount)
        assert outcome.ok, outcome
        committed += amount
    assert (await engine.release(holds[3])).ok
    before = await wallet_hash(rclient, pid)
    assert before[keys.W_UNSETTLED] == committed and before[keys.W_HELD] == 0

    flusher = flusher_for(rclient, auth_client, registry)
    assert await drain_all(flusher) == 4

    assert await ledger_usage(authority_stub, token, pid) == committed
    after = await wallet_hash(rclient, pid)
    assert after[keys.W_UNSETTLED] == 0
    assert after[keys.W_SNAPSHOT] == 1000 - committed
    assert after[keys.W_VERSION] > before[keys.W_VERSION]
    assert registry.get_sample_value("creditgate_settle_events_total", {"status": "applied"}) == 4
    assert registry.get_sample_value("creditgate_settle_requests_total") == 1

    await flusher.observe()
    shard = str(keys.shard_of(pid, SHARDS))
    assert registry.get_sample_value("creditgate_outbox_pending", {"shard": shard}) == 0


async def test_rejected_events_are_acked_counted_and_logged(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ghost = new_project_id("ghost")  # the authority has no wallet for it
    shard = keys.shard_of(ghost, SHARDS)
    flusher = flusher_for(rclient, auth_client, registry)
    await flusher.ensure_groups()
    await rclient.xadd(
        keys.outbox(shard),
        {
            keys.E_EVENT_ID: "evt-ghost-1",
            keys.E_KIND: "COMMIT",
            keys.E_PROJECT: ghost,
            keys.E_HOLD_ID: "evt-ghost-1",
            keys.E_HELD: "10",
            keys.E_AMOUNT: "10",
            keys.E_METER: "requests",
            keys.E_ROUTE: "charge",
            keys.E_TIME_MS: "1",
            keys.E_GATEWAY: "gw",
        },
    )
    with caplog.at_level(logging.ERROR, logger="admission.flusher"):
        assert await drain_all(flusher) == 1
    assert registry.get_sample_value("creditgate_settle_rejected_total") == 1
    assert "evt-ghost-1" in caplog.text
    pending = await rclient.xpending(keys.outbox(shard), keys.OUTBOX_GROUP)
    assert pending["pending"] == 0


async def test_dead_consumer_entries_are_reclaimed(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=500)
    for amount in (3, 4, 5):
        assert (await engine.commit(await charge(engine, pid), amount)).ok

    dead = flusher_for(rclient, auth_client, registry, gateway_id="dead")
    batch = await dead.read_batch()
    assert len(batch) == 3  # delivered to "dead", which never acknowledges

    live = flusher_for(rclient, auth_client, registry, gateway_id="live", claim_idle_ms=0)
    assert await drain_all(live) == 3
    assert await ledger_usage(authority_stub, token, pid) == 12
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0


async def test_an_entry_settled_before_its_flusher_died_leaves_redis_with_the_debit(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    """A flusher that sent a batch and died before acknowledging it (or whose reply was lost):
    the entry is reclaimed and re-sent, the authority answers DUPLICATE, and the ack takes the
    commit off `uns`. The reply must carry the wallet that includes the debit, or Redis keeps
    the balance from before it and admits on credit that no longer exists (no Watch here)."""
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100)
    assert (await engine.commit(await charge(engine, pid), 100)).ok  # overage: all of it

    dead = flusher_for(rclient, auth_client, registry, gateway_id="dead")
    reply = await dead.send(await dead.read_batch())  # applied; never acknowledged
    assert [r.status for r in reply.results] == [pb.APPLIED]

    live = flusher_for(rclient, auth_client, registry, gateway_id="live", claim_idle_ms=0)
    assert await drain_all(live) == 1
    assert await ledger_usage(authority_stub, token, pid) == 100
    wallet = await wallet_hash(rclient, pid)
    assert (wallet[keys.W_SNAPSHOT], wallet[keys.W_UNSETTLED]) == (0, 0), wallet
    route = engine.policy.route("charge")
    assert route is not None
    denied = await engine.admit(engine.request_for(route, pid))
    # The balance reached 0: the wallet is in GRACE, where chargeable requests are denied.
    assert not denied.admitted and denied.reason is Reason.WALLET_GRACE, denied


async def test_own_pending_entries_are_replayed_after_restart(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=500)
    assert (await engine.commit(await charge(engine, pid), 9)).ok
    first = flusher_for(rclient, auth_client, registry, gateway_id="same")
    assert len(await first.read_batch()) == 1  # "crash" before sending

    again = flusher_for(rclient, auth_client, registry, gateway_id="same")
    assert await drain_all(again) == 1  # replays its pending entries (id "0") first
    assert await ledger_usage(authority_stub, token, pid) == 9
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0


async def test_invalid_entry_is_isolated_and_reported_not_blocking(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=500)
    assert (await engine.commit(await charge(engine, pid), 6)).ok
    shard = keys.shard_of(pid, SHARDS)
    flusher = flusher_for(rclient, auth_client, registry)
    await flusher.ensure_groups()
    bad_id = await rclient.xadd(
        keys.outbox(shard),
        {
            keys.E_EVENT_ID: "evt-bad",
            keys.E_KIND: "COMMIT",
            keys.E_PROJECT: pid,
            keys.E_HOLD_ID: "evt-bad",
            keys.E_HELD: "0",
            keys.E_AMOUNT: str(10**16),  # above the authority's maximum amount
            keys.E_METER: "requests",
            keys.E_ROUTE: "charge",
            keys.E_TIME_MS: "1",
            keys.E_GATEWAY: "gw",
        },
    )
    assert (await engine.commit(await charge(engine, pid), 8)).ok

    assert await drain_all(flusher) == 2
    assert await ledger_usage(authority_stub, token, pid) == 14
    bad = bad_id.decode() if isinstance(bad_id, bytes) else bad_id
    assert (shard, bad) in flusher.poisoned
    pending = await rclient.xpending(keys.outbox(shard), keys.OUTBOX_GROUP)
    assert pending["pending"] >= 1  # kept, never silently dropped
    await flusher.observe()
    poison = registry.get_sample_value("creditgate_outbox_poison_entries", {"shard": str(shard)})
    assert poison is not None and poison >= 1


async def test_drain_flushes_everything_and_run_settles_in_background(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=10_000)
    committed = 0
    for i in range(25):
        assert (await engine.commit(await charge(engine, pid), i)).ok
        committed += i
    flusher = flusher_for(rclient, auth_client, registry, batch_size=7)
    assert await flusher.drain(10.0) == 25
    assert await ledger_usage(authority_stub, token, pid) == committed
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0


async def test_settles_on_redis_cluster(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    redis_cluster_proc: RedisCluster,
    auth_client: AuthorityClient,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    cluster = aioredis.RedisCluster.from_url(redis_cluster_proc.url, socket_timeout=5)
    try:
        policy = make_policy()
        filler = CacheFiller(cluster, auth_client, shards=SHARDS, registry=registry)
        eng = AdmissionEngine(cluster, policy, filler, gateway_id="gw-cluster")
        committed = 0
        pids = [new_project_id() for _ in range(4)]  # spread over shards, so over nodes
        for i, pid in enumerate(pids):
            await make_wallet(authority_stub, token, pid, balance=1000)
            assert (await eng.commit(await charge(eng, pid), 10 + i)).ok
            committed += 10 + i
        await eng.drain()
        flusher = Flusher(
            cluster, auth_client, shards=SHARDS, gateway_id="cluster", registry=registry
        )
        # Entries other test files left in the shared cluster are settled (rejected) too.
        await flusher.drain(15.0)
        await flusher.observe()
        for i, pid in enumerate(pids):
            raw = await cluster.hgetall(keys.wallet(keys.shard_of(pid, SHARDS), pid))
            assert int(raw[b"uns"]) == 0 and int(raw[b"snap"]) == 1000 - 10 - i
            assert await ledger_usage(authority_stub, token, pid) == 10 + i
        assert sum([await ledger_usage(authority_stub, token, p) for p in pids]) == committed
        cached = [p async for p in filler.store.cached_projects() if p in pids]
        assert sorted(cached) == sorted(pids)  # SCAN covers every node
        await filler.aclose()
    finally:
        await cluster.aclose()


async def test_cancelled_run_ends_promptly_and_drain_settles_the_rest(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100_000)
    committed = 0
    flusher = flusher_for(rclient, auth_client, registry, block_ms=5, batch_size=3)
    # Cancel at many different points of the cycle (Redis reads, Settle, ack, idle waits).
    for ticks in range(0, 60, 3):
        for amount in (1, 2):
            assert (await engine.commit(await charge(engine, pid), amount)).ok
            committed += amount
        runner = asyncio.create_task(flusher.run())
        for _ in range(ticks):
            await asyncio.sleep(0)  # let it run `ticks` steps, then cut it off there
        runner.cancel()
        async with asyncio.timeout(5):
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    await flusher.drain(10.0)
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0
    assert await ledger_usage(authority_stub, token, pid) == committed


async def test_drain_settles_entries_whose_read_reply_was_lost(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    """A run() cancelled while XREADGROUP's reply was in transit: the entries are delivered
    to this consumer (pending) but no cycle saw them. The shutdown drain must still settle them.
    """
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=1000)
    flusher = flusher_for(rclient, auth_client, registry)
    # A flusher that has been running: its start-up replay of its own pending list is done.
    assert await flusher.flush_once() == 0
    for amount in (3, 4):
        assert (await engine.commit(await charge(engine, pid), amount)).ok

    # Exactly what Redis did for the cancelled read: delivered, never processed.
    stream = keys.outbox(keys.shard_of(pid, SHARDS))
    delivered = await rclient.xreadgroup(keys.OUTBOX_GROUP, flusher.consumer, {stream: ">"})
    assert sum(len(entries) for _, entries in delivered) == 2

    assert await flusher.drain(5.0) == 2
    assert await ledger_usage(authority_stub, token, pid) == 7
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0


async def test_idle_wait_outlasts_the_admission_clients_socket_timeout(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    redis_url: str,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    """The gateway's Redis client gives up after 0.25 s; the flusher's idle read blocks longer
    on a client of its own, and an entry written while it blocks ends the wait at once."""
    settings = RedisSettings(url=redis_url)
    assert settings.socket_timeout_s < 0.4
    fast = build_client(settings)
    short_wait, long_wait = build_waiting_client(settings, 0.4), build_waiting_client(settings, 60)
    try:
        flusher = flusher_for(fast, auth_client, registry, block_ms=400, waiter=short_wait)
        assert await flusher.flush_once(block=True) == 0  # a whole block, no timeout error

        token = authority.config.admin_token
        pid = new_project_id()
        await make_wallet(authority_stub, token, pid, balance=1000)
        flusher = flusher_for(fast, auth_client, registry, block_ms=60_000, waiter=long_wait)
        waiting = asyncio.create_task(flusher.flush_once(block=True))
        async with asyncio.timeout(10):
            while True:
                clients = await fast.client_list()
                if any(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients):
                    break
                await asyncio.sleep(0.01)  # until Redis shows the read blocked, with a deadline
        assert (await engine.commit(await charge(engine, pid), 7)).ok
        async with asyncio.timeout(10):  # far less than the 60 s block
            assert await waiting == 1
        assert await ledger_usage(authority_stub, token, pid) == 7
    finally:
        for client in (fast, short_wait, long_wait):
            await client.aclose()


async def test_settling_resumes_after_redis_lost_the_consumer_group(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    """Redis restarted without its data (or flushed): the next commit's XADD makes the outbox
    stream again, without the consumer group, and reads answer NOGROUP. The running flusher
    makes the group again and settles; so does a shutdown drain."""
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=1000)
    stream = keys.outbox(keys.shard_of(pid, SHARDS))
    flusher = flusher_for(rclient, auth_client, registry, block_ms=20, backoff_initial_s=0.01)
    runner = asyncio.create_task(flusher.run())
    try:
        assert (await engine.commit(await charge(engine, pid), 3)).ok
        await wait_for_ledger(authority_stub, token, pid, 3)

        await rclient.delete(stream)  # the group goes with the stream
        assert (await engine.commit(await charge(engine, pid), 4)).ok
        await wait_for_ledger(authority_stub, token, pid, 7)
    finally:
        flusher.stop()
        async with asyncio.timeout(10):
            await runner

    await rclient.delete(stream)
    assert (await engine.commit(await charge(engine, pid), 5)).ok
    assert await flusher.drain(10.0) == 1
    assert await ledger_usage(authority_stub, token, pid) == 12


async def wait_for_ledger(
    stub: pb_grpc.CreditServiceAsyncStub, token: str, pid: str, amount: int
) -> None:
    async with asyncio.timeout(15):
        while True:
            if await ledger_usage(stub, token, pid) == amount:
                return
            await asyncio.sleep(0.02)  # polling the ledger, with a deadline


async def test_entries_carried_over_survive_a_read_that_fails(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    engine: AdmissionEngine,
    registry: CollectorRegistry,
) -> None:
    """A read brings more entries than a batch takes: the surplus is carried to the next batch,
    held only by this process once Redis loses its data. The next read then fails (NOGROUP);
    the carried entries are kept for the read after it and reach the ledger."""
    token = authority.config.admin_token
    a = new_project_id()
    b = new_project_id()
    while keys.shard_of(b, SHARDS) == keys.shard_of(a, SHARDS):
        b = new_project_id()
    for pid in (a, b):
        await make_wallet(authority_stub, token, pid, balance=1000)
        for amount in (1, 2):
            assert (await engine.commit(await charge(engine, pid), amount)).ok
    flusher = flusher_for(rclient, auth_client, registry, batch_size=3)
    assert await flusher.flush_once() == 3  # three of the four; one carried
    for pid in (a, b):
        await rclient.delete(keys.outbox(keys.shard_of(pid, SHARDS)))  # Redis lost its data
    with pytest.raises(Exception, match="NOGROUP"):
        await flusher.flush_once()
    await flusher.drain(10.0)  # settles it; its ack finds the entry gone with the old stream
    assert (
        await ledger_usage(authority_stub, token, a) + await ledger_usage(authority_stub, token, b)
        == 6
    )
