"""lease.lua on a real Redis (LEASE.md): SYNC / CLOSE / EXPIRE, the sweeper, and exactness.

Every test runs on a logical database of its own with the shard's test clock frozen, so each
expected number follows from the contract's rules by hand.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from admission import keys
from admission.decision import QuotaKind, Reason, WalletState
from admission.engine import AdmissionEngine
from admission.policy import Policy, QuotaDef, parse_policy
from admission.store import (
    LeaseEvent,
    LeaseOp,
    LeaseQuotaOp,
    LeaseResult,
    LeaseStatus,
    Store,
    expire_op,
)
from tests.fixtures_admission import (
    TEST_POLICY,
    DictFiller,
    WalletSnapshot,
    new_project,
    outbox_events,
    wallet_of,
    write_snapshot,
)

T0 = 1_800_000_000_000  # the frozen script clock at the start of every test
GW = "gw-lease"
RQ = QuotaDef("rq", QuotaKind.RATE, 10, 60)
CQ = QuotaDef("cq", QuotaKind.CONCURRENCY, 4)
UNSL = 1_000_000


def qop(
    q: QuotaDef, used: int = 0, keep: int = 0, want: int = 0, want_min: int = 0
) -> LeaseQuotaOp:
    return LeaseQuotaOp(q, used, keep, want, want_min)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Env:
    """One project on a shard with a frozen clock, and a Store to run lease ops with."""

    def __init__(self, client: aioredis.Redis, project: str) -> None:
        self.client = client
        self.project = project
        self.shard = keys.shard_of(project)
        self.store = Store(client, gateway_id=GW)

    async def at(self, ms: int) -> None:
        await self.client.set(keys.clock_offset(self.shard), f"={ms}")

    def op(
        self,
        lease_id: str,
        seq: int,
        *,
        kind: str = "SYNC",
        keep: int = 0,
        want: int = 0,
        want_min: int = 0,
        ttl: int = 2000,
        unsl: int = UNSL,
        quotas: tuple[LeaseQuotaOp, ...] = (),
        events: tuple[LeaseEvent, ...] = (),
    ) -> LeaseOp:
        return LeaseOp(
            kind,
            self.shard,
            lease_id,
            self.project,
            seq,
            ttl,
            keep,
            want,
            want_min,
            unsl,
            quotas,
            events,
        )

    async def run(self, *ops: LeaseOp) -> list[LeaseResult]:
        out = await self.store.run_leases({self.shard: list(ops)})
        res = out[self.shard]
        assert not isinstance(res, BaseException), res
        return res

    async def one(self, op: LeaseOp) -> LeaseResult:
        return (await self.run(op))[0]

    async def wallet(self) -> dict[str, int]:
        return await wallet_of(self.client, self.project)

    async def counter(self, q: str) -> int:
        return int(await self.client.get(keys.concurrency(self.shard, self.project, q)) or 0)

    async def log(self, q: str) -> list[tuple[str, int]]:
        raw = await self.client.zrange(
            keys.rate(self.shard, self.project, q), 0, -1, withscores=True
        )
        return [(_s(m), int(s)) for m, s in raw]

    async def rate_sum(self, q: str) -> int:
        return int(await self.client.get(keys.rate_sum(self.shard, self.project, q)) or 0)

    async def lease(self, lease_id: str) -> dict[str, str]:
        raw = await self.client.hgetall(keys.lease(self.shard, lease_id))  # type: ignore[misc]
        return {_s(k): _s(v) for k, v in raw.items()}

    async def hx(self, lease_id: str) -> int | None:
        score = await self.client.zscore(keys.hold_expiry(self.shard), lease_id)
        return None if score is None else int(score)

    async def events(self) -> list[dict[str, str]]:
        return await outbox_events(self.client, self.project)

    async def state(self) -> tuple[Any, ...]:
        """Everything a lease op may change, to show that one changed nothing."""
        ks = [keys.quota_defs(self.shard, self.project)]
        for q in ("rq", "cq"):
            ks += [
                keys.rate(self.shard, self.project, q),
                keys.rate_sum(self.shard, self.project, q),
                keys.concurrency(self.shard, self.project, q),
            ]
        dumps = [await self.client.dump(k) for k in ks]
        leases = sorted(_s(k) for k in await self.client.keys(keys.lease(self.shard, "*")))
        lease_hashes = [await self.client.hgetall(k) for k in leases]  # type: ignore[misc]
        return (
            await self.wallet(),
            dumps,
            leases,
            lease_hashes,
            await self.client.zrange(keys.hold_expiry(self.shard), 0, -1, withscores=True),
            await self.events(),
        )


async def make_env(client: aioredis.Redis, snap: WalletSnapshot | None) -> Env:
    env = Env(client, new_project("ls"))
    if snap is not None:
        await write_snapshot(client, env.project, snap)
    await env.at(T0)
    return env


@pytest.fixture
async def env(rclient: aioredis.Redis) -> Env:
    return await make_env(rclient, WalletSnapshot(snap=1000))


# -- SYNC ------------------------------------------------------------------------------------


async def test_first_sync_grants_credits_units_and_slots(env: Env) -> None:
    res = await env.one(
        env.op("L1", 1, want=100, quotas=(qop(RQ, want=8), qop(CQ, want=4)), ttl=2000)
    )
    assert res.status is LeaseStatus.OK and not res.renewed
    assert res.now_ms == T0 and res.expires_ms == T0 + 2000
    assert res.wallet_state is WalletState.HEALTHY and res.low_room == 1000 and res.reason is None
    assert res.amount == 100  # min(want 100, half of 1000 available)
    rq, cq = res.quotas
    # Rate: half of the 10 available; the grant counts at once, stamped at its expiry (62 s
    # from now), while the reset a client sees is never beyond one window: a unit it uses
    # now leaves the window within 60 s.
    assert (rq.name, rq.kind, rq.limit, rq.window_seconds) == ("rq", QuotaKind.RATE, 10, 60)
    assert (rq.granted, rq.remaining, rq.reset_seconds, rq.retry_after_seconds) == (5, 5, 60, 0)
    assert (cq.name, cq.kind, cq.limit, cq.window_seconds) == ("cq", QuotaKind.CONCURRENCY, 4, 0)
    assert (cq.granted, cq.remaining, cq.reset_seconds, cq.retry_after_seconds) == (2, 2, 0, 0)

    w = await env.wallet()
    assert w["held"] == 100 and w["uns"] == 0
    assert await env.counter("cq") == 2
    assert await env.log("rq") == [("L1.1.1g:5", T0 + 2000)]
    assert await env.rate_sum("rq") == 5
    # The log outlives its future-stamped member's stay in the window.
    rlog = keys.rate(env.shard, env.project, "rq")
    assert await env.client.pttl(rlog) > 60_000 + 2000
    assert await env.client.pttl(keys.rate_sum(env.shard, env.project, "rq")) > 60_000 + 2000
    assert await env.hx("L1") == T0 + 2000
    lease = await env.lease("L1")
    assert lease["p"] == env.project and lease["a"] == "100" and lease["seq"] == "1"
    assert lease["exp"] == str(T0 + 2000)
    assert lease["cq"] == keys.concurrency(env.shard, env.project, "cq")
    assert (lease["r:rq"], lease["rk:rq"], lease["c:cq"]) == ("L1.1.1g:5", "5", "2")
    assert "c:rq" not in lease and "r:cq" not in lease
    assert await env.events() == []


async def test_second_sync_applies_used_keep_and_events(env: Env) -> None:
    quotas = (qop(RQ, want=8), qop(CQ, want=4))
    await env.one(env.op("L1", 1, want=100, quotas=quotas))
    await env.at(T0 + 500)
    events = (
        LeaseEvent("L1.2.0", 20, 25, 3, "requests", "chat"),
        LeaseEvent("L1.2.1", 7, 10, 1, "tokens", "embed"),
    )
    res = await env.one(
        env.op(
            "L1",
            2,
            keep=30,
            want=100,
            quotas=(qop(RQ, used=2, keep=1, want=8), qop(CQ, keep=1, want=4)),
            events=events,
        )
    )
    assert res.status is LeaseStatus.OK and res.expires_ms == T0 + 2500
    # held = keep 30 + min(100, (1000 - 30 - 27) // 2)
    assert res.amount == 130
    w = await env.wallet()
    assert w["uns"] == 27 and w["held"] == 130
    rq, cq = res.quotas
    # Rate: 2 used re-stamped at now, 1 carried; available 10 - 2 - 1 = 7, new = 7 // 2 = 3.
    assert rq.granted == 4 and rq.remaining == 4
    assert sorted(await env.log("rq")) == [("L1.2.1g:4", T0 + 2500), ("L1.2.1u:2", T0 + 500)]
    assert await env.rate_sum("rq") == 6
    # Concurrency: the old pool (2) returned, 1 kept, available 4 - 0 - 1 = 3, new = 1.
    assert cq.granted == 2 and cq.remaining == 2 and await env.counter("cq") == 2
    lease = await env.lease("L1")
    assert (lease["a"], lease["seq"], lease["r:rq"], lease["rk:rq"], lease["c:cq"]) == (
        "130",
        "2",
        "L1.2.1g:4",
        "4",
        "2",
    )
    assert await env.hx("L1") == T0 + 2500
    got = await env.events()
    assert [
        (e["id"], e["k"], e["h"], e["ha"], e["a"], e["m"], e["r"], e["n"], e["t"], e["g"])
        for e in got
    ] == [
        ("L1.2.0", "COMMIT", "L1", "25", "20", "requests", "chat", "3", str(T0 + 500), GW),
        ("L1.2.1", "COMMIT", "L1", "10", "7", "tokens", "embed", "1", str(T0 + 500), GW),
    ]
    assert all(e[keys.E_QUANTITY] for e in got)


async def test_half_of_available_and_want_min(rclient: aioredis.Redis) -> None:
    env = await make_env(rclient, WalletSnapshot(snap=100))
    a = await env.one(env.op("LA", 1, want=100, quotas=(qop(RQ, want=10), qop(CQ, want=4))))
    assert a.amount == 50
    assert (a.quotas[0].granted, a.quotas[1].granted) == (5, 2)
    b = await env.one(
        env.op(
            "LB", 1, want=100, quotas=(qop(RQ, want=10, want_min=4), qop(CQ, want=4, want_min=2))
        )
    )
    assert b.amount == 25  # half of the 50 left
    # want_min lifts the grant above half of what is left (5 // 2, 2 // 2), retry 0.
    assert [(q.granted, q.retry_after_seconds) for q in b.quotas] == [(4, 0), (2, 0)]
    c = await env.one(env.op("LC", 1, want=100, want_min=20))
    assert c.amount == 20 and c.reason is None  # 25 // 2 = 12 < want_min 20
    d = await env.one(
        env.op(
            "LD",
            1,
            want=10,
            want_min=10,
            quotas=(qop(RQ, want=2, want_min=2), qop(CQ, want=1, want_min=1)),
        )
    )
    # Only 5 credits, 1 unit and no slot are left: what is there is granted, and why not more.
    assert d.amount == 5 and d.reason is Reason.INSUFFICIENT_CREDITS
    rq, cq = d.quotas
    assert rq.granted == 1 and rq.remaining == 0
    # 2 more fit when the first grant (5 units, stamped at T0 + 2000) leaves the 60 s window.
    assert rq.retry_after_seconds == 62
    assert cq.granted == 0 and cq.remaining == 0 and cq.retry_after_seconds == 1
    assert (await env.wallet())["held"] == 100
    assert await env.counter("cq") == 4 and await env.rate_sum("rq") == 10


async def test_repeated_seq_returns_the_same_reply_and_changes_nothing(env: Env) -> None:
    await env.one(env.op("L1", 1, want=100, quotas=(qop(RQ, want=8), qop(CQ, want=4))))
    await env.at(T0 + 100)
    op = env.op(
        "L1",
        2,
        keep=10,
        want=50,
        quotas=(qop(RQ, used=3, keep=1, want=4), qop(CQ, keep=1, want=4)),
        events=(LeaseEvent("L1.2.0", 40, 40, 4, "requests", "chat"),),
    )
    first = await env.one(op)
    before = await env.state()
    await env.at(T0 + 900)
    again = await env.one(op)
    assert again == first  # the stored reply, its clock included
    assert again.now_ms == T0 + 100
    assert await env.state() == before
    # The same seq with other contents is still the repeat of what was applied.
    other = env.op("L1", 2, want=999, events=(LeaseEvent("L1.2.0", 5, 5, 1, "requests", "chat"),))
    assert await env.one(other) == first
    assert await env.state() == before


async def test_lower_seq_is_stale(env: Env) -> None:
    await env.one(env.op("L1", 1, want=10))
    await env.one(env.op("L1", 2, keep=5, want=10))
    before = await env.state()
    res = await env.one(env.op("L1", 1, want=10, events=(LeaseEvent("L1.1.0", 5, 5, 1, "m", "r"),)))
    assert res.status is LeaseStatus.STALE and res.amount == 0
    assert await env.state() == before


async def test_cold_applies_events_and_grants_nothing(rclient: aioredis.Redis) -> None:
    env = await make_env(rclient, None)
    res = await env.one(
        env.op(
            "L1",
            1,
            want=50,
            want_min=5,
            quotas=(qop(RQ, want=5, want_min=1), qop(CQ, want=2)),
            events=(LeaseEvent("L1.1.0", 12, 12, 2, "requests", "chat"),),
        )
    )
    assert res.status is LeaseStatus.COLD and res.reason is None and res.amount == 0
    assert res.wallet_state is WalletState.UNSPECIFIED
    assert [q.granted for q in res.quotas] == [0, 0]
    assert (await env.wallet()) == {"uns": 12}  # still no snapshot: cold
    assert [(e["id"], e["a"], e["n"]) for e in await env.events()] == [("L1.1.0", "12", "2")]
    assert await env.log("rq") == [] and await env.counter("cq") == 0
    # Filled, the next seq grants.
    await write_snapshot(rclient, env.project, WalletSnapshot(snap=100))
    res = await env.one(env.op("L1", 2, want=50, quotas=(qop(RQ, want=5),)))
    assert res.status is LeaseStatus.OK and res.amount == 50 and res.quotas[0].granted == 5


async def test_grace_grants_no_credits_but_quota(rclient: aioredis.Redis) -> None:
    gu = T0 + 86_400_000
    env = await make_env(rclient, WalletSnapshot(snap=0, state=3, gu=gu))
    res = await env.one(env.op("L1", 1, want=10, want_min=5, quotas=(qop(RQ, want=4),)))
    assert res.status is LeaseStatus.OK and res.amount == 0
    assert res.reason is Reason.WALLET_GRACE and res.wallet_state is WalletState.GRACE
    assert res.grace_until_ms == gu
    assert res.quotas[0].granted == 4  # free routes stay admitted in GRACE
    # Nothing wanted urgently: no reason.
    res = await env.one(env.op("L1", 2, want=10))
    assert res.amount == 0 and res.reason is None


async def test_expired_grants_nothing(rclient: aioredis.Redis) -> None:
    env = await make_env(rclient, WalletSnapshot(snap=500, state=4))
    res = await env.one(env.op("L1", 1, want=10, quotas=(qop(RQ, want=4), qop(CQ, want=2))))
    assert res.status is LeaseStatus.OK and res.amount == 0
    assert res.reason is Reason.WALLET_EXPIRED and res.wallet_state is WalletState.EXPIRED
    assert [q.granted for q in res.quotas] == [0, 0]
    assert (await env.wallet())["held"] == 0
    assert await env.log("rq") == [] and await env.counter("cq") == 0


async def test_unsettled_limit_gives_settlement_backlog(rclient: aioredis.Redis) -> None:
    env = await make_env(rclient, WalletSnapshot(snap=1000, unsl=50))
    res = await env.one(
        env.op("L1", 1, want=30, want_min=20, events=(LeaseEvent("L1.1.0", 40, 40, 4, "m", "r"),))
    )
    # cap = min(1000, 50) - 0 - 40 = 10 < want_min, though the credits are there.
    assert res.amount == 10 and res.reason is Reason.SETTLEMENT_BACKLOG
    # Without the wallet's own limit the op's default applies.
    await rclient.hdel(keys.wallet(env.shard, env.project), keys.W_UNSETTLED_LIMIT)  # type: ignore[misc]
    res = await env.one(env.op("L1", 2, keep=10, want=30, want_min=20, unsl=45))
    # 45 - 10 held - 40 uns = -5: nothing granted; the keep stays held.
    assert res.amount == 10 and res.reason is Reason.SETTLEMENT_BACKLOG
    res = await env.one(env.op("L1", 3, keep=10, want=30, want_min=20, unsl=100))
    assert res.amount == 10 + 25 and res.reason is None  # max(20, 50 // 2)
    assert (await env.wallet())["held"] == 35


async def test_project_quota_override(rclient: aioredis.Redis) -> None:
    env = await make_env(
        rclient,
        WalletSnapshot(snap=100, quotas={"rq": "concurrency:3:0", "cq": "rate:6:10"}),
    )
    res = await env.one(env.op("L1", 1, quotas=(qop(RQ, want=3), qop(CQ, want=6))))
    rq, cq = res.quotas
    assert (rq.kind, rq.limit, rq.window_seconds, rq.granted) == (QuotaKind.CONCURRENCY, 3, 0, 1)
    assert (cq.kind, cq.limit, cq.window_seconds, cq.granted) == (QuotaKind.RATE, 6, 10, 3)
    assert await env.counter("rq") == 1 and await env.log("rq") == []
    assert await env.log("cq") == [("L1.1.2g:3", T0 + 2000)] and await env.counter("cq") == 0
    # The override changes back between syncs: the old state of each quota is undone.
    await rclient.delete(keys.quota_defs(env.shard, env.project))
    res = await env.one(env.op("L1", 2, quotas=(qop(RQ, want=6), qop(CQ, want=2))))
    rq, cq = res.quotas
    assert (rq.kind, rq.granted, cq.kind, cq.granted) == (
        QuotaKind.RATE,
        5,
        QuotaKind.CONCURRENCY,
        2,
    )
    assert await env.counter("rq") == 0 and await env.log("rq") == [("L1.2.1g:5", T0 + 2000)]
    assert await env.log("cq") == [] and await env.rate_sum("cq") == 0
    assert await env.counter("cq") == 2
    lease = await env.lease("L1")
    assert lease["cq"] == keys.concurrency(env.shard, env.project, "cq")
    assert "c:rq" not in lease and "r:cq" not in lease


async def test_close_returns_everything(env: Env) -> None:
    await env.one(env.op("L1", 1, want=100, quotas=(qop(RQ, want=8), qop(CQ, want=4))))
    await env.at(T0 + 300)
    res = await env.one(
        env.op(
            "L1",
            2,
            kind="CLOSE",
            keep=50,  # ignored: a CLOSE keeps nothing
            want=10,
            quotas=(qop(RQ, used=3, keep=2, want=1), qop(CQ, keep=1, want=1)),
            events=(LeaseEvent("L1.2.0", 9, 10, 1, "requests", "chat"),),
        )
    )
    assert res.status is LeaseStatus.OK and res.amount == 0 and res.expires_ms == 0
    assert [(q.granted, q.remaining) for q in res.quotas] == [(0, 7), (0, 4)]
    w = await env.wallet()
    assert w["held"] == 0 and w["uns"] == 9
    assert await env.counter("cq") == 0
    assert await env.log("rq") == [("L1.2.1u:3", T0 + 300)] and await env.rate_sum("rq") == 3
    # A tombstone answers a re-sent CLOSE (lost reply) without applying its events again.
    assert set(await env.lease("L1")) == {"seq", "closed", "last"}
    assert await env.hx("L1") is None
    assert [e["id"] for e in await env.events()] == ["L1.2.0"]
    again = await env.one(
        env.op(
            "L1",
            2,
            kind="CLOSE",
            quotas=(qop(RQ, used=3), qop(CQ)),
            events=(LeaseEvent("L1.2.0", 9, 10, 1, "requests", "chat"),),
        )
    )
    assert again == res
    assert (await env.wallet())["uns"] == 9 and len(await env.events()) == 1


async def test_close_keeps_pools_of_unlisted_quotas_for_the_sweeper(env: Env) -> None:
    await env.one(env.op("L1", 1, want=10, quotas=(qop(RQ, want=4), qop(CQ, want=4))))
    # A sync that does not list cq carries its pool over untouched.
    res = await env.one(env.op("L1", 2, keep=10, quotas=(qop(RQ, keep=2),)))
    assert [q.name for q in res.quotas] == ["rq"]
    assert await env.counter("cq") == 2 and (await env.lease("L1"))["c:cq"] == "2"
    await env.at(T0 + 100)
    await env.one(env.op("L1", 3, kind="CLOSE", quotas=(qop(RQ),)))
    assert (await env.wallet())["held"] == 0
    lease = await env.lease("L1")
    assert (lease["a"], lease["c:cq"], lease["exp"]) == ("0", "2", str(T0 + 100))
    assert await env.hx("L1") == T0 + 100
    first = await env.one(expire_op(env.shard, "L1"))
    assert first.status is LeaseStatus.WRONG_KEYS
    assert first.counters == (keys.concurrency(env.shard, env.project, "cq"),)
    done = await env.one(expire_op(env.shard, "L1", first.wallet_key, first.counters))
    assert done.status is LeaseStatus.OK
    assert await env.counter("cq") == 0 and await env.lease("L1") == {}


# -- EXPIRE ----------------------------------------------------------------------------------


async def test_expire_not_due_wrong_keys_then_ended(env: Env) -> None:
    await env.one(env.op("L1", 1, want=100, ttl=2000, quotas=(qop(RQ, want=8), qop(CQ, want=4))))
    await env.at(T0 + 1999)
    before = await env.state()
    res = await env.one(expire_op(env.shard, "L1"))
    assert res.status is LeaseStatus.NOT_DUE and await env.state() == before
    await env.at(T0 + 2000)
    res = await env.one(expire_op(env.shard, "L1"))
    assert res.status is LeaseStatus.WRONG_KEYS
    assert res.wallet_key == keys.wallet(env.shard, env.project)
    assert res.counters == (keys.concurrency(env.shard, env.project, "cq"),)
    assert await env.state() == before
    wrong = await env.one(expire_op(env.shard, "L1", res.wallet_key, ()))
    assert wrong.status is LeaseStatus.WRONG_KEYS and await env.state() == before
    res = await env.one(expire_op(env.shard, "L1", res.wallet_key, res.counters))
    assert res.status is LeaseStatus.OK and res.amount == 0
    assert (await env.wallet())["held"] == 0
    assert await env.counter("cq") == 0
    # The rate grant stays counted: a dead gateway may have used it up to the lease's exp.
    assert await env.log("rq") == [("L1.1.1g:5", T0 + 2000)] and await env.rate_sum("rq") == 5
    assert await env.lease("L1") == {} and await env.hx("L1") is None
    got = await env.events()
    assert [(e["id"], e["k"], e["h"], e["ha"], e["a"], e["n"], e["g"]) for e in got] == [
        ("L1.x", "EXPIRE", "L1", "100", "0", "0", GW)
    ]
    assert (await env.one(expire_op(env.shard, "L1"))).status is LeaseStatus.UNKNOWN


async def test_sync_after_expire_renews(env: Env) -> None:
    await env.one(env.op("L1", 1, want=100, ttl=1000, quotas=(qop(RQ, want=10), qop(CQ, want=4))))
    await env.at(T0 + 1000)
    wrong = await env.one(expire_op(env.shard, "L1"))
    res = await env.one(expire_op(env.shard, "L1", wrong.wallet_key, wrong.counters))
    assert res.status is LeaseStatus.OK
    await env.at(T0 + 1500)
    res = await env.one(
        env.op(
            "L1",
            3,
            keep=20,
            want=10,
            ttl=1000,
            quotas=(qop(RQ, used=2, keep=3, want=2), qop(CQ, keep=1, want=1)),
            events=(LeaseEvent("L1.3.0", 6, 6, 2, "requests", "chat"),),
        )
    )
    assert res.status is LeaseStatus.OK and res.renewed
    # Credits: the keep is held again (forced), plus min(10, (1000 - 20 - 6) // 2).
    assert res.amount == 30 and (await env.wallet())["held"] == 30
    rq, cq = res.quotas
    # Rate: the old grant (5, stamped T0 + 1000) still counts; the used 2 are stamped at now;
    # the 3 carried units are no longer counted anywhere, so they must fit like new ones:
    # available 10 - 5 - 2 = 3, asked 3 + 2, granted 3 // 2 = 1.
    assert rq.granted == 1 and await env.rate_sum("rq") == 8
    assert await env.log("rq") == [
        ("L1.1.1g:5", T0 + 1000),
        ("L1.3.1u:2", T0 + 1500),
        ("L1.3.1g:1", T0 + 2500),
    ]
    # Concurrency: the slot in flight is kept (forced), plus (4 - 0 - 1) // 2.
    assert cq.granted == 2 and await env.counter("cq") == 2
    assert [e["id"] for e in await env.events()] == ["L1.x", "L1.3.0"]


async def test_carried_units_are_checked_once_their_grant_left_the_window(env: Env) -> None:
    """A stalled gateway may not carry units whose grant left the window while others used
    the limit (the grant member is gone from the log: nothing backs the carried units)."""
    a = await env.one(env.op("LA", 1, ttl=1000, quotas=(qop(RQ, want=10),)))
    assert a.quotas[0].granted == 5
    await env.at(T0 + 1000 + 60_000)  # A's grant member leaves the window now
    b = await env.one(env.op("LB", 1, ttl=1000, quotas=(qop(RQ, want=10, want_min=10),)))
    assert b.quotas[0].granted == 10
    late = await env.one(env.op("LA", 2, ttl=1000, quotas=(qop(RQ, keep=5),)))
    assert late.quotas[0].granted == 0 and await env.rate_sum("rq") == 10


# -- the sweeper -----------------------------------------------------------------------------


async def test_sweep_expired_ends_due_leases_and_holds(
    rclient: aioredis.Redis, admission_policy: Policy
) -> None:
    filler = DictFiller(rclient)
    engine = AdmissionEngine(rclient, admission_policy, filler, gateway_id="gw-sweep")
    try:
        p = new_project("ls")
        filler.projects[p] = WalletSnapshot(snap=1000)
        shard = engine.shard_of(p)
        await rclient.set(keys.clock_offset(shard), f"={T0}")
        chat = admission_policy.route("chat")
        assert chat is not None
        d = await engine.admit(engine.request_for(chat, p))  # hold ttl 300 s, cost 10
        assert d.hold is not None
        env = Env(rclient, p)
        conc = admission_policy.quotas["concurrent"]
        due = await env.one(
            env.op("LDUE", 1, want=100, ttl=1000, quotas=(qop(conc, want=1, want_min=1),))
        )
        assert due.amount == 100 and due.quotas[0].granted == 1
        await env.one(env.op("LLIVE", 1, want=10, ttl=400_000))
        assert (await env.wallet())["held"] == 120
        assert await engine.sweep_expired() == 0
        await env.at(T0 + 1000)
        assert await engine.sweep_expired() == 1  # the lease only
        assert (await env.wallet())["held"] == 20
        assert await env.counter("concurrent") == 1 and await env.lease("LDUE") == {}
        await env.at(T0 + 300_000)
        assert await engine.sweep_expired() == 1  # the hold
        w = await env.wallet()
        assert w["held"] == 10 and w["uns"] == 0
        assert await env.counter("concurrent") == 0
        assert sorted((e["k"], e["id"]) for e in await env.events()) == sorted(
            [("EXPIRE", "LDUE.x"), ("EXPIRE", d.hold.hold_id)]
        )
        assert await env.hx("LLIVE") == T0 + 400_000
        await env.at(T0 + 400_000)
        assert await engine.sweep_expired() == 1
        assert (await env.wallet())["held"] == 0
        assert await engine.sweep_expired() == 0
    finally:
        await engine.drain()


# -- Redis Cluster ---------------------------------------------------------------------------


async def test_leases_on_cluster(
    admission_cluster: aioredis.RedisCluster, admission_policy: Policy
) -> None:
    await admission_cluster.initialize()
    filler = DictFiller(admission_cluster)
    engine = AdmissionEngine(admission_cluster, admission_policy, filler, gateway_id="gw-cl")
    store = Store(admission_cluster, gateway_id="gw-cl")
    by_shard: dict[int, str] = {}
    while len(by_shard) < 16:  # one project on every shard: so on every master
        p = new_project("lc")
        by_shard.setdefault(keys.shard_of(p), p)
    projects = list(by_shard.values())
    nodes = {
        admission_cluster.get_node_from_key(keys.wallet(keys.shard_of(p), p)).name for p in projects
    }
    assert len(nodes) == 3, nodes
    shards = {keys.shard_of(p) for p in projects}
    try:
        for shard in shards:
            await admission_cluster.set(keys.clock_offset(shard), f"={T0}")
        for p in projects:
            await write_snapshot(admission_cluster, p, WalletSnapshot(snap=100))
        ops: dict[int, list[LeaseOp]] = {}
        for i, p in enumerate(projects):
            ops.setdefault(keys.shard_of(p), []).append(
                LeaseOp(
                    "SYNC",
                    keys.shard_of(p),
                    f"LC{i}",
                    p,
                    1,
                    1000,
                    0,
                    10,
                    0,
                    UNSL,
                    (qop(CQ, want=2),),
                )
            )
        out = await store.run_leases(ops)
        for shard, res in out.items():
            assert not isinstance(res, BaseException), res
            assert [(r.status, r.amount, r.quotas[0].granted) for r in res] == [
                (LeaseStatus.OK, 10, 2)
            ] * len(ops[shard])
        for p in projects:
            assert (await wallet_of(admission_cluster, p))["held"] == 10
        for shard in shards:
            await admission_cluster.set(keys.clock_offset(shard), f"={T0 + 1000}")
        # The cluster is shared with other tests: their due holds on these shards end too.
        assert await engine.sweep_expired() >= len(projects)
        for p in projects:
            assert (await wallet_of(admission_cluster, p))["held"] == 0
            c = keys.concurrency(keys.shard_of(p), p, "cq")
            assert int(await admission_cluster.get(c) or 0) == 0
            assert [e["k"] for e in await outbox_events(admission_cluster, p)] == ["EXPIRE"]
    finally:
        await engine.drain()
        for shard in shards:
            await admission_cluster.delete(keys.clock_offset(shard))


# -- exactness, by brute force ---------------------------------------------------------------

P_RATE = QuotaDef("pr", QuotaKind.RATE, 4, 2)  # 2 s: grants may outlive a window
P_CONC = QuotaDef("pc", QuotaKind.CONCURRENCY, 5)
P_SNAP = WalletSnapshot(snap=300, od=20, unsl=250)
P_PROJECT = "lp-prop"  # the database is this test's own: a fixed id keeps replays identical
P_GATEWAYS = 3
# A gateway's part in one step ("use+sync" twice: what a busy gateway does most).
ACTS = ["-", "use", "sync", "use+sync", "use+sync", "close"]


@dataclass
class Gateway:
    """What one gateway process knows of its lease, and what Redis holds for it."""

    n: int
    gen: int = 0
    seq: int = 0
    alive: bool = False  # the lease hash exists in Redis
    exp: int = 0
    # Local view.
    amount: int = 0
    spent: int = 0
    events: int = 0  # requests the spent credits stand for
    granted: int = 0  # rate units of the current grant
    used: int = 0
    valid_until: int = -1
    pool: int = 0
    # Redis view: what this lease holds there (from the replies).
    r_amount: int = 0
    r_pool: int = 0

    @property
    def lease_id(self) -> str:
        return f"L{self.n}x{self.gen}"


@dataclass
class World:
    client: aioredis.Redis
    store: Store
    engine: AdmissionEngine
    data: st.DataObject
    now: int = T0
    admitted: list[int] = field(default_factory=list)  # real admission times of rate units
    uns: int = 0
    renewed_seen: bool = False
    gws: list[Gateway] = field(default_factory=list)

    @property
    def shard(self) -> int:
        return keys.shard_of(P_PROJECT)

    def draw_int(self, lo: int, hi: int, label: str) -> int:
        return self.data.draw(st.integers(lo, max(lo, hi)), label=label)

    def draw_most(self, hi: int, label: str) -> int:
        """0..hi, `hi` half of the time: gateways mostly use up and carry all they have."""
        if hi <= 0:
            return 0
        return self.data.draw(st.one_of(st.just(hi), st.integers(0, hi)), label=label)

    def sync_op(self, gw: Gateway, close: bool) -> LeaseOp:
        """What the gateway sends: everything it used; a CLOSE keeps and wants nothing."""
        gw.seq += 1
        ttl = self.data.draw(st.sampled_from([500, 1500, 3000]), label="ttl")

        def draw(lo: int, hi: int, label: str) -> int:
            return 0 if close else self.draw_int(lo, hi, label)

        rate = LeaseQuotaOp(
            P_RATE,
            gw.used,
            0 if close else self.draw_most(gw.granted - gw.used, "rate keep"),
            draw(0, 8, "rate want"),
            0 if close else self.draw_most(P_RATE.limit, "rate want_min"),
        )
        conc = LeaseQuotaOp(
            P_CONC,
            0,
            draw(0, gw.pool, "slots keep"),
            draw(0, 5, "slots want"),
            draw(0, 2, "slots want_min"),
        )
        events: tuple[LeaseEvent, ...] = ()
        if gw.spent:
            ev = LeaseEvent(f"{gw.lease_id}.{gw.seq}.0", gw.spent, gw.spent, gw.events, "m", "r")
            events = (ev,)
        return LeaseOp(
            "CLOSE" if close else "SYNC",
            self.shard,
            gw.lease_id,
            P_PROJECT,
            gw.seq,
            ttl,
            draw(0, gw.amount - gw.spent, "credit keep"),
            draw(0, 200, "credit want"),
            draw(0, 50, "credit want_min"),
            250,
            (rate, conc),
            events,
        )

    def apply(self, gw: Gateway, op: LeaseOp, res: LeaseResult) -> None:
        assert res.status is LeaseStatus.OK, res
        assert res.renewed == (not gw.alive and op.seq > 1)
        self.renewed_seen = self.renewed_seen or res.renewed
        self.uns += gw.spent
        gw.spent = gw.events = gw.used = 0
        rate, conc = res.quotas
        assert rate.granted >= 0 and conc.granted >= op.quotas[1].keep
        assert res.amount >= op.keep
        if op.kind == "CLOSE":
            assert res.amount == 0 and rate.granted == 0 and conc.granted == 0
            gw.gen, gw.seq, gw.alive = gw.gen + 1, 0, False
            gw.amount = gw.r_amount = gw.granted = gw.pool = gw.r_pool = 0
            gw.valid_until = -1
            return
        assert res.expires_ms == self.now + op.ttl_ms
        gw.alive, gw.exp = True, res.expires_ms
        gw.amount = gw.r_amount = res.amount
        gw.granted, gw.valid_until = rate.granted, res.expires_ms
        gw.pool = gw.r_pool = conc.granted

    async def sync(self, batch: list[tuple[Gateway, bool]]) -> None:
        """One lease.lua call for the whole batch (SYNCs and CLOSEs, in order)."""
        ops = [self.sync_op(gw, close) for gw, close in batch]
        out = await self.store.run_leases({self.shard: ops})
        res = out[self.shard]
        assert not isinstance(res, BaseException), res
        for (gw, _), op, r in zip(batch, ops, res, strict=True):
            self.apply(gw, op, r)

    def use(self, gw: Gateway) -> None:
        """Requests admitted from the lease now: rate units (only while the grant is valid),
        credits committed."""
        if self.now <= gw.valid_until and gw.used < gw.granted:
            k = self.draw_most(gw.granted - gw.used, "units used")
            gw.used += k
            self.admitted += [self.now] * k
        credits = self.draw_int(0, gw.amount - gw.spent, "credits spent")
        if credits:
            gw.spent += credits
            gw.events += 1

    async def sweep(self) -> None:
        due = [gw for gw in self.gws if gw.alive and gw.exp <= self.now]
        assert await self.engine.sweep_expired() == len(due)
        for gw in due:
            gw.alive = False
            gw.r_amount = gw.r_pool = 0

    async def check(self) -> None:
        c = self.client
        w = await wallet_of(c, P_PROJECT)
        assert w["held"] == sum(gw.r_amount for gw in self.gws)
        assert w["uns"] == self.uns
        counter = int(await c.get(keys.concurrency(self.shard, P_PROJECT, "pc")) or 0)
        assert counter == sum(gw.r_pool for gw in self.gws)
        if not self.renewed_seen:  # a renewed lease's keep is forced: a stalled gateway's risk
            assert w["held"] + w["uns"] <= P_SNAP.snap + P_SNAP.od
            assert w["held"] + w["uns"] <= P_SNAP.unsl
            assert counter <= P_CONC.limit
        # Rate: every window [t, t + W) holds at most `limit` really admitted units.
        times = sorted(self.admitted)
        win = P_RATE.window_seconds * 1000
        for i, t in enumerate(times):
            inside = bisect.bisect_left(times, t + win) - i
            assert inside <= P_RATE.limit, (t, inside, times)
        # And Redis's own count agrees with what is in the log.
        log = await c.zrange(keys.rate(self.shard, P_PROJECT, "pr"), 0, -1)
        if log:
            total = sum(int(_s(m).rsplit(":", 1)[1]) for m in log)
            assert int(await c.get(keys.rate_sum(self.shard, P_PROJECT, "pr")) or 0) == total


async def _exactness_example(redis_url: str, data: st.DataObject) -> None:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        await client.flushdb()  # this test's own database (the redis_url fixture)
        policy = parse_policy(TEST_POLICY, "test-policy.toml")
        engine = AdmissionEngine(client, policy, DictFiller(client), gateway_id="gw-prop")
        world = World(client, Store(client, gateway_id="gw-prop"), engine, data)
        world.gws = [Gateway(n) for n in range(P_GATEWAYS)]
        await write_snapshot(client, P_PROJECT, P_SNAP)
        await client.set(keys.clock_offset(world.shard), f"={world.now}")
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            # Up to past a grant's ttl + the window: carried units whose grant left the log.
            ms = data.draw(st.sampled_from([0, 0, 1, 250, 1000, 2500, 3000, 9000]), label="ms")
            if ms:
                world.now += ms
                await client.set(keys.clock_offset(world.shard), f"={world.now}")
            acts = [data.draw(st.sampled_from(ACTS), label="act") for _ in world.gws]
            for gw, act in zip(world.gws, acts, strict=True):
                if act.startswith("use"):
                    world.use(gw)
            batch = [
                (gw, act == "close")
                for gw, act in zip(world.gws, acts, strict=True)
                if act in ("sync", "use+sync", "close")
            ]
            if batch:
                await world.sync(batch)
            if data.draw(st.integers(0, 3), label="sweep") == 0:
                await world.sweep()
            await world.check()
        await engine.drain()
    finally:
        await client.aclose()


@pytest.mark.timeout(900)  # shrinking a failure replays many examples against Redis
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_leases_never_over_admit(redis_url: str, data: st.DataObject) -> None:
    """Several gateways' leases on one project, random syncs, uses, closes, sweeps and time:
    the really admitted rate units never exceed the limit in any window, and the wallet's held
    and the concurrency counter are exactly the leases' amounts and pools."""
    asyncio.run(_exactness_example(redis_url, data))


async def test_expire_of_a_close_tombstone_is_unknown(env: Env) -> None:
    await env.one(env.op("L1", 1, want=10, quotas=(qop(RQ, want=2),)))
    await env.one(env.op("L1", 2, kind="CLOSE", quotas=(qop(RQ),)))
    res = await env.one(expire_op(env.shard, "L1"))
    assert res.status is LeaseStatus.UNKNOWN
