"""The admission engine on a real Redis: every reason, quotas, holds, batching, failures."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from admission import keys
from admission.decision import AdmitRequest, Hold, QuotaKind, Reason, WalletState
from admission.engine import AdmissionEngine
from admission.policy import Policy
from admission.redis_client import RedisSettings, build_client
from tests.fixtures_admission import (
    TEST_TIMEOUT_S,
    DictFiller,
    ShardClock,
    WalletSnapshot,
    new_project,
    outbox_events,
    wallet_of,
)
from tests.services import RedisProcess, start_redis

Engine = tuple[AdmissionEngine, DictFiller]


def req(engine: AdmissionEngine, route: str, project: str) -> AdmitRequest:
    r = engine.policy.route(route)
    assert r is not None
    return engine.request_for(r, project)


def project_with(filler: DictFiller, **snap: int) -> str:
    p = new_project()
    filler.projects[p] = WalletSnapshot(**snap)  # type: ignore[arg-type]
    return p


async def test_admit_commit_less_than_hold(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=100)
    d = await engine.admit(req(engine, "chat", p))
    assert d.admitted and d.reason is Reason.ADMITTED and d.hold is not None
    assert d.wallet_state is WalletState.HEALTHY and not d.low_balance
    assert d.hold.amount == 10 and d.hold.allow_overage and d.hold.route == "chat"
    assert [(q.name, q.kind, q.limit, q.remaining) for q in d.quotas] == [
        ("requests", QuotaKind.RATE, 5, 4),
        ("concurrent", QuotaKind.CONCURRENCY, 2, 1),
    ]
    assert d.quotas[0].reset_seconds == 60 and d.quotas[0].window_seconds == 60
    w = await wallet_of(engine._store._client, p)
    assert w["held"] == 10 and w["uns"] == 0
    out = await engine.commit(d.hold, 7)
    assert out.ok and out.state == "COMMITTED" and out.amount == 7
    w = await wallet_of(engine._store._client, p)
    assert w["held"] == 0 and w["uns"] == 7
    events = await outbox_events(engine._store._client, p)
    assert len(events) == 1
    e = events[0]
    assert (e["id"], e["h"], e["k"], e["ha"], e["a"], e["m"], e["r"], e["g"]) == (
        d.hold.hold_id,
        d.hold.hold_id,
        "COMMIT",
        "10",
        "7",
        "requests",
        "chat",
        "gw-test",
    )
    again = await engine.commit(d.hold, 7)
    assert not again.ok and again.state == "COMMITTED"
    assert len(await outbox_events(engine._store._client, p)) == 1


async def test_cold_fill_once_then_known(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=1000)
    ds = await asyncio.gather(*(engine.admit(req(engine, "status", p)) for _ in range(5)))
    assert all(d.admitted for d in ds)
    assert filler.calls == 1
    assert all(d.hold is None for d in ds)  # free route without concurrency quota: no hold
    await engine.admit(req(engine, "status", p))
    assert filler.calls == 1


async def test_unknown_project_and_authority_down(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    d = await engine.admit(req(engine, "chat", new_project()))
    assert not d.admitted and d.reason is Reason.UNKNOWN_PROJECT
    filler.down = True
    p = project_with(filler, snap=100)
    d = await engine.admit(req(engine, "chat", p))
    assert not d.admitted and d.reason is Reason.UNAVAILABLE and d.retry_after_seconds == 1


async def test_insufficient_credits_and_overdraft(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=15)
    assert (await engine.admit(req(engine, "chat", p))).admitted
    d = await engine.admit(req(engine, "chat", p))
    assert not d.admitted and d.reason is Reason.INSUFFICIENT_CREDITS
    assert d.retry_after_seconds == 30 and d.hold is None
    q = new_project()
    filler.projects[q] = WalletSnapshot(snap=15, od=5)
    assert (await engine.admit(req(engine, "chat", q))).admitted
    assert (await engine.admit(req(engine, "chat", q))).admitted  # 20 <= 15 + 5
    w = await wallet_of(engine._store._client, q)
    assert w["held"] == 20


async def test_grace_denies_chargeable_only(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=0, state=3, gu=1_900_000_000_000)
    d = await engine.admit(req(engine, "chat", p))
    assert not d.admitted and d.reason is Reason.WALLET_GRACE
    assert d.grace_until_ms == 1_900_000_000_000 and d.wallet_state is WalletState.GRACE
    assert d.retry_after_seconds == 30
    free = await engine.admit(req(engine, "models", p))
    assert free.admitted and free.wallet_state is WalletState.GRACE


async def test_expired_denies_everything(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=500, state=4)
    for route in ("chat", "models", "status"):
        d = await engine.admit(req(engine, route, p))
        assert not d.admitted and d.reason is Reason.WALLET_EXPIRED
        assert d.retry_after_seconds is None
    w = await wallet_of(engine._store._client, p)
    assert w["held"] == 0


async def test_settlement_backlog(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=100, unsl=15)
    d = await engine.admit(req(engine, "chat", p))
    assert d.hold is not None
    assert (await engine.commit(d.hold)).amount == 10
    d2 = await engine.admit(req(engine, "chat", p))
    assert not d2.admitted and d2.reason is Reason.SETTLEMENT_BACKLOG
    assert d2.retry_after_seconds == 5


async def test_rate_limit_sliding_window_exact(
    admission_engine: Engine, shard_clock: ShardClock
) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=100)
    shard = engine.shard_of(p)
    for i in range(2):
        d = await engine.admit(req(engine, "models", p))
        assert d.admitted and d.quotas[0].remaining == 4 - i
    await shard_clock.advance(shard, 30_000)
    for i in range(3):
        d = await engine.admit(req(engine, "models", p))
        assert d.admitted and d.quotas[0].remaining == 2 - i
        assert d.quotas[0].reset_seconds == 30  # the oldest entry leaves in 30 s
    d = await engine.admit(req(engine, "models", p))
    assert not d.admitted and d.reason is Reason.RATE_LIMITED
    assert d.retry_after_seconds == 30 and d.quotas[0].remaining == 0
    await shard_clock.advance(shard, 29_500)
    d = await engine.admit(req(engine, "models", p))
    assert not d.admitted and d.retry_after_seconds == 1
    await shard_clock.advance(shard, 600)  # the first two entries have left the window
    for _ in range(2):
        assert (await engine.admit(req(engine, "models", p))).admitted
    d = await engine.admit(req(engine, "models", p))
    assert not d.admitted and d.retry_after_seconds == 30


async def test_weights_count_against_rate(
    admission_engine: Engine, shard_clock: ShardClock
) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=1000)
    for rem in (7, 4, 1):
        d = await engine.admit(req(engine, "embed", p))
        assert d.admitted and d.quotas[0].remaining == rem
        await shard_clock.advance(engine.shard_of(p), 1000)
    d = await engine.admit(req(engine, "embed", p))
    assert not d.admitted and d.reason is Reason.RATE_LIMITED
    # 9 used + 3 > 10: the first entry (weight 3) must leave, 10 s after it came, 3 s ago.
    assert d.retry_after_seconds == 7
    assert d.quotas[0].remaining == 1


async def test_concurrency_quota_and_release(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=1000)
    a = await engine.admit(req(engine, "chat", p))
    b = await engine.admit(req(engine, "chat", p))
    c = await engine.admit(req(engine, "chat", p))
    assert a.admitted and b.admitted
    assert not c.admitted and c.reason is Reason.CONCURRENCY_LIMITED and c.retry_after_seconds == 1
    assert a.hold is not None
    out = await engine.release(a.hold)
    assert out.ok and out.state == "RELEASED" and out.amount == 0
    d = await engine.admit(req(engine, "chat", p))
    assert d.admitted
    client = engine._store._client
    assert int(await client.get(keys.concurrency(engine.shard_of(p), p, "concurrent"))) == 2
    w = await wallet_of(client, p)
    assert w["held"] == 20 and w["uns"] == 0


async def test_project_quota_override(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = new_project()
    filler.projects[p] = WalletSnapshot(snap=100, quotas={"requests": "rate:2:10"})
    for _ in range(2):
        assert (await engine.admit(req(engine, "models", p))).admitted
    d = await engine.admit(req(engine, "models", p))
    assert not d.admitted and d.reason is Reason.RATE_LIMITED
    assert (d.quotas[0].limit, d.quotas[0].window_seconds) == (2, 10)
    assert d.retry_after_seconds == 10


async def test_holds_overage_over_hold_unknown(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=100)
    chat = await engine.admit(req(engine, "chat", p))
    assert chat.hold is not None
    out = await engine.commit(chat.hold, 25)  # overage route: may exceed the hold
    assert out.ok and out.amount == 25
    embed = await engine.admit(req(engine, "embed", p))
    assert embed.hold is not None and not embed.hold.allow_overage
    over = await engine.commit(embed.hold, 6)
    assert not over.ok and over.state == "ACTIVE" and "overage" in over.detail
    w = await wallet_of(engine._store._client, p)
    assert w["held"] == 5 and w["uns"] == 25
    full = await engine.commit(embed.hold)
    assert full.ok and full.amount == 5
    rel = await engine.release(embed.hold)
    assert not rel.ok and rel.state == "COMMITTED"
    ghost = Hold("0" * 32, p, engine.shard_of(p), 5, "embed", "requests", False)
    unknown = await engine.commit(ghost)
    assert not unknown.ok and unknown.state == "UNKNOWN"
    assert len(await outbox_events(engine._store._client, p)) == 2


async def test_bad_input_changes_nothing(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=100)
    base = req(engine, "chat", p)
    trips = engine.stats.round_trips
    bad = [
        AdmitRequest(p, "chat", cost=-1, quotas=base.quotas),
        AdmitRequest(p, "chat", cost=1_000_001),
        AdmitRequest(p, "chat", cost=1.5),  # type: ignore[arg-type]
        AdmitRequest(p, "chat", cost=True),
        AdmitRequest(p, "chat", cost=1, quotas=("nope",)),
        AdmitRequest("Bad Project", "chat", cost=1),
        AdmitRequest(p + "\n", "chat", cost=1),  # "$" would match before the newline
        AdmitRequest(p, "chat\n", cost=1),
        AdmitRequest(p, "chat", cost=1, quota_weight=0),
    ]
    for r in bad:
        d = await engine.admit(r)
        assert not d.admitted and d.reason is Reason.INVALID_REQUEST and d.detail
    hold = Hold("x" * 32, p, engine.shard_of(p), 10, "chat", "requests", True)
    for amount in (-1, 1.5, 10**16):
        out = await engine.commit(hold, amount)  # type: ignore[arg-type]
        assert not out.ok and out.state == "INVALID"
    assert engine.stats.round_trips == trips
    assert filler.calls == 0
    free = await engine.admit(AdmitRequest(p, "status", cost=0))  # cost 0 is a free route
    assert free.admitted and free.hold is None


async def test_one_round_trip_per_tick(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    projects = [project_with(filler, snap=10_000) for _ in range(12)]
    assert len({engine.shard_of(p) for p in projects}) > 3
    await asyncio.gather(*(engine.admit(req(engine, "status", p)) for p in projects))  # warm
    trips, calls = engine.stats.round_trips, engine.stats.script_calls
    ds = await asyncio.gather(
        *(engine.admit(req(engine, "embed", p)) for p in projects for _ in range(3))
    )
    assert all(d.admitted for d in ds)
    assert engine.stats.round_trips == trips + 1
    assert engine.stats.script_calls - calls == len({engine.shard_of(p) for p in projects})
    holds = [d.hold for d in ds if d.hold is not None]
    trips = engine.stats.round_trips
    outs = await asyncio.gather(*(engine.commit(h, 1) for h in holds))
    assert all(o.ok for o in outs)
    assert engine.stats.round_trips == trips + 1


async def test_cancelled_caller_hold_is_released(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=100)
    await engine.admit(req(engine, "status", p))  # warm, so the cancelled op is the hold
    task = asyncio.create_task(engine.admit(req(engine, "chat", p)))
    await asyncio.sleep(0)  # one tick: the op is queued, the Redis call not yet made
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.drain()
    assert engine.stats.orphans_released == 1
    client = engine._store._client
    w = await wallet_of(client, p)
    assert w["held"] == 0 and w["uns"] == 0
    assert int(await client.get(keys.concurrency(engine.shard_of(p), p, "concurrent"))) == 0
    events = await outbox_events(client, p)
    assert [e["k"] for e in events] == ["RELEASE"]


async def test_shadow_route_never_denies(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=15)
    ok = await engine.admit(req(engine, "shadowed", p))
    assert ok.admitted and ok.shadow and ok.would_deny is None and ok.hold is not None
    d = await engine.admit(req(engine, "shadowed", p))
    assert d.admitted and d.shadow and d.would_deny is Reason.INSUFFICIENT_CREDITS
    assert d.hold is None and d.retry_after_seconds is None
    w = await wallet_of(engine._store._client, p)
    assert w["held"] == 10
    assert d.quotas[0].remaining == 4  # the would-be denial consumed no quota


async def test_shadow_route_unknown_project(admission_engine: Engine) -> None:
    engine, _ = admission_engine
    d = await engine.admit(req(engine, "shadowed", new_project()))
    assert d.admitted and d.shadow and d.would_deny is Reason.UNKNOWN_PROJECT


async def test_unsettled_limit_left_to_the_policy(admission_engine: Engine) -> None:
    """A wallet without unsl (or unsl "", as the cache fill may leave it) uses the policy's."""
    engine, filler = admission_engine
    client = engine._store._client
    for unsl in (None, ""):
        p = project_with(filler, snap=2_000_000)
        await engine.admit(req(engine, "status", p))  # fill
        wkey = keys.wallet(engine.shard_of(p), p)
        if unsl is None:
            await client.hdel(wkey, "unsl")
        else:
            await client.hset(wkey, "unsl", unsl)
        await client.hset(wkey, "uns", 999_995)  # policy unsettled_limit is 1_000_000
        d = await engine.admit(req(engine, "embed", p))  # cost 5: exactly at the limit
        assert d.admitted
        d = await engine.admit(req(engine, "embed", p))
        assert not d.admitted and d.reason is Reason.SETTLEMENT_BACKLOG


