"""Lease-mode admission (admission.lease) on a real Redis: local decisions, syncs, exactness.

Several LeaseAdmitters on one Redis stand for several gateway processes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from admission import keys, native
from admission.decision import Decision, QuotaKind, Reason, WalletState
from admission.engine import AdmissionEngine
from admission.lease import LeaseAdmitter, LocalLease
from admission.policy import MAX_AMOUNT, Policy, Route, parse_policy
from admission.store import LeaseOp, LeaseResult
from tests.fixtures_admission import (
    DictFiller,
    ShardClock,
    WalletSnapshot,
    new_project,
    outbox_events,
    wallet_of,
)
from tests.services import RedisProcess

POLICY = """
[settings]
shards = 4
unsettled_limit = 1000000
lease_sync_ms = 20
lease_ttl_ms = 2000
lease_idle_ms = 200

[quotas.requests]
kind = "rate"
limit = 50
window_seconds = 60

[quotas.concurrent]
kind = "concurrency"
limit = 3

[[routes]]
name = "work"
method = "POST"
path = "/work"
cost = 2
quotas = ["requests", "concurrent"]

[[routes]]
name = "free"
method = "GET"
path = "/free"
quotas = ["requests"]

[[routes]]
name = "tokens"
method = "POST"
path = "/tokens"
cost = 10
commit = "overage"

