"""The real admission scripts on a real Redis against the reference model, step by step.

Hypothesis drives admit / commit / release / clock + sweep / top-up / quota change / flush /
crash; decisions must equal the model's and invariants 1-3 are checked after every step. The
model is given the clock each script reports, so time-derived values compare exactly.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import hypothesis.strategies as st
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from admission import keys
from admission import model as m
from admission.decision import QuotaKind
from admission.policy import QuotaDef
from admission.redis_client import RedisSettings, build_client
from admission.store import AdmitOp, AdmitResult, SettleOp, SettleResult, SettleStatus, Store
from tests.fixtures_admission import WalletSnapshot, write_snapshot

T = TypeVar("T")
SHARDS = 16
GATEWAY = "gw-model"
DEFAULT_UNSL = 500
VIRTUAL_START_MS = 1_800_000_000_000  # the scripts' frozen clock at the start of every example
QUOTAS = {
    "r1": QuotaDef("r1", QuotaKind.RATE, 3, 5),
    "r2": QuotaDef("r2", QuotaKind.RATE, 10, 60),
    "c1": QuotaDef("c1", QuotaKind.CONCURRENCY, 2, 0),
}


@dataclass
class Handle:
    hold_id: str
    project: str
    shard: int
    amount: int
    counters: tuple[str, ...]


@dataclass
class Admitted:
    """One admitted rate entry, with the quota config in force when it was admitted."""

    t: int
    weight: int
    limit: int
    window_ms: int
    epoch: int


async def _wrap(aw: Awaitable[T]) -> T:
    return await aw


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class AdmissionMachine(RuleBasedStateMachine):
    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        client = build_client(
            RedisSettings(url=self.redis_url, socket_timeout_s=5.0, connect_timeout_s=5.0)
        )
        assert isinstance(client, aioredis.Redis)
        self.client = client
        self.run(client.flushdb())  # this test's own database (see the test function)
        self.store = Store(client, gateway_id=GATEWAY)
        self.model = m.Model(gateway=GATEWAY)
        self.projects: list[str] = []
        self.snapshots: dict[str, WalletSnapshot] = {}
        self.handles: list[Handle] = []
        self.ended: list[Handle] = []
        self.overage_seen: set[str] = set()
        self.rate_log: dict[tuple[str, str], list[Admitted]] = defaultdict(list)
        self.epoch: dict[tuple[str, str], int] = defaultdict(int)
        self.events: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.stream_pos: dict[int, str] = {}
        # Ids are counters, not random: each example has an empty database of its own, and a
        # replay must put the same projects on the same shards and order holds the same way.
        self.group = "sm-model"
        self.next_id = 0
        self.clock_ms = VIRTUAL_START_MS

    def new_id(self) -> str:
        self.next_id += 1
        return f"h{self.next_id:08d}"

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(_wrap(aw))

    def shard(self, project: str) -> int:
        return keys.shard_of(project, SHARDS)

    # -- setup ------------------------------------------------------------------------------

    @initialize(
        wallets=st.lists(
            st.tuples(
                st.integers(0, 63),  # the project's number: drawn, so projects may share shards
                st.integers(0, 200),
                st.sampled_from([0, 10]),
                st.sampled_from([0, 50]),
                st.sampled_from([40, 120, 1000]),
            ),
            min_size=2,
            max_size=3,
            unique_by=lambda w: w[0],
        )
    )
    def setup(self, wallets: list[tuple[int, int, int, int, int]]) -> None:
        for number, snap, od, low, unsl in wallets:
            p = f"sm-p{number}"
            self.projects.append(p)
            self.snapshots[p] = WalletSnapshot(snap=snap, od=od, low=low, unsl=unsl)
        for shard in {self.shard(p) for p in self.projects}:
            self.run(self._start_stream(shard))
            # Frozen virtual time: outcomes (and so Hypothesis's later draws) depend only on
            # the steps, never on how long a step took in real time.
            self.run(self.client.set(keys.clock_offset(shard), f"={self.clock_ms}"))

    async def _start_stream(self, shard: int) -> None:
        out = keys.outbox(shard)
        info = await self.client.xinfo_stream(out) if await self.client.exists(out) else None
        self.stream_pos[shard] = _s(info["last-generated-id"]) if info else "0-0"
        await self.client.xgroup_create(out, self.group, id="$", mkstream=True)

    def teardown(self) -> None:
        try:
            if self.projects:
                # Every hold a crashed gateway forgot must still end: by expiry.
                self.advance_and_sweep(400)
                assert not [h for h in self.model.holds.values() if h.state == "ACTIVE"]
                self.invariants_hold()
                for shard in self.stream_pos:
                    self.run(self.client.xgroup_destroy(keys.outbox(shard), self.group))
        finally:
            self.run(self.client.aclose())
            self.loop.close()

    # -- admit ------------------------------------------------------------------------------

    @rule(
        data=st.data(),
        cost=st.sampled_from([0, 0, 1, 5, 10, 30, 60]),
        times=st.integers(1, 4),
        quotas=st.lists(st.sampled_from(sorted(QUOTAS)), unique=True, max_size=3),
        weight=st.integers(1, 3),
        ttl_s=st.sampled_from([1, 2, 5]),
        overage=st.booleans(),
    )
    def admit(
        self,
        data: st.DataObject,
        cost: int,
        times: int,
        quotas: list[str],
        weight: int,
        ttl_s: int,
        overage: bool,
    ) -> None:
        project = data.draw(st.sampled_from(self.projects))
        for _ in range(times):
            self.admit_one(project, cost, quotas, weight, ttl_s, overage)

    # The same rule twice: rules are drawn uniformly, and admissions are what builds up state.
    @rule(
        data=st.data(),
        cost=st.sampled_from([0, 0, 1, 5, 10, 30, 60]),
        times=st.integers(1, 4),
        quotas=st.lists(st.sampled_from(sorted(QUOTAS)), unique=True, max_size=3),
        weight=st.integers(1, 3),
        ttl_s=st.sampled_from([1, 2, 5]),
        overage=st.booleans(),
    )
    def admit_more(
        self,
        data: st.DataObject,
        cost: int,
        times: int,
        quotas: list[str],
        weight: int,
        ttl_s: int,
        overage: bool,
    ) -> None:
        self.admit(data, cost, times, quotas, weight, ttl_s, overage)

    def make_op(
        self, project: str, cost: int, quotas: list[str], weight: int, ttl_s: int, overage: bool
    ) -> AdmitOp:
        return AdmitOp(
            shard=self.shard(project),
            project_id=project,
            op_id=self.new_id(),
            cost=cost,
            weight=weight,
            ttl_ms=ttl_s * 1000,
            meter="tokens",
            route="r",
            allow_overage=overage,
            unsettled_limit=DEFAULT_UNSL,
            quotas=tuple(QUOTAS[q] for q in quotas),
        )

    def fill_both(self, project: str) -> None:
        """The cache fill of a cold project, in Redis and in the model."""
        snap = self.snapshots[project]
        self.run(write_snapshot(self.client, project, snap, SHARDS))
        self.model.apply_snapshot(
            project,
            snap=snap.snap,
            ver=snap.ver,
            state=snap.state,
            low=snap.low,
            od=snap.od,
            gu=snap.gu,
            unsl=snap.unsl,
        )
        # A fill replaces the project's quota overrides with the authority's.
        self.model.quota_defs[project] = dict(snap.quotas)
        for name in QUOTAS:
            self.epoch[(project, name)] += 1

    def admit_one(
        self,
        project: str,
        cost: int,
        quotas: list[str],
        weight: int,
        ttl_s: int,
        overage: bool,
    ) -> None:
        op = self.make_op(project, cost, quotas, weight, ttl_s, overage)
        real = self.admit_real(op)
        expect = self.admit_model(op, real.now_ms)
        if real.status == m.COLD:
            assert expect.status == m.COLD
            self.fill_both(project)
            real = self.admit_real(op)
            expect = self.admit_model(op, real.now_ms)
        self.compare_admit(real, expect)
        self.record(op, real)

    def record(self, op: AdmitOp, real: AdmitResult) -> None:
        if real.status == m.ADMITTED:
            for q in real.quotas:
                if q.kind is QuotaKind.RATE:
                    key = (op.project_id, q.name)
                    self.rate_log[key].append(
                        Admitted(
                            real.now_ms,
                            op.weight,
                            q.limit,
                            q.window_seconds * 1000,
                            self.epoch[key],
                        )
                    )
        if real.hold_created:
            self.handles.append(Handle(op.op_id, op.project_id, op.shard, op.cost, real.counters))

    @rule(data=st.data(), n=st.integers(2, 8))
    def admit_batch(self, data: st.DataObject, n: int) -> None:
        """Several ops in one script call per shard (the engine's batching), in order."""
        by_shard: dict[int, list[AdmitOp]] = defaultdict(list)
        for _ in range(n):
            op = self.make_op(
                data.draw(st.sampled_from(self.projects)),
                data.draw(st.sampled_from([0, 0, 1, 5, 10, 30])),
                data.draw(st.lists(st.sampled_from(sorted(QUOTAS)), unique=True, max_size=3)),
                data.draw(st.integers(1, 3)),
                data.draw(st.sampled_from([1, 2, 5])),
                data.draw(st.booleans()),
            )
            by_shard[op.shard].append(op)
        results, _ = self.run(self.store.run(by_shard, {}))
        cold: list[AdmitOp] = []
        for shard, ops in by_shard.items():
            res = results[shard]
            assert not isinstance(res, BaseException), res
            assert len(res) == len(ops)
            for op, real in zip(ops, res, strict=True):
                expect = self.admit_model(op, real.now_ms)
                self.compare_admit(real, expect)
                if real.status == m.COLD:
                    cold.append(op)
                else:
                    self.record(op, real)
        for project in dict.fromkeys(op.project_id for op in cold):
            self.fill_both(project)
        for op in cold:
            real = self.admit_real(op)
            self.compare_admit(real, self.admit_model(op, real.now_ms))
            self.record(op, real)

    @precondition(lambda self: len(self.handles) >= 2)
    @rule(data=st.data(), k=st.integers(2, 5))
    def settle_batch(self, data: st.DataObject, k: int) -> None:
        """Several settles in one script call per shard; the same hold may appear twice."""
        by_shard: dict[int, list[tuple[Handle, SettleOp]]] = defaultdict(list)
        for _ in range(k):
            h = data.draw(st.sampled_from(self.handles))
            kind = data.draw(st.sampled_from(["COMMIT", "RELEASE"]))
            amount = data.draw(st.sampled_from([-1, 0, h.amount, h.amount + 1]))
            op = SettleOp(
                h.shard,
                h.hold_id,
                kind,
                amount if kind == "COMMIT" else 0,
                keys.wallet(h.shard, h.project),
                h.counters,
            )
            by_shard[h.shard].append((h, op))
        _, results = self.run(
            self.store.run({}, {s: [op for _, op in v] for s, v in by_shard.items()})
        )
        for shard, items in by_shard.items():
            res = results[shard]
            assert not isinstance(res, BaseException), res
            for (h, op), real in zip(items, res, strict=True):
                want = self.model.settle(
                    now=real.now_ms, hold_id=op.hold_id, kind=op.kind, amount=op.amount
                )
                assert (int(real.status), real.state, real.amount) == (
                    want.status,
                    want.state,
                    want.amount,
                )
                if real.status is SettleStatus.ENDED:
                    if op.kind == "COMMIT" and real.amount > h.amount:
                        self.overage_seen.add(h.project)
                    if h in self.handles:
                        self.handles.remove(h)
                    self.ended.append(h)

    def admit_real(self, op: AdmitOp) -> AdmitResult:
        results, _ = self.run(self.store.run({op.shard: [op]}, {}))
        res = results[op.shard]
        assert not isinstance(res, BaseException), res
        return res[0]

    def admit_model(self, op: AdmitOp, now: int) -> m.AdmitOutcome:
        return self.model.admit(
            now=now,
            project=op.project_id,
            op_id=op.op_id,
            cost=op.cost,
            weight=op.weight,
            ttl_ms=op.ttl_ms,
            meter=op.meter,
            route=op.route,
            overage=op.allow_overage,
            quotas=op.quotas,
            unsettled_limit=op.unsettled_limit,
        )

    @staticmethod
    def compare_admit(real: AdmitResult, expect: m.AdmitOutcome) -> None:
        got = (
            int(real.status),
            real.reason,
            real.retry_after,
            int(real.wallet_state),
            real.low,
            real.grace_until_ms,
            real.hold_created,
        )
        want = (
            expect.status,
            expect.reason,
            expect.retry_after,
            int(expect.wallet_state),
            expect.low,
            expect.grace_until_ms,
            expect.hold_created,
        )
        assert got == want
        got_q = [
            (q.name, q.kind, q.limit, q.window_seconds, q.remaining, q.reset_seconds)
            for q in real.quotas
        ]
        want_q = [
            (q.name, q.kind, q.limit, q.window_seconds, q.remaining, q.reset_seconds)
            for q in expect.quotas
        ]
        assert got_q == want_q

    # -- settle -----------------------------------------------------------------------------

    def settle_real(
        self,
        shard: int,
        hold_id: str,
        kind: str,
        amount: int,
        wallet_key: str | None,
        counters: tuple[str, ...],
    ) -> SettleResult:
        op = SettleOp(shard, hold_id, kind, amount, wallet_key, counters)
        _, results = self.run(self.store.run({}, {shard: [op]}))
        res = results[shard]
        assert not isinstance(res, BaseException), res
        out = res[0]
        if out.status is SettleStatus.WRONG_KEYS:
            return self.settle_real(shard, hold_id, kind, amount, out.wallet_key, out.counters)
        return out

    def settle_both(self, h: Handle, kind: str, amount: int) -> SettleResult:
        real = self.settle_real(
            h.shard, h.hold_id, kind, amount, keys.wallet(h.shard, h.project), h.counters
        )
        expect = self.model.settle(now=real.now_ms, hold_id=h.hold_id, kind=kind, amount=amount)
        assert (int(real.status), real.state, real.amount) == (
            expect.status,
            expect.state,
            expect.amount,
        )
        if real.status is SettleStatus.ENDED and kind == "COMMIT" and real.amount > h.amount:
            self.overage_seen.add(h.project)
        return real

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), how=st.sampled_from(["held", "less", "equal", "more"]))
    def commit(self, data: st.DataObject, how: str) -> None:
        h = data.draw(st.sampled_from(self.handles))
        if how == "held":
            amount = -1
        elif how == "less":
            amount = data.draw(st.integers(0, max(0, h.amount - 1)))
        elif how == "equal":
            amount = h.amount
        else:
            amount = h.amount + data.draw(st.sampled_from([1, 2, 5, 20]))
        res = self.settle_both(h, "COMMIT", amount)
        if res.status is not SettleStatus.OVER_HOLD:
            self.handles.remove(h)
            self.ended.append(h)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self.handles))
        self.settle_both(h, "RELEASE", 0)
        self.handles.remove(h)
        self.ended.append(h)

    @precondition(lambda self: self.ended)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["COMMIT", "RELEASE"]),
        ghost=st.sampled_from([False, False, False, True]),
    )
    def settle_ended_or_unknown(self, data: st.DataObject, kind: str, ghost: bool) -> None:
        if ghost:
            project = data.draw(st.sampled_from(self.projects))
            h = Handle(self.new_id(), project, self.shard(project), 1, ())
            assert self.settle_both(h, kind, 1).status is SettleStatus.UNKNOWN
            return
        h = data.draw(st.sampled_from(self.ended))
        assert self.settle_both(h, kind, -1).status is SettleStatus.ALREADY_ENDED

    # -- clock, sweep, crash --------------------------------------------------------------

    @rule(seconds=st.sampled_from([1, 2, 3, 5, 7, 30, 61]))
    def advance_and_sweep(self, seconds: int) -> None:
        shards = sorted({self.shard(p) for p in self.projects})
        self.clock_ms += seconds * 1000
        for shard in shards:
            self.run(self.client.set(keys.clock_offset(shard), f"={self.clock_ms}"))
        due = self.run(self.store.due_holds(shards, 10_000))
        for shard, d in due.items():
            mine = [hid for hid in d.hold_ids if hid in self.model.holds]
            expect = [
                hid
                for hid in self.model.due(d.now_ms)
                if self.shard(self.model.holds[hid].project) == shard
            ]
            assert mine == expect
            for hid in mine:
                h = self.model.holds[hid]
                handle = Handle(hid, h.project, shard, h.amount, ())
                real = self.settle_real(shard, hid, "EXPIRE", 0, None, ())
                want = self.model.settle(now=real.now_ms, hold_id=hid, kind="EXPIRE", amount=0)
                assert (int(real.status), real.state, real.amount) == (
                    want.status,
                    want.state,
                    want.amount,
                )
                self.handles = [x for x in self.handles if x.hold_id != hid]
                self.ended.append(handle)

    @rule()
    def crash(self) -> None:
        """A gateway dies: its hold handles are gone; only expiry can end those holds."""
        self.handles.clear()

    # -- authority side -------------------------------------------------------------------

    @rule(
        data=st.data(),
        extra=st.integers(0, 100),
        state=st.sampled_from([1, 1, 2, 3, 4]),
        od=st.sampled_from([0, 10]),
    )
    def top_up(self, data: st.DataObject, extra: int, state: int, od: int) -> None:
        project = data.draw(st.sampled_from(self.projects))
        w = self.model.wallets.get(project)
        if w is None:
            return
        gu = 1_900_000_000_000 if state == 3 else 0
        new = {
            "snap": w.snap + extra,
            "ver": w.ver + 1,
            "state": state,
            "low": w.low,
            "od": max(od, w.od),
            "gu": gu,
        }
        self.run(
            self.client.hset(
                keys.wallet(self.shard(project), project),  # type: ignore[misc]
                mapping=new,
            )
        )
        self.model.apply_snapshot(project, **new)

    @rule(
        data=st.data(),
        quota=st.sampled_from(sorted(QUOTAS)),
        value=st.one_of(
            st.none(),
            st.builds(lambda lim, win: f"rate:{lim}:{win}", st.integers(1, 6), st.integers(1, 10)),
            st.builds(lambda lim: f"concurrency:{lim}:0", st.integers(0, 3)),
        ),
    )
    def change_quota(self, data: st.DataObject, quota: str, value: str | None) -> None:
        project = data.draw(st.sampled_from(self.projects))
        key = keys.quota_defs(self.shard(project), project)
        defs = self.model.quota_defs.setdefault(project, {})
        if value is None:
            self.run(self.client.hdel(key, quota))  # type: ignore[misc]
            defs.pop(quota, None)
        else:
            self.run(self.client.hset(key, quota, value))  # type: ignore[misc]
            defs[quota] = value
        self.epoch[(project, quota)] += 1

    @rule(count=st.sampled_from([1, 3, 1000]))
    def flush(self, count: int) -> None:
        """The flusher, test-side: ack entries; only acked COMMITs leave uns (and the
        authority's next snapshot is lower by the same amount)."""
        self.run(self.read_new_events())
        for shard in sorted(self.stream_pos):
            out = keys.outbox(shard)
            got = self.run(self.client.xreadgroup(self.group, "c", {out: ">"}, count=count))
            for _, entries in got:
                for entry_id, fields in entries:
                    e = {_s(k): _s(v) for k, v in fields.items()}
                    acked = self.run(self.client.xack(out, self.group, entry_id))
                    p = e[keys.E_PROJECT]
                    if acked != 1 or p not in self.projects or e[keys.E_KIND] != "COMMIT":
                        continue
                    amount = int(e[keys.E_AMOUNT])
                    wkey = keys.wallet(shard, p)
                    w = self.model.wallets[p]
                    self.run(self.client.hincrby(wkey, keys.W_UNSETTLED, -amount))  # type: ignore[misc]
                    self.model.acknowledge(p, amount)
                    new = {
                        "snap": w.snap - amount,
                        "ver": w.ver + 1,
                        "state": w.state,
                        "low": w.low,
                        "od": w.od,
                        "gu": w.gu,
                    }
                    self.run(self.client.hset(wkey, mapping=new))  # type: ignore[misc]
                    self.model.apply_snapshot(p, **new)

    # -- invariants -------------------------------------------------------------------------

    async def read_new_events(self) -> None:
        for shard, pos in self.stream_pos.items():
            entries = await self.client.xrange(keys.outbox(shard), min=f"({pos}")
            for entry_id, fields in entries:
                self.stream_pos[shard] = _s(entry_id)
                e = {_s(k): _s(v) for k, v in fields.items()}
                if e[keys.E_PROJECT] in self.projects:
                    self.events[e[keys.E_EVENT_ID]].append(e)

    @invariant()
    def invariants_hold(self) -> None:
        if not self.projects:
            return
        self.run(self._check())

    async def _check(self) -> None:
        c = self.client
        await self.read_new_events()
        # Invariant 2: one event per ended hold, none for active ones, fields as the model.
        ended = {e.hold_id: e for e in self.model.outbox}
        for hid, h in self.model.holds.items():
            evs = self.events.get(hid, [])
            if h.state == "ACTIVE":
                assert evs == [], (hid, evs)
                continue
            assert len(evs) == 1, (hid, evs)
            e, want = evs[0], ended[hid]
            assert (
                e["id"],
                e["h"],
                e["k"],
                e["p"],
                int(e["ha"]),
                int(e["a"]),
                e["m"],
                e["r"],
                int(e["t"]),
                e["g"],
            ) == (
                want.hold_id,
                want.hold_id,
                want.kind,
                want.project,
                want.held,
                want.amount,
                want.meter,
                want.route,
                want.t,
                want.gateway,
            )
        assert set(self.events) <= set(self.model.holds)

        for p in self.projects:
            shard = self.shard(p)
            raw = await c.hgetall(keys.wallet(shard, p))  # type: ignore[misc]
            mw = self.model.wallets.get(p)
            if mw is None:
                assert raw == {}
                continue
            w = {_s(k): int(v) for k, v in raw.items()}
            assert (w["held"], w["uns"], w["snap"], w["ver"], w["state"]) == (
                mw.held,
                mw.uns,
                mw.snap,
                mw.ver,
                mw.state,
            )
            # held == sum of ACTIVE holds, read from the real hold hashes.
            active = 0
            for hid, h in self.model.holds.items():
                if h.project != p:
                    continue
                a, s = await c.hmget(keys.hold(shard, hid), ["a", "s"])  # type: ignore[misc]
                assert _s(s) == h.state
                if _s(s) == "ACTIVE":
                    active += int(a)
            assert w["held"] == active == self.model.active_held(p)
            # Invariant 1 (credits): never beyond the snapshot plus overdraft.
            if p not in self.overage_seen:
                assert w["held"] + w["uns"] <= w["snap"] + w["od"]
            # Invariant 1 (concurrency): the counter is exactly the holds in flight.
            for name in QUOTAS:
                real_c = int(await c.get(keys.concurrency(shard, p, name)) or 0)
                in_flight = sum(
                    1
                    for h in self.model.holds.values()
                    if h.project == p and h.state == "ACTIVE" and name in h.counters
                )
                assert real_c == in_flight == self.model.counters.get((p, name), 0)
        # Invariant 1 (rate): within one quota config, no window holds more than the limit.
        for entries in self.rate_log.values():
            for at in entries:
                inside = sum(
                    x.weight
                    for x in entries
                    if x.epoch == at.epoch and at.t - at.window_ms < x.t <= at.t
                )
                assert inside <= at.limit


def test_scripts_match_the_model(redis_url: str) -> None:
    # A logical database of this test's own, emptied at the start of every example: a replay
    # while shrinking must not meet holds, outbox entries or clocks of earlier examples.
    AdmissionMachine.redis_url = redis_url
    run_state_machine_as_test(
        AdmissionMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