async def test_low_balance_flag(admission_engine: Engine) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=60, low=55, state=1)
    d = await engine.admit(req(engine, "chat", p))
    assert d.admitted and d.low_balance  # 60 - 10 held < 50


async def test_sweep_expires_forgotten_holds(
    admission_engine: Engine, shard_clock: ShardClock
) -> None:
    engine, filler = admission_engine
    p = project_with(filler, snap=100)
    r = req(engine, "chat", p)
    short = AdmitRequest(
        p,
        r.route,
        r.cost,
        r.meter,
        r.quotas,
        r.quota_weight,
        hold_ttl_seconds=1,
        allow_overage=True,
    )
    d = await engine.admit(short)
    assert d.hold is not None
    assert await engine.sweep_expired() == 0
    await shard_clock.advance(engine.shard_of(p), 1500)
    assert await engine.sweep_expired() == 1
    client = engine._store._client
    w = await wallet_of(client, p)
    assert w["held"] == 0 and w["uns"] == 0
    assert int(await client.get(keys.concurrency(engine.shard_of(p), p, "concurrent"))) == 0
    assert [e["k"] for e in await outbox_events(client, p)] == ["EXPIRE"]
    late = await engine.commit(d.hold, 5)
    assert not late.ok and late.state == "EXPIRED"
    assert await engine.sweep_expired() == 0