[[routes]]
name = "shadowed"
method = "POST"
path = "/shadow"
cost = 1000
shadow = true
"""

Factory = Callable[..., LeaseAdmitter]  # (cls=LeaseAdmitter): a subclass to intercept


@pytest.fixture
def policy() -> Policy:
    return parse_policy(POLICY, "lease-policy.toml")


@pytest.fixture
async def filler(rclient: aioredis.Redis) -> DictFiller:
    return DictFiller(rclient, shards=4)


@pytest.fixture
async def gateways(
    rclient: aioredis.Redis, policy: Policy, filler: DictFiller
) -> AsyncIterator[Factory]:
    """Makes LeaseAdmitters (each one a gateway process); closes the ones still open."""
    made: list[LeaseAdmitter] = []

    def make(cls: type[LeaseAdmitter] = LeaseAdmitter) -> LeaseAdmitter:
        engine = AdmissionEngine(rclient, policy, filler, gateway_id=f"gw{len(made)}")
        leases = cls(engine.store, policy, filler, route_problem=engine.route_problem)
        leases.start()
        made.append(leases)
        return leases

    yield make
    for leases in made:
        await leases.aclose()


def route(policy: Policy, name: str) -> Route:
    r = policy.route(name)
    assert r is not None
    return r


def project(filler: DictFiller, **snap: int) -> str:
    p = new_project()
    filler.projects[p] = WalletSnapshot(**snap)  # type: ignore[arg-type]
    return p


async def admit(leases: LeaseAdmitter, r: Route, p: str) -> Decision:
    return leases.try_admit(r, p) or await leases.admit(r, p)


async def test_first_request_fills_syncs_then_decides_locally(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    leases = gateways()
    p = project(filler, snap=1000)
    work = route(policy, "work")
    d = await admit(leases, work, p)
    assert d.admitted and d.hold is not None and d.hold.amount == 2
    assert d.wallet_state is WalletState.HEALTHY
    assert [(q.name, q.kind, q.limit) for q in d.quotas] == [
        ("requests", QuotaKind.RATE, 50),
        ("concurrent", QuotaKind.CONCURRENCY, 3),
    ]
    assert filler.calls == 1
    # The lease holds credits in Redis: held covers at least the request's hold.
    w = await wallet_of(rclient, p, 4)
    assert w["held"] >= 2
    waited = leases.stats.waited
    leases.end(d.hold, True)
    d2 = leases.try_admit(work, p)
    assert d2 is not None and d2.admitted, "the second request is decided without Redis"
    assert leases.stats.waited == waited
    assert d2.hold is not None
    leases.end(d2.hold, True)
    await leases.aclose()
    # Closed: nothing held, both commits in the outbox as one aggregated event.
    w = await wallet_of(rclient, p, 4)
    assert w["held"] == 0 and w["uns"] == 4
    events = await outbox_events(rclient, p, 4)
    commits = [e for e in events if e[keys.E_KIND] == "COMMIT"]
    assert sum(int(e[keys.E_AMOUNT]) for e in commits) == 4
    assert sum(int(e[keys.E_QUANTITY]) for e in commits) == 2
    assert {e[keys.E_ROUTE] for e in commits} == {"work"}


async def test_rate_limit_is_exact_for_one_gateway(
    gateways: Factory, policy: Policy, filler: DictFiller
) -> None:
    leases = gateways()
    p = project(filler, snap=10**6)
    free = route(policy, "free")
    decisions = [await admit(leases, free, p) for _ in range(60)]
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 50
    assert all(d.admitted for d in decisions[:50])
    denied = decisions[50]
    assert denied.reason is Reason.RATE_LIMITED
    assert denied.retry_after_seconds is not None and 1 <= denied.retry_after_seconds <= 60
    assert [q.remaining for q in denied.quotas] == [0]


async def test_rate_limit_is_exact_across_gateways(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    a, b, c = gateways(), gateways(), gateways()
    p = project(filler, snap=10**6)
    free = route(policy, "free")

    async def drive(leases: LeaseAdmitter, n: int) -> int:
        ok = 0
        for _ in range(n):
            batch = await asyncio.gather(*(admit(leases, free, p) for _ in range(5)))
            ok += sum(d.admitted for d in batch)
        return ok

    counts = await asyncio.gather(drive(a, 20), drive(b, 20), drive(c, 20))
    assert sum(counts) <= 50
    for leases in (a, b, c):
        await leases.aclose()
    # After every lease is handed back, the log holds exactly the admitted units.
    shard = keys.shard_of(p, 4)
    total = await rclient.get(keys.rate_sum(shard, p, "requests"))
    assert int(total or 0) == sum(counts)
    assert sum(counts) >= 40, f"leases fragmented the quota too much: {counts}"


async def test_concurrency_pool_and_release(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    leases = gateways()
    p = project(filler, snap=10**6)
    work = route(policy, "work")
    held = [await admit(leases, work, p) for _ in range(3)]
    assert all(d.admitted for d in held)
    d = await admit(leases, work, p)
    assert not d.admitted and d.reason is Reason.CONCURRENCY_LIMITED
    assert d.retry_after_seconds == 1
    shard = keys.shard_of(p, 4)
    assert int(await rclient.get(keys.concurrency(shard, p, "concurrent")) or 0) <= 3
    first = held[0].hold
    assert first is not None
    leases.end(first, False)
    d = await admit(leases, work, p)
    assert d.admitted
    for x in (*held[1:], d):
        assert x.hold is not None
        leases.end(x.hold, True)
    await leases.aclose()
    assert int(await rclient.get(keys.concurrency(shard, p, "concurrent")) or 0) == 0
    w = await wallet_of(rclient, p, 4)
    assert w["held"] == 0 and w["uns"] == 2 * 3  # 3 commits of 2; the release charged nothing


async def test_credits_never_overadmitted_across_gateways(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    a, b = gateways(), gateways()
    p = project(filler, snap=101)  # 50 requests of 2 fit, the 51st does not
    tokens = route(policy, "work")

    async def drive(leases: LeaseAdmitter) -> int:
        ok = 0
        for _ in range(40):
            d = await admit(leases, tokens, p)
            if d.admitted:
                assert d.hold is not None
                leases.end(d.hold, True)
                ok += 1
            else:
                assert d.reason in (Reason.INSUFFICIENT_CREDITS, Reason.RATE_LIMITED)
        return ok

    counts = await asyncio.gather(drive(a), drive(b))
    assert sum(counts) <= 50
    await a.aclose()
    await b.aclose()
    w = await wallet_of(rclient, p, 4)
    assert w["held"] == 0
    assert w["uns"] == 2 * sum(counts) <= 101


async def test_overage_commit_and_release(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    leases = gateways()
    p = project(filler, snap=1000)
    tokens = route(policy, "tokens")
    d1 = await admit(leases, tokens, p)
    d2 = await admit(leases, tokens, p)
    d3 = await admit(leases, tokens, p)
    assert d1.hold and d2.hold and d3.hold
    assert leases.end(d1.hold, True, 25).amount == 25  # overage route: above the hold
    assert leases.end(d2.hold, True, 3).amount == 3
    assert leases.end(d3.hold, False).state == "RELEASED"
    await leases.aclose()
    w = await wallet_of(rclient, p, 4)
    assert w["held"] == 0 and w["uns"] == 28
    events = [e for e in await outbox_events(rclient, p, 4) if e[keys.E_KIND] == "COMMIT"]
    assert sum(int(e[keys.E_AMOUNT]) for e in events) == 28
    assert sum(int(e[keys.E_HELD]) for e in events) == 20
    assert sum(int(e[keys.E_QUANTITY]) for e in events) == 2


async def test_a_commit_of_a_bad_amount_releases_the_hold_and_says_so(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    """A bool, a float, a negative or an oversized amount charges nothing: the hold is
    released and the outcome is INVALID (the same compiled and as Python source)."""
    leases = gateways()
    p = project(filler, snap=1000)
    tokens = route(policy, "tokens")
    for bad in (True, 2.0, -1, MAX_AMOUNT + 1):
        hold = (await admit(leases, tokens, p)).hold
        assert hold is not None
        outcome = leases.end(hold, True, bad)
        assert (outcome.ok, outcome.state, outcome.amount) == (False, "INVALID", 0), bad
        assert repr(bad) in outcome.detail
    good = (await admit(leases, tokens, p)).hold
    assert good is not None
    assert leases.end(good, True, 7).amount == 7
    await leases.aclose()
    w = await wallet_of(rclient, p, 4)
    assert w["held"] == 0 and w["uns"] == 7
    events = [e for e in await outbox_events(rclient, p, 4) if e[keys.E_KIND] == "COMMIT"]
    assert [int(e[keys.E_AMOUNT]) for e in events] == [7]


async def test_end_local_takes_no_commit_that_is_not_an_int(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    """end_local (the middleware's path) never takes a float: compiled, its int parameter
    refuses it with TypeError; run as source, its own check answers INVALID. A float that got
    through would make every later sync of the lease fail in the script: a good commit after
    it still reaches the outbox."""
    leases = gateways()
    p = project(filler, snap=1000)
    tokens = route(policy, "tokens")
    hold = (await admit(leases, tokens, p)).hold
    assert hold is not None
    if native.status().compiled:
        with pytest.raises(TypeError):
            leases.end_local(hold, True, 2.0)  # type: ignore[arg-type]
        assert leases.end_local(hold, False, 0) is None
    else:
        outcome = leases.end_local(hold, True, 2.0)  # type: ignore[arg-type]
        assert outcome is not None and (outcome.ok, outcome.state) == (False, "INVALID")
    good = (await admit(leases, tokens, p)).hold
    assert good is not None
    assert leases.end_local(good, True, 7) is None
    assert await leases.flush(5.0)
    await leases.aclose()
    events = [e for e in await outbox_events(rclient, p, 4) if e[keys.E_KIND] == "COMMIT"]
    assert [int(e[keys.E_AMOUNT]) for e in events] == [7]
    assert (await wallet_of(rclient, p, 4))["held"] == 0


async def test_commits_summed_past_what_one_event_may_carry_are_split(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    """Commits of one route end up summed into one outbox event per sync, but the authority
    refuses an event above MAX_AMOUNT (10^15): such an event would never be charged. Each
    commit alone is within the cap; their sum opens a second event instead."""
    leases = gateways()
    p = project(filler, snap=1000)
    tokens = route(policy, "tokens")
    holds = [(await admit(leases, tokens, p)).hold for _ in range(3)]
    big = 6 * 10**14
    for hold in holds:
        assert hold is not None
        assert leases.end(hold, True, big).amount == big  # all three before the next sync
    await leases.aclose()
    events = [e for e in await outbox_events(rclient, p, 4) if e[keys.E_KIND] == "COMMIT"]
    amounts = sorted(int(e[keys.E_AMOUNT]) for e in events)
    assert amounts == [big, 2 * big] or amounts == [big, big, big], amounts
    assert all(int(e[keys.E_AMOUNT]) <= MAX_AMOUNT for e in events)
    assert sum(int(e[keys.E_QUANTITY]) for e in events) == 3
    assert len({e[keys.E_EVENT_ID] for e in events}) == len(events)
    assert (await wallet_of(rclient, p, 4))["uns"] == 3 * big


async def test_low_balance_counts_what_is_in_flight_not_what_the_lease_holds(
    gateways: Factory, policy: Policy, filler: DictFiller
) -> None:
    """The LOW warning as hold mode gives it (snap - uns - held < low, held = credits of holds
    in flight): a lease's unused credits are not spent. Balance 1000, threshold 975, cost 10:
    the third request in flight is the first one below the threshold."""
    leases = gateways()
    p = project(filler, snap=1000, low=975)
    tokens = route(policy, "tokens")
    decisions = [await admit(leases, tokens, p) for _ in range(3)]
    assert [d.low_balance for d in decisions] == [False, False, True]
    for d in decisions:
        assert d.hold is not None
        leases.end(d.hold, False)
    fourth = await admit(leases, tokens, p)
    assert not fourth.low_balance and fourth.hold is not None  # 10 in flight, room 25
    leases.end(fourth.hold, False)
    # Spent: 1000 - 30 is below 975 with nothing in flight, before the commits reach Redis
    # (counted here) and after (counted in the room the sync answers).
    again = [await admit(leases, tokens, p) for _ in range(2)]
    for d in again:
        assert d.hold is not None
        leases.end(d.hold, True, 15)
    unsynced = leases.try_admit(tokens, p)
    assert unsynced is not None and unsynced.low_balance and unsynced.hold is not None
    leases.end(unsynced.hold, False)
    await leases.flush()
    assert (await admit(leases, tokens, p)).low_balance


async def test_commit_above_hold_without_overage_is_released(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    leases = gateways()
    p = project(filler, snap=1000)
    d = await admit(leases, route(policy, "work"), p)
    assert d.hold is not None
    out = leases.end(d.hold, True, 3)
    assert not out.ok and out.state == "RELEASED"
    await leases.aclose()
    w = await wallet_of(rclient, p, 4)
    assert w["held"] == 0 and w["uns"] == 0


async def test_wallet_states_and_unknown_project(
    gateways: Factory, policy: Policy, filler: DictFiller
) -> None:
    leases = gateways()
    work, free = route(policy, "work"), route(policy, "free")
    grace = project(filler, snap=0, state=int(WalletState.GRACE))
    d = await admit(leases, work, grace)
    assert not d.admitted and d.reason is Reason.WALLET_GRACE and d.retry_after_seconds == 30
    assert (await admit(leases, free, grace)).admitted, "free routes pass in GRACE"
    expired = project(filler, snap=0, state=int(WalletState.EXPIRED))
    d = await admit(leases, free, expired)
    assert not d.admitted and d.reason is Reason.WALLET_EXPIRED
    d = await admit(leases, work, "nobody-knows-me")
    assert not d.admitted and d.reason is Reason.UNKNOWN_PROJECT
    poor = project(filler, snap=1)
    d = await admit(leases, work, poor)
    assert not d.admitted and d.reason is Reason.INSUFFICIENT_CREDITS
    backlog = project(filler, snap=1000, unsl=3)
    assert (await admit(leases, work, backlog)).admitted
    d = await admit(leases, work, backlog)
    assert not d.admitted and d.reason is Reason.SETTLEMENT_BACKLOG


async def test_shadow_route_never_denies_and_takes_nothing(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    leases = gateways()
    p = project(filler, snap=5)
    d = await admit(leases, route(policy, "shadowed"), p)
    assert d.admitted and d.shadow and d.would_deny is Reason.INSUFFICIENT_CREDITS
    assert d.hold is None
    await leases.aclose()
    assert (await wallet_of(rclient, p, 4))["held"] == 0


async def test_topup_reaches_decisions_after_invalidate(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    leases = gateways()
    p = project(filler, snap=1)
    work = route(policy, "work")
    assert (await admit(leases, work, p)).reason is Reason.INSUFFICIENT_CREDITS
    shard = keys.shard_of(p, 4)
    await rclient.hset(keys.wallet(shard, p), keys.W_SNAPSHOT, 100)  # type: ignore[misc]
    leases.invalidate(p)
    assert (await admit(leases, work, p)).admitted


async def test_dead_gateway_lease_expires_and_returns_credits(
    gateways: Factory,
    policy: Policy,
    filler: DictFiller,
    rclient: aioredis.Redis,
) -> None:
    shard_clock = ShardClock(rclient)
    dead = gateways()
    p = project(filler, snap=1000)
    d = await admit(dead, route(policy, "work"), p)
    assert d.admitted
    # The process "dies": its sync task stops, nothing is handed back.
    dead._stopping = True
    dead._wake.set()
    shard = keys.shard_of(p, 4)
    w = await wallet_of(rclient, p, 4)
    assert w["held"] > 0
    engine = AdmissionEngine(rclient, policy, filler, gateway_id="sweeper")
    assert await engine.sweep_expired() == 0, "not due yet"
    await shard_clock.advance(shard, policy.settings.lease_ttl_ms + 1)
    assert await engine.sweep_expired() >= 1
    w = await wallet_of(rclient, p, 4)
    assert w["held"] == 0
    assert int(await rclient.get(keys.concurrency(shard, p, "concurrent")) or 0) == 0
    # The leased rate units stay counted (a dead gateway may have used them).
    assert int(await rclient.get(keys.rate_sum(shard, p, "requests")) or 0) >= 1
    expired = [e for e in await outbox_events(rclient, p, 4) if e[keys.E_KIND] == "EXPIRE"]
    assert len(expired) == 1


async def test_redis_down_follows_route_policy(policy: Policy) -> None:
    from admission.redis_client import RedisSettings, build_client

    client = build_client(
        RedisSettings(url="redis://127.0.0.1:1/0", socket_timeout_s=0.2, connect_timeout_s=0.2)
    )
    filler = DictFiller(client, shards=4)
    engine = AdmissionEngine(client, policy, filler, gateway_id="gw-down")
    leases = LeaseAdmitter(engine.store, policy, filler, route_problem=engine.route_problem)
    leases.start()
    try:
        d = await admit(leases, route(policy, "work"), "p-down")
        assert not d.admitted and d.reason is Reason.UNAVAILABLE and d.retry_after_seconds == 1
    finally:
        await leases.aclose()
        await client.aclose()


async def test_idle_lease_is_closed(
    rclient: aioredis.Redis, policy: Policy, filler: DictFiller
) -> None:
    """Driven by hand (no sync task) on a manual clock: nothing waits for time to pass."""
    now = [1000.0]
    engine = AdmissionEngine(rclient, policy, filler, gateway_id="gw-idle")
    leases = LeaseAdmitter(
        engine.store, policy, filler, route_problem=engine.route_problem, clock=lambda: now[0]
    )
    p = project(filler, snap=1000)
    task = asyncio.ensure_future(leases.admit(route(policy, "free"), p))
    async with asyncio.timeout(10):
        while not task.done():
            await leases.sync_round()
            await asyncio.wait({task}, timeout=0.01)  # the cache fill runs meanwhile
    assert task.result().admitted
    shard = keys.shard_of(p, 4)
    assert await leases.sync_round() == 0, "nothing due yet"
    now[0] += policy.settings.lease_sync_ms / 1000 + 0.001
    assert await leases.sync_round() == 1, "a used lease syncs every interval"
    now[0] += policy.settings.lease_idle_ms / 1000 + 0.001
    assert await leases.sync_round() == 1 and leases.stats.closed == 1
    assert not leases.leases
    assert not await rclient.zcard(keys.hold_expiry(shard))
    # Only the closed lease's tombstone is left (it answers a re-sent CLOSE).
    (left,) = [k async for k in rclient.scan_iter(match=keys.lease(shard, "*"))]
    assert set(await rclient.hkeys(left)) == {b"seq", b"closed", b"last"}
    assert int(await rclient.get(keys.rate_sum(shard, p, "requests")) or 0) == 1
    await leases.aclose()


async def test_a_sync_asks_for_what_lasts_until_the_grant_after_it(
    rclient: aioredis.Redis, policy: Policy, filler: DictFiller
) -> None:
    """A busy event loop stretches the sync cycle well past lease_sync_ms. A grant sized for
    three intervals of demand then ran out before the next one landed, and requests waited for
    syncs (one in seven at saturation in bench/gateway_bench.py). A sync asks for 1.5 x (the
    measured cycle + the last round trip) of demand when that is more, up to a cap. Driven by
    hand on a manual clock; each round trip "takes" rtt[0] seconds of it."""
    now = [1000.0]
    rtt = [0.0]
    engine = AdmissionEngine(rclient, policy, filler, gateway_id="gw-horizon")
    store = engine.store
    run_leases = store.run_leases

    async def late_replies(ops: Any) -> Any:
        replies = await run_leases(ops)
        now[0] += rtt[0]
        return replies

    store.run_leases = late_replies  # type: ignore[method-assign]
    leases = LeaseAdmitter(
        store, policy, filler, route_problem=engine.route_problem, clock=lambda: now[0]
    )
    p = project(filler, snap=10**9)
    tokens = route(policy, "tokens")  # 10 credits, no quota
    task = asyncio.ensure_future(leases.admit(tokens, p))
    async with asyncio.timeout(10):
        while not task.done():
            await leases.sync_round()
            await asyncio.wait({task}, timeout=0.01)  # the cache fill runs meanwhile
    first = task.result()
    assert first.admitted and first.hold is not None
    assert leases.end_local(first.hold, True, 10) is None
    (lease,) = leases.leases

    async def cycle(requests: int, seconds: float) -> None:
        """`requests` admitted and committed, then the next sync `seconds` after this one."""
        for _ in range(requests):
            d = leases.try_admit(tokens, p)
            assert d is not None and d.admitted and d.hold is not None, "the lease covers it"
            assert leases.end_local(d.hold, True, 10) is None
        now[0] += seconds + 1e-9  # not a hair short of an interval in floating point
        assert await leases.sync_round() == 1

    def near(value: int, expected: float) -> bool:
        return math.ceil(expected) - 1 <= value <= math.ceil(expected) + 1  # floating point

    # Cycles of one interval, replies at once: three intervals of demand. 40 credits in the
    # first one (the first request's included), 30 in the second.
    await cycle(3, 0.02)
    await cycle(3, 0.02)
    assert near(lease.free, 30 / 0.02 * 0.06)
    # Round trips of 30 ms, syncs 50 ms after the previous reply: 80 ms cycles.
    rtt[0] = 0.03
    await cycle(6, 0.02)  # the first slow round trip (60 credits in 20 ms)
    assert near(lease.free, 60 / 0.02 * 0.06), "an interval-long cycle: three intervals"
    await cycle(9, 0.05)  # the first 80 ms cycle (90 credits in it)
    assert near(lease.free, 90 / 0.08 * 1.5 * (0.08 + 0.03))
    used = lease.free // 10 * 10
    await cycle(used // 10, 0.05)
    # The stock outlasts the next cycle and its round trip, with half of that to spare.
    assert lease.free >= used / 0.08 * (0.08 + 0.03) * 1.5 - 1
    # A round trip of 400 ms: the time until the next grant counts as the cap (0.25 s).
    rtt[0] = 0.4
    await cycle(10, 0.05)  # the round trip that will count
    await cycle(10, 0.05)
    assert near(lease.free, 100 / 0.45 * 1.5 * 0.25)
    # After half a minute without a sync: 10 credits in 30 s, not a long spell's worth.
    rtt[0] = 0.0
    await cycle(1, 30.0)
    assert lease.free <= 1
    assert leases.stats.waited == 1  # the first request only
    await leases.aclose()


async def test_burst_gets_everything_left(
    gateways: Factory, policy: Policy, filler: DictFiller
) -> None:
    """100 requests at once against a limit of 50: exactly 50 pass, as in hold mode (a sync asks
    for every waiting request's need, not only one)."""
    leases = gateways()
    p = project(filler, snap=10**6)
    free = route(policy, "free")
    decisions = await asyncio.gather(*(admit(leases, free, p) for _ in range(100)))
    assert sum(d.admitted for d in decisions) == 50
    assert {d.reason for d in decisions if not d.admitted} == {Reason.RATE_LIMITED}


async def test_override_from_rate_to_concurrency_never_overfills_the_pool(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    """Unused rate units carried into a sync after an override made the quota a concurrency
    quota are not slots: the pool still fits the concurrency limit."""
    leases = gateways()
    p = project(filler, snap=10**6)
    free = route(policy, "free")
    burst = await asyncio.gather(*(admit(leases, free, p) for _ in range(30)))
    assert all(d.admitted for d in burst)
    assert await leases.sync_round(force=True) == 1  # demand-sized grant: units left over
    for _ in range(5):  # recent demand: the next sync keeps the free units
        assert (await admit(leases, free, p)).admitted
    shard = keys.shard_of(p, 4)
    await rclient.hset(keys.quota_defs(shard, p), "requests", "concurrency:2:0")  # type: ignore[misc]
    leases.invalidate(p)
    # The change reaches this lease at its next sync (at most lease_sync_ms later): now.
    assert await leases.sync_round(force=True) == 1
    held = [await admit(leases, free, p) for _ in range(5)]
    assert sum(d.admitted for d in held) <= 2
    assert int(await rclient.get(keys.concurrency(shard, p, "requests")) or 0) <= 2


async def test_reset_never_exceeds_the_window_with_grants_in_the_log(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    """A lease grant sits in the rate log stamped at the lease's expiry, ahead of now. Neither
    the lease's own `t` nor a hold-mode admission reading the same log (gateways of both modes
    on one Redis, e.g. while switching) may report a reset beyond the window."""
    leases = gateways()
    p = project(filler, snap=1000)
    free = route(policy, "free")
    window = policy.quotas["requests"].window_seconds
    assert policy.settings.lease_ttl_ms > 0
    leased = await admit(leases, free, p)
    assert leased.admitted
    assert [(q.name, q.window_seconds) for q in leased.quotas] == [("requests", window)]
    assert 0 < leased.quotas[0].reset_seconds <= window

    hold_mode = AdmissionEngine(rclient, policy, filler, gateway_id="hold-mode")
    held = await hold_mode.admit_route(free, p)
    assert held.admitted
    assert 0 < held.quotas[0].reset_seconds <= window


async def test_shutdown_with_redis_away_retries_then_reports_what_is_lost(
    policy: Policy, own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Commits waiting for their lease's sync when Redis stops answering at shutdown: closing
    syncs are retried up to the deadline, and what could not be sent is logged with its count
    and credits (those requests are never charged), never dropped silently."""
    from admission.redis_client import RedisSettings, build_client

    client = build_client(RedisSettings(url=own_redis.url))
    try:
        filler = DictFiller(client, shards=4)
        engine = AdmissionEngine(client, policy, filler, gateway_id="gw-away")
        leases = LeaseAdmitter(engine.store, policy, filler, route_problem=engine.route_problem)
        leases.start()
        p = project(filler, snap=1000)
        work = route(policy, "work")
        for _ in range(3):
            d = await admit(leases, work, p)
            assert d.admitted and d.hold is not None
            leases.end(d.hold, True)
        assert leases.unsynced_commits() >= 1
        unsent = leases.unsynced_commits()
        own_redis.stop()
        with caplog.at_level(logging.ERROR, logger="admission.lease"):
            await leases.aclose(within_s=0.3)
        lost = [r.getMessage() for r in caplog.records if "never recorded" in r.getMessage()]
        assert len(lost) == 1, caplog.text
        assert f"{unsent} commits ({unsent * 2} credits) of 1 projects" in lost[0]
        assert f"{p}: {unsent} commits" in lost[0]
    finally:
        await client.aclose()


async def test_after_a_failed_sync_requests_are_decided_at_once_for_a_second(
    policy: Policy, own_redis: RedisProcess
) -> None:
    """Redis gone: the first request the lease cannot cover waits for a sync, which fails. For
    the next second, requests of that shard are decided by on_redis_down at once (no sync
    each, no timeout each); after it, a request waits for a sync again (probing Redis)."""
    from admission.redis_client import RedisSettings, build_client

    client = build_client(RedisSettings(url=own_redis.url))
    now = [1000.0]
    try:
        filler = DictFiller(client, shards=4)
        engine = AdmissionEngine(client, policy, filler, gateway_id="gw-breaker")
        leases = LeaseAdmitter(
            engine.store,
            policy,
            filler,
            route_problem=engine.route_problem,
            clock=lambda: now[0],
        )
        leases.start()
        work = route(policy, "work")
        p = project(filler, snap=1000)
        own_redis.stop()

        first = await admit(leases, work, p)
        assert not first.admitted and first.reason is Reason.UNAVAILABLE
        waited, syncs = leases.stats.waited, leases.stats.syncs
        for _ in range(5):
            d = await admit(leases, work, p)
            assert not d.admitted and d.reason is Reason.UNAVAILABLE
            assert d.retry_after_seconds == policy.settings.unavailable_retry_after_seconds
        assert (leases.stats.waited, leases.stats.syncs) == (waited, syncs)

        now[0] += 1.01  # the shard is tried again
        again = await admit(leases, work, p)
        assert not again.admitted and again.reason is Reason.UNAVAILABLE
        assert leases.stats.waited == waited + 1
        await leases.aclose(within_s=0)
    finally:
        await client.aclose()


async def test_shutdown_does_not_retry_a_lease_that_cannot_close_while_redis_answers(
    gateways: Factory, policy: Policy, filler: DictFiller
) -> None:
    """A hold never ended keeps its lease from closing; Redis answers every sync, so retrying
    until the deadline would only delay the shutdown: at most two closing rounds."""
    leases = gateways()
    p = project(filler, snap=1000)
    d = await admit(leases, route(policy, "work"), p)
    assert d.admitted and d.hold is not None  # never ended
    rounds = leases.stats.syncs
    await leases.aclose(within_s=60)
    assert leases.stats.syncs - rounds <= 2


async def test_a_sync_grant_goes_to_the_requests_that_waited_for_it(
    gateways: Factory, policy: Policy, filler: DictFiller
) -> None:
    """Requests arriving as a reply is applied cannot take the grant its waiters asked for.

    Each reply is followed at once, before the waiting request runs again, by other requests
    that take whatever the lease has left. Waiters are decided when the reply is applied, so
    the waiting request is admitted. When it was decided only once its task ran, it found the
    lease empty after each of its three syncs and got 402 with 990 credits in the wallet.
    """
    tokens = route(policy, "tokens")
    p = project(filler, snap=1000)
    taken: list[Decision] = []

    class OthersArriveAfterEachReply(LeaseAdmitter):
        def _apply(self, lease: LocalLease, op: LeaseOp, res: LeaseResult) -> None:
            super()._apply(lease, op, res)
            for _ in range(1000):
                other = self.try_admit(tokens, p)
                if other is None or not other.admitted:
                    break
                taken.append(other)

    leases = gateways(OthersArriveAfterEachReply)
    d = await leases.admit(tokens, p)
    assert d.admitted, (d.reason, d.detail)
    assert taken, "the other requests never ran in the window"
    assert d.hold is not None
    for other in [d, *taken]:
        assert other.hold is not None
        assert leases.end_local(other.hold, True, other.hold.amount) is None
    await leases.aclose()


async def test_a_waiter_cancelled_after_its_reply_gives_back_what_it_took(
    gateways: Factory, policy: Policy, filler: DictFiller
) -> None:
    """A request cancelled between being admitted at the reply and running again releases."""
    work = route(policy, "work")
    p = project(filler, snap=1000)
    waiting: list[asyncio.Task[Decision]] = []

    class CancelAfterTheReply(LeaseAdmitter):
        def _apply(self, lease: LocalLease, op: LeaseOp, res: LeaseResult) -> None:
            super()._apply(lease, op, res)
            if lease.synced:  # not the first, COLD, reply: the waiter is decided
                for task in waiting:
                    task.cancel()

    leases = gateways(CancelAfterTheReply)
    waiting.append(asyncio.create_task(leases.admit(work, p)))
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    (lease,) = leases.leases
    assert lease.synced, "the reply was applied"
    assert lease.inflight == 0, "the cancelled request's credits went back to the lease"
    assert all(q.inflight == 0 for q in lease.quotas.values()), "and its concurrency slot"
    waiting.clear()
    await leases.aclose()


async def test_unsynced_commits_include_a_sync_on_its_way(
    gateways: Factory, policy: Policy, filler: DictFiller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits sent in a sync Redis has not answered yet are still counted as not in Redis."""
    leases = gateways()
    p = project(filler, snap=1000)
    tokens = route(policy, "tokens")
    d = await admit(leases, tokens, p)
    assert d.hold is not None
    assert leases.end_local(d.hold, True, 7) is None
    assert leases.unsynced_commits() == 1
    store = leases._store
    run_leases = store.run_leases
    seen: list[int] = []

    async def observed(ops: Any) -> Any:
        seen.append(leases.unsynced_commits())  # the sync is on its way now
        return await run_leases(ops)

    monkeypatch.setattr(store, "run_leases", observed)
    await leases.sync_round(force=True)
    assert seen == [1]
    assert leases.unsynced_commits() == 0
    await leases.aclose()


async def test_a_failure_deciding_one_waiter_leaves_the_others_decided(
    gateways: Factory, policy: Policy, filler: DictFiller
) -> None:
    """A bug while deciding one waiting request at the reply fails that request only (by
    on_redis_down); the other waiters are still decided, none is left waiting."""
    work = route(policy, "work")
    p = project(filler, snap=1000)
    calls = [0]

    class FirstCheckFails(LeaseAdmitter):
        def _check(self, lease: Any, spec: Any, now: float, final: bool) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("a bug while deciding one request")
            return super()._check(lease, spec, now, final)

    leases = gateways(FirstCheckFails)
    async with asyncio.timeout(10):
        decisions = await asyncio.gather(*(leases.admit(work, p) for _ in range(3)))
    assert [d.reason for d in decisions].count(Reason.UNAVAILABLE) == 1
    assert sum(d.admitted for d in decisions) == 2
    for d in decisions:
        if d.hold is not None:
            leases.end_local(d.hold, False, 0)
    await leases.aclose()


async def test_an_error_reply_does_not_mark_the_shard_down(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    """A sync that fails with an error reply about one project's keys came back at once: the
    shard answers, so other projects' requests on it still wait for a sync instead of being
    decided by on_redis_down without one."""
    work = route(policy, "work")
    bad = project(filler, snap=1000)
    good = project(filler, snap=1000)
    while keys.shard_of(good, 4) != keys.shard_of(bad, 4):
        good = project(filler, snap=1000)
    warm = gateways()
    d = await admit(warm, work, bad)
    assert d.admitted and d.hold is not None
    warm.end_local(d.hold, False, 0)
    wallet = keys.wallet(keys.shard_of(bad, 4), bad)
    await rclient.delete(wallet)
    await rclient.set(wallet, "not a hash")  # this project's data is broken
    leases = gateways()
    broken = await admit(leases, work, bad)
    assert not broken.admitted and broken.reason is Reason.UNAVAILABLE
    assert "WRONGTYPE" in broken.detail
    fine = await admit(leases, work, good)
    assert fine.admitted and not fine.degraded, (fine.reason, fine.detail)
    assert fine.hold is not None
    leases.end_local(fine.hold, False, 0)
    await rclient.delete(wallet)


async def test_one_projects_broken_keys_do_not_block_its_shards_other_leases(
    gateways: Factory, policy: Policy, filler: DictFiller, rclient: aioredis.Redis
) -> None:
    """One lease.lua call carries the syncs of every lease of a shard, and an error reply to
    one op (a key of the wrong type) fails the whole call. Each op is then re-sent as is: if
    they went together again, the healthy project's commits would never reach Redis. They go
    one per call until the error is gone."""
    leases = gateways()
    tokens = route(policy, "tokens")
    bad = project(filler, snap=1000)
    good = project(filler, snap=1000)
    while keys.shard_of(good, 4) != keys.shard_of(bad, 4):
        good = project(filler, snap=1000)
    for p in (bad, good):
        d = await admit(leases, tokens, p)
        assert d.hold is not None
        assert leases.end_local(d.hold, True, 3) is None  # a commit to sync
    wallet = keys.wallet(keys.shard_of(bad, 4), bad)
    await rclient.delete(wallet)
    await rclient.set(wallet, "not a hash")
    await leases.sync_round(force=True)  # both in one call: both fail
    assert leases.unsynced_commits() == 2
    await leases.sync_round(force=True)  # one call each: the good one goes through
    assert leases.unsynced_commits() == 1
    events = await outbox_events(rclient, good, 4)
    assert sum(int(e[keys.E_AMOUNT]) for e in events if e[keys.E_KIND] == "COMMIT") == 3
    d = await admit(leases, tokens, good)
    assert d.admitted and not d.degraded and d.hold is not None
    leases.end_local(d.hold, False, 0)
    await rclient.delete(wallet)
    await leases.aclose(within_s=1)