@dataclass
class OwnRedis:
    """A redis-server this test may stop, a client with the production defaults and a
    client with generous timeouts for the set-up steps (the machine may be loaded)."""

    proc: RedisProcess
    default: aioredis.Redis
    patient: aioredis.Redis


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    proc = start_redis()
    default = build_client(RedisSettings(url=proc.url))
    patient = build_client(
        RedisSettings(
            url=proc.url, socket_timeout_s=TEST_TIMEOUT_S, connect_timeout_s=TEST_TIMEOUT_S
        )
    )
    assert isinstance(default, aioredis.Redis) and isinstance(patient, aioredis.Redis)
    try:
        yield OwnRedis(proc, default, patient)
    finally:
        await default.aclose()
        await patient.aclose()
        proc.stop()


async def test_redis_down_is_fast_unavailable_or_degraded(
    own_redis: OwnRedis, admission_policy: Policy
) -> None:
    client = own_redis.default
    kwargs = client.connection_pool.connection_kwargs
    # No admission call can wait longer than these: no retries, sub-second timeouts.
    assert kwargs["socket_timeout"] <= 0.25 and kwargs["socket_connect_timeout"] <= 0.25
    assert kwargs["retry"].get_retries() == 0
    warm_filler = DictFiller(own_redis.patient)
    warm = AdmissionEngine(own_redis.patient, admission_policy, warm_filler, gateway_id="gw-w")
    p = project_with(warm_filler, snap=100)
    d = await warm.admit(req(warm, "chat", p))
    assert d.hold is not None
    own_redis.proc.stop()
    engine = AdmissionEngine(client, admission_policy, DictFiller(client), gateway_id="gw-down")
    down = await engine.admit(req(engine, "chat", p))
    assert not down.admitted and down.reason is Reason.UNAVAILABLE
    assert down.retry_after_seconds == 1 and not down.degraded
    lenient = await engine.admit(req(engine, "lenient", p))
    assert lenient.admitted and lenient.degraded and lenient.hold is None
    free = await engine.admit(req(engine, "status", p))  # free routes default to allow
    assert free.admitted and free.degraded
    shadow = await engine.admit(req(engine, "shadowed", p))  # shadow routes never deny
    assert shadow.admitted and shadow.shadow and shadow.degraded
    assert shadow.would_deny is Reason.UNAVAILABLE
    out = await engine.commit(d.hold)
    assert not out.ok and out.state == "UNAVAILABLE"
    assert engine.stats.redis_down == 4


async def test_a_hung_shard_is_skipped_for_a_second_then_probed(
    own_redis: OwnRedis, admission_policy: Policy
) -> None:
    """Redis hangs (SIGSTOP): the first admission waits for the client's timeout. For the next
    second the shard's admissions are decided by on_redis_down without a round trip, instead
    of each waiting 0.25 s; then one request probes, and once Redis answers it clears."""
    now = [1000.0]
    warm_filler = DictFiller(own_redis.patient)
    warm = AdmissionEngine(own_redis.patient, admission_policy, warm_filler, gateway_id="gw-w")
    p = project_with(warm_filler, snap=1000)
    assert (await warm.admit(req(warm, "lenient", p))).admitted
    client = own_redis.default
    engine = AdmissionEngine(
        client, admission_policy, warm_filler, gateway_id="gw-hang", clock=lambda: now[0]
    )
    own_redis.proc.proc.send_signal(signal.SIGSTOP)
    try:
        first = await engine.admit(req(engine, "chat", p))
        assert not first.admitted and first.reason is Reason.UNAVAILABLE
        calls = engine.stats.script_calls
        for _ in range(5):
            d = await engine.admit(req(engine, "chat", p))
            assert not d.admitted and d.reason is Reason.UNAVAILABLE
            assert d.retry_after_seconds == 1 and "less than a second ago" in d.detail
            lenient = await engine.admit(req(engine, "lenient", p))
            assert lenient.admitted and lenient.degraded and lenient.hold is None
        assert engine.stats.script_calls == calls, "no round trip to the failed shard"
        assert engine.stats.skipped == 10 and engine.stats.redis_down == 11
        # Other shards are still tried.
        other = new_project()
        while engine.shard_of(other) == engine.shard_of(p):
            other = new_project()
        await engine.admit(req(engine, "lenient", other))
        assert engine.stats.script_calls == calls + 1
        # A probe whose request goes away before Redis answers: the next request probes.
        now[0] += 1.01
        probe = asyncio.create_task(engine.admit(req(engine, "chat", p)))
        async with asyncio.timeout(5):
            while True:  # until the probe's round trip is on its way
                if engine.stats.script_calls > calls + 1:
                    break
                await asyncio.sleep(0)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        skipped = engine.stats.skipped
        await engine.admit(req(engine, "chat", p))
        assert engine.stats.skipped == skipped and engine.stats.script_calls == calls + 3
    finally:
        own_redis.proc.proc.send_signal(signal.SIGCONT)
    # Redis answers again, but the shard is skipped until its second is over.
    skipped = engine.stats.skipped
    assert not (await engine.admit(req(engine, "chat", p))).admitted
    assert engine.stats.skipped == skipped + 1
    now[0] += 1.01
    probe = await engine.admit(req(engine, "lenient", p))
    assert probe.admitted and not probe.degraded and probe.hold is not None
    again = await engine.admit(req(engine, "lenient", p))
    assert again.admitted and not again.degraded
    assert engine.stats.skipped == skipped + 1


async def test_an_error_reply_about_one_project_does_not_skip_its_shard(
    admission_engine: Engine, admission_redis: aioredis.Redis
) -> None:
    """A script error caused by one project's own keys came back at once: the shard answers,
    so other projects of the shard are still decided by Redis."""
    engine, filler = admission_engine
    good = project_with(filler, snap=1000)
    bad = project_with(filler, snap=1000)
    while engine.shard_of(bad) != engine.shard_of(good):
        bad = project_with(filler, snap=1000)
    assert (await engine.admit(req(engine, "chat", bad))).admitted
    wallet = keys.wallet(engine.shard_of(bad), bad)
    await admission_redis.delete(wallet)
    await admission_redis.set(wallet, "not a hash")  # this project's data is broken
    broken = await engine.admit(req(engine, "chat", bad))
    assert not broken.admitted and broken.reason is Reason.UNAVAILABLE
    assert "WRONGTYPE" in broken.detail
    fine = await engine.admit(req(engine, "chat", good))
    assert fine.admitted and not fine.degraded and fine.hold is not None
    assert engine.stats.skipped == 0
    # The same when the error reply answers the probe of a shard marked down earlier.
    engine._shard_down_until[engine.shard_of(bad)] = 0.0  # a failure long ago
    assert not (await engine.admit(req(engine, "chat", bad))).admitted  # the probe
    fine = await engine.admit(req(engine, "chat", good))
    assert fine.admitted and not fine.degraded
    assert engine.stats.skipped == 0


async def test_scripts_reloaded_after_script_flush(
    own_redis: OwnRedis, admission_policy: Policy
) -> None:
    client = own_redis.patient
    filler = DictFiller(client)
    engine = AdmissionEngine(client, admission_policy, filler, gateway_id="gw-flush")
    p = project_with(filler, snap=100)
    assert (await engine.admit(req(engine, "chat", p))).admitted
    loads = engine.stats.store.script_loads
    await client.script_flush()
    d = await engine.admit(req(engine, "chat", p))
    assert d.admitted and d.hold is not None
    assert (await engine.commit(d.hold)).ok
    assert engine.stats.store.script_loads > loads


def test_what_counts_as_redis_unreachable() -> None:
    """Connection errors, timeouts and a cluster that cannot serve the slot mark a shard down
    (redis-py may spend a timeout on each); error replies about a call do not."""
    from redis import exceptions as rx

    from admission.errors import StoreUnavailable, redis_unreachable

    def wrapped(cause: BaseException) -> StoreUnavailable:
        err = StoreUnavailable(f"redis: {cause!r}")
        err.__cause__ = cause
        return err

    cluster_down = rx.RedisClusterException("all nodes down")
    cluster_down.__cause__ = rx.ConnectionError("refused")
    unreachable = [
        rx.ConnectionError("refused"),
        rx.TimeoutError("timeout"),
        ConnectionRefusedError(),
        TimeoutError(),
        rx.ClusterDownError("CLUSTERDOWN"),
        rx.MasterDownError("MASTERDOWN"),
        rx.SlotNotCoveredError("slot 7 is not covered"),
        rx.ClusterError("TTL exhausted."),
        cluster_down,
    ]
    answered = [
        rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        rx.ResponseError("OOM command not allowed"),
        rx.ReadOnlyError("READONLY"),
        rx.NoScriptError("NOSCRIPT"),
        StoreUnavailable("lease.lua answered 1 of 2"),
    ]
    for exc in unreachable:
        assert redis_unreachable(exc) and redis_unreachable(wrapped(exc)), repr(exc)
    for exc in answered:
        assert not redis_unreachable(exc) and not redis_unreachable(wrapped(exc)), repr(exc)
