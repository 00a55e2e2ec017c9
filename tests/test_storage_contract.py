"""One contract suite for every authority storage backend (SQLite file, PostgreSQL schema).

Each test gets a fresh store: a new SQLite file in tmp_path, or a new schema in the session's
private PostgreSQL database (dropped after the test).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditservice import domain
from creditservice.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from creditservice.storage import Store, open_store
from creditservice.v1 import credit_pb2 as pb

NOW = 1_767_225_600_000
WEEK_MS = 7 * 24 * 3600 * 1000
BACKENDS = ["sqlite", "postgresql"]


@dataclass
class Backend:
    """Where a test store lives, and raw SQL access to it (what an operator could do)."""

    name: str
    url: str
    sqlite_path: str | None = None
    pg_dsn: str | None = None
    pg_schema: str | None = None

    async def raw(self, sql: str) -> None:
        if self.sqlite_path is not None:
            db = sqlite3.connect(self.sqlite_path, isolation_level=None)
            try:
                db.execute(sql)
            finally:
                db.close()
            return
        conn = await asyncpg.connect(self.pg_dsn, server_settings={"search_path": self.pg_schema})
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def drop(self) -> None:
        if self.pg_schema is not None:
            conn = await asyncpg.connect(self.pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.pg_schema}" CASCADE')
            finally:
                await conn.close()


def make_backend(name: str, directory: Path, pg_dsn: str) -> Backend:
    if name == "sqlite":
        path = str(directory / f"store-{uuid.uuid4().hex[:8]}.db")
        return Backend(name, f"sqlite:///{path}", sqlite_path=path)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    return Backend(name, f"{pg_dsn}?schema={schema}", pg_dsn=pg_dsn, pg_schema=schema)


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, pg_dsn: str
) -> AsyncIterator[Backend]:
    b = make_backend(request.param, tmp_path, pg_dsn)
    yield b
    await b.drop()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = await open_store(backend.url)
    yield s
    await s.close()


# ---------------------------------------------------------------- helpers


def rid() -> str:
    return f"r-{uuid.uuid4().hex}"


def new_pid() -> str:
    return f"p-{uuid.uuid4().hex[:12]}"


async def make_wallet(
    store: Store,
    project_id: str | None = None,
    *,
    topup: int = 0,
    threshold: int = 100,
    org: str = "org-a",
    overdraft: int = 0,
    grace_s: int = 0,
    now: int = NOW,
) -> str:
    pid = project_id or new_pid()
    await store.create_wallet(
        pb.CreateWalletRequest(
            request_id=rid(),
            project_id=pid,
            organization_id=org,
            low_balance_threshold=threshold,
            grace_period_seconds=grace_s,
            overdraft_limit=overdraft,
        ),
        now,
    )
    if topup:
        await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=topup), now)
    return pid


async def spend(store: Store, pid: str, amount: int, now: int = NOW) -> pb.RecordUsageResponse:
    return await store.record_usage(
        pb.RecordUsageRequest(request_id=rid(), project_id=pid, meter="requests", amount=amount),
        now,
    )


async def lifecycle_after(store: Store, cursor: int) -> list[tuple[int, int, int]]:
    events = await store.changes_after(cursor, 1000)
    return [
        (e.lifecycle.kind, e.lifecycle.from_state, e.lifecycle.to_state)
        for e in events
        if e.WhichOneof("change") == "lifecycle"
    ]


def commit_event(eid: str, pid: str, amount: int, **kw: Any) -> pb.SettlementEvent:
    return pb.SettlementEvent(
        event_id=eid,
        kind=pb.COMMIT,
        project_id=pid,
        hold_id=eid,
        held_amount=amount,
        amount=amount,
        **kw,
    )


async def ledger(store: Store, pid: str) -> list[pb.LedgerEntry]:
    entries: list[pb.LedgerEntry] = []
    token = ""
    while True:
        page, token = await store.list_transactions(pid, 1000, token)
        entries.extend(page)
        if not token:
            return entries


# ---------------------------------------------------------------- wallets and idempotency


async def test_create_wallet_starts_in_grace_with_default_period(store: Store) -> None:
    pid = new_pid()
    req = pb.CreateWalletRequest(request_id=rid(), project_id=pid, organization_id="org-a")
    w = (await store.create_wallet(req, NOW)).wallet
    assert (w.state, w.balance, w.version) == (pb.GRACE, 0, 1)
    assert w.grace_period_seconds == domain.DEFAULT_GRACE_PERIOD_SECONDS
    assert w.grace_until_ms == NOW + WEEK_MS
    assert await store.get_wallet(pid) == w
    assert (await store.create_wallet(req, NOW + 5)).wallet == w  # replay: first response
    with pytest.raises(AlreadyExists):
        await store.create_wallet(
            pb.CreateWalletRequest(request_id=rid(), project_id=pid, organization_id="org-a"), NOW
        )
    with pytest.raises(NotFound):
        await store.get_wallet(new_pid())


async def test_every_mutation_replays_its_first_response(store: Store) -> None:
    pid = await make_wallet(store, topup=1000)
    key_hash = uuid.uuid4().hex * 2
    calls: list[tuple[str, Callable[[int], Any]]] = []

    def add(name: str, fn: Callable[[int], Any]) -> None:
        calls.append((name, fn))

    top = pb.TopUpRequest(request_id=rid(), project_id=pid, amount=50, reference="pay-1")
    add("top_up", lambda now: store.top_up(top, now))
    adj = pb.AdjustRequest(
        request_id=rid(), project_id=pid, kind=pb.SLA_CREDIT, amount=5, reason="outage"
    )
    add("adjust", lambda now: store.adjust(adj, now))
    pol = pb.SetWalletPolicyRequest(
        request_id=rid(),
        project_id=pid,
        low_balance_threshold=10,
        grace_period_seconds=60,
        overdraft_limit=7,
    )
    add("set_wallet_policy", lambda now: store.set_wallet_policy(pol, now))
    quota = pb.Quota(
        project_id=pid, name="rpm", algorithm=pb.SLIDING_WINDOW, limit=10, window_seconds=60
    )
    sq = pb.SetQuotaRequest(request_id=rid(), quota=quota)
    add("set_quota", lambda now: store.set_quota(sq, now))
    dq = pb.DeleteQuotaRequest(request_id=rid(), project_id=pid, name="rpm")
    add("delete_quota", lambda now: store.delete_quota(dq, now))
    usage = pb.RecordUsageRequest(
        request_id=rid(), project_id=pid, meter="machine_hours", amount=30, quantity=2
    )
    add("record_usage", lambda now: store.record_usage(usage, now))
    issue = pb.IssueApiKeyRequest(request_id=rid(), project_id=pid, name="ci")
    add(
        "issue_api_key",
        lambda now: store.issue_api_key(
            issue, f"key_{uuid.uuid4().hex[:16]}", key_hash, "cg_abc", now
        ),
    )
    for name, fn in calls:
        first = await fn(NOW + 1)
        version = (await store.get_wallet(pid)).version
        cursor = await store.last_cursor()
        again = await fn(NOW + 2)
        assert again == first, name
        assert (await store.get_wallet(pid)).version == version, name
        assert await store.last_cursor() == cursor, name

    key = await store.resolve_api_key(key_hash)
    revoke = pb.RevokeApiKeyRequest(request_id=rid(), key_id=key.key_id)
    first_revoke = await store.revoke_api_key(revoke, NOW + 3)
    assert await store.revoke_api_key(revoke, NOW + 4) == first_revoke

    res_req = pb.ReserveRequest(request_id=rid(), project_id=pid, amount=20)
    reserved = await store.reserve(res_req, NOW)
    assert await store.reserve(res_req, NOW) == reserved
    commit = pb.CommitRequest(
        request_id=rid(), reservation_id=reserved.reservation.reservation_id, amount=15
    )
    committed = await store.commit(commit, NOW)
    assert await store.commit(commit, NOW) == committed
    res2 = await store.reserve(pb.ReserveRequest(request_id=rid(), project_id=pid, amount=5), NOW)
    release = pb.ReleaseRequest(request_id=rid(), reservation_id=res2.reservation.reservation_id)
    released = await store.release(release, NOW)
    assert await store.release(release, NOW) == released
    w = await store.get_wallet(pid)
    assert (w.balance, w.reserved) == (1000 + 50 + 5 - 30 - 15, 0)
    assert await store.verify() == []


async def test_same_request_id_with_other_parameters_is_refused(store: Store) -> None:
    pid = await make_wallet(store)
    req = pb.TopUpRequest(request_id=rid(), project_id=pid, amount=10)
    await store.top_up(req, NOW)
    other = pb.TopUpRequest(request_id=req.request_id, project_id=pid, amount=11)
    with pytest.raises(FailedPrecondition, match="different"):
        await store.top_up(other, NOW)
    # Idempotency is per method: the same id on another method is a new request.
    await store.record_usage(
        pb.RecordUsageRequest(request_id=req.request_id, project_id=pid, amount=1), NOW
    )
    assert (await store.get_wallet(pid)).balance == 9


async def test_failures_are_recorded_and_replayed(store: Store) -> None:
    pid = new_pid()
    req = pb.TopUpRequest(request_id=rid(), project_id=pid, amount=10)
    with pytest.raises(NotFound) as first:
        await store.top_up(req, NOW)
    await make_wallet(store, pid)
    # The project exists now, but the request id already has its (failed) outcome.
    with pytest.raises(NotFound) as again:
        await store.top_up(req, NOW)
    assert again.value.message == first.value.message
    assert (await store.get_wallet(pid)).balance == 0

    reserve = pb.ReserveRequest(request_id=rid(), project_id=pid, amount=10)
    with pytest.raises(FailedPrecondition):
        await store.reserve(reserve, NOW)
    await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=100), NOW)
    with pytest.raises(FailedPrecondition):
        await store.reserve(reserve, NOW)
    with pytest.raises(FailedPrecondition, match="different"):
        await store.top_up(
            pb.TopUpRequest(request_id=req.request_id, project_id=pid, amount=3), NOW
        )
    assert await store.verify() == []


async def test_adjust_kinds_and_signs(store: Store) -> None:
    pid = await make_wallet(store, topup=100, threshold=0)
    for kind, amount, expected in (
        (pb.REFUND, 10, 10),
        (pb.SLA_CREDIT, 5, 5),
        (pb.ADJUSTMENT, -20, -20),
        (pb.ADJUSTMENT, 3, 3),
    ):
        resp = await store.adjust(
            pb.AdjustRequest(
                request_id=rid(), project_id=pid, kind=kind, amount=amount, reason="x"
            ),
            NOW,
        )
        assert (resp.entry.kind, resp.entry.amount, resp.entry.description) == (kind, expected, "x")
    assert (await store.get_wallet(pid)).balance == 98
    with pytest.raises(InvalidArgument):
        await store.adjust(
            pb.AdjustRequest(request_id=rid(), project_id=pid, kind=pb.TOPUP, amount=1, reason="x"),
            NOW,
        )


async def test_balances_stay_where_the_gateways_compute_exactly(store: Store) -> None:
    """Redis scripts compute with doubles (exact to 2^53): a top-up, credit or adjustment
    that would leave a balance beyond MAX_BALANCE is refused, and nothing is written."""
    pid = await make_wallet(store, topup=domain.MAX_BALANCE - 10**15, threshold=0)
    await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=10**15), NOW)
    version = (await store.get_wallet(pid)).version
    with pytest.raises(FailedPrecondition, match="maximum"):
        await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=1), NOW)
    with pytest.raises(FailedPrecondition, match="maximum"):
        await store.adjust(
            pb.AdjustRequest(request_id=rid(), project_id=pid, kind=pb.REFUND, amount=1), NOW
        )
    wallet = await store.get_wallet(pid)
    assert (wallet.balance, wallet.version) == (domain.MAX_BALANCE, version)
    low = await make_wallet(store, threshold=0)
    for _ in range(5):
        await store.adjust(
            pb.AdjustRequest(
                request_id=rid(), project_id=low, kind=pb.ADJUSTMENT, amount=-(10**15)
            ),
            NOW,
        )
    with pytest.raises(FailedPrecondition, match="maximum"):
        await store.adjust(
            pb.AdjustRequest(request_id=rid(), project_id=low, kind=pb.ADJUSTMENT, amount=-1), NOW
        )
    assert (await store.get_wallet(low)).balance == -domain.MAX_BALANCE
    assert await store.verify() == []


async def test_concurrent_mutations_serialize(store: Store) -> None:
    pid = await make_wallet(store, threshold=0)
    await asyncio.gather(
        *(
            store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=i), NOW)
            for i in range(1, 41)
        ),
        *(spend(store, pid, 1) for _ in range(20)),
    )
    w = await store.get_wallet(pid)
    assert w.balance == sum(range(1, 41)) - 20
    assert w.version == 61
    assert await store.verify() == []


async def test_cancelled_mutations_leave_the_store_consistent(store: Store) -> None:
    """A caller that gives up mid-transaction (deadline, disconnect) never wedges the store."""
    pid = await make_wallet(store, threshold=0)
    for i in range(25):
        req = pb.TopUpRequest(request_id=rid(), project_id=pid, amount=1)
        task = asyncio.create_task(store.top_up(req, NOW))
        for _ in range(i):
            await asyncio.sleep(0)  # let it reach a different step each round
        task.cancel()
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        assert not isinstance(outcome, Exception), outcome  # cancelled or done, nothing else
    await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=1000), NOW)
    await store.settle([commit_event(f"k{i}", pid, 1) for i in range(3)], NOW)
    assert await store.verify() == []
    entries = await ledger(store, pid)
    assert (await store.get_wallet(pid)).balance == sum(e.amount for e in entries)


# ---------------------------------------------------------------- lifecycle


async def test_lifecycle_transitions_emit_exact_events(store: Store) -> None:
    pid = await make_wallet(store, threshold=100, grace_s=60)
    c = await store.last_cursor()
    await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=150), NOW)
    assert await lifecycle_after(store, c) == [(pb.WALLET_RESTORED, pb.GRACE, pb.HEALTHY)]

    c = await store.last_cursor()
    w = (await spend(store, pid, 60)).wallet  # 90: HEALTHY -> LOW
    assert w.state == pb.LOW
    await spend(store, pid, 10)  # 80: LOW -> LOW, no second alert
    assert await lifecycle_after(store, c) == [(pb.LOW_BALANCE_ALERT, pb.HEALTHY, pb.LOW)]

    c = await store.last_cursor()
    await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=100), NOW)  # 180
    await spend(store, pid, 100)  # 80: a new crossing alerts again
    assert await lifecycle_after(store, c) == [(pb.LOW_BALANCE_ALERT, pb.HEALTHY, pb.LOW)]

    c = await store.last_cursor()
    t1 = NOW + 1000
    w = (await spend(store, pid, 80, now=t1)).wallet  # 0: LOW -> GRACE
    assert (w.state, w.grace_until_ms) == (pb.GRACE, t1 + 60_000)
    await spend(store, pid, 5, now=t1 + 10)  # stays GRACE, deadline kept
    assert (await store.get_wallet(pid)).grace_until_ms == t1 + 60_000
    assert await lifecycle_after(store, c) == [(pb.GRACE_STARTED, pb.LOW, pb.GRACE)]

    assert await store.expire_grace(t1 + 59_999) == 0
    c = await store.last_cursor()
    assert await store.expire_grace(t1 + 60_000) == 1
    w = await store.get_wallet(pid)
    assert (w.state, w.grace_until_ms) == (pb.EXPIRED, t1 + 60_000)
    assert await lifecycle_after(store, c) == [(pb.WALLET_EXPIRED, pb.GRACE, pb.EXPIRED)]
    assert await store.expire_grace(t1 + 120_000) == 0
    await spend(store, pid, 1)  # still <= 0: stays EXPIRED
    assert (await store.get_wallet(pid)).state == pb.EXPIRED

    c = await store.last_cursor()
    w = (
        await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=56), NOW)
    ).wallet
    assert (w.balance, w.state, w.grace_until_ms) == (50, pb.LOW, 0)
    assert await lifecycle_after(store, c) == [(pb.WALLET_RESTORED, pb.EXPIRED, pb.LOW)]


async def test_healthy_straight_to_grace_alerts_then_starts_grace(store: Store) -> None:
    pid = await make_wallet(store, topup=500, threshold=100)
    c = await store.last_cursor()
    await spend(store, pid, 600)
    assert await lifecycle_after(store, c) == [
        (pb.LOW_BALANCE_ALERT, pb.HEALTHY, pb.GRACE),
        (pb.GRACE_STARTED, pb.HEALTHY, pb.GRACE),
    ]
    events = [e for e in await store.changes_after(c, 100) if e.HasField("lifecycle")]
    assert events[1].lifecycle.grace_until_ms == NOW + WEEK_MS
    assert events[1].lifecycle.balance == -100


async def test_policy_change_reevaluates_state(store: Store) -> None:
    pid = await make_wallet(store, topup=150, threshold=100)
    c = await store.last_cursor()
    w = (
        await store.set_wallet_policy(
            pb.SetWalletPolicyRequest(
                request_id=rid(),
                project_id=pid,
                low_balance_threshold=200,
                grace_period_seconds=30,
                overdraft_limit=0,
            ),
            NOW,
        )
    ).wallet
    assert (w.state, w.low_balance_threshold, w.grace_period_seconds) == (pb.LOW, 200, 30)
    assert await lifecycle_after(store, c) == [(pb.LOW_BALANCE_ALERT, pb.HEALTHY, pb.LOW)]


# ---------------------------------------------------------------- settle


async def test_settle_applies_and_deduplicates_across_and_within_batches(store: Store) -> None:
    pid = await make_wallet(store, topup=1000, threshold=0)
    other = await make_wallet(store, topup=1000, threshold=0)
    batch = [
        commit_event("e1", pid, 10, meter="tokens", route="/v1/chat"),
        commit_event("e2", pid, 20),
        pb.SettlementEvent(event_id="e3", kind=pb.RELEASE, project_id=pid, held_amount=5),
        commit_event("e4", other, 0),
        commit_event("e1", pid, 10, meter="tokens", route="/v1/chat"),
        pb.SettlementEvent(event_id="e5", kind=pb.EXPIRE, project_id=other, held_amount=5),
    ]
    resp = await store.settle(batch, NOW)
    statuses = [(r.event_id, r.status) for r in resp.results]
    assert statuses == [
        ("e1", pb.APPLIED),
        ("e2", pb.APPLIED),
        ("e3", pb.APPLIED),
        ("e4", pb.APPLIED),
        ("e1", pb.DUPLICATE),
        ("e5", pb.APPLIED),
    ]
    seq1 = resp.results[0].ledger_seq
    assert seq1 > 0 and resp.results[4].ledger_seq == seq1
    assert resp.results[1].ledger_seq == seq1 + 1
    assert resp.results[2].ledger_seq == resp.results[3].ledger_seq == 0
    by_pid = {w.project_id: w for w in resp.wallets}
    assert by_pid[pid].balance == 970 and by_pid[other].balance == 1000
    assert by_pid[pid] == await store.get_wallet(pid)

    entries = await ledger(store, pid)
    e1 = next(e for e in entries if e.seq == seq1)
    assert (e1.kind, e1.amount, e1.meter, e1.route, e1.quantity, e1.reference) == (
        pb.USAGE,
        -10,
        "tokens",
        "/v1/chat",
        1,
        "e1",
    )
    e2 = next(e for e in entries if e.seq == seq1 + 1)
    assert (e2.meter, e2.balance_after) == ("requests", 970)

    version = (await store.get_wallet(pid)).version
    cursor = await store.last_cursor()
    again = await store.settle(list(reversed(batch)), NOW + 1)
    assert {r.status for r in again.results} == {pb.DUPLICATE}
    assert {r.event_id: r.ledger_seq for r in again.results} == {
        r.event_id: r.ledger_seq for r in resp.results
    }
    # Each DUPLICATE still carries its wallet as it stands (no new version): a gateway acking
    # a re-sent batch needs the balance that includes the events.
    assert sorted(w.project_id for w in again.wallets) == sorted([pid, other])
    assert {w.project_id: w for w in again.wallets}[pid] == await store.get_wallet(pid)
    assert (await store.get_wallet(pid)).version == version
    assert await store.last_cursor() == cursor
    assert await store.verify() == []


async def test_settle_rejects_unknown_project_and_replays_the_rejection(store: Store) -> None:
    pid = await make_wallet(store, topup=100, threshold=0)
    ghost = new_pid()
    resp = await store.settle([commit_event("x1", ghost, 5), commit_event("x2", pid, 5)], NOW)
    assert [r.status for r in resp.results] == [pb.REJECTED, pb.APPLIED]
    assert ghost in resp.results[0].error
    await make_wallet(store, ghost, topup=100)
    again = await store.settle([commit_event("x1", ghost, 5)], NOW)
    assert again.results[0].status == pb.REJECTED
    assert again.results[0].error == resp.results[0].error
    assert (await store.get_wallet(ghost)).balance == 100
    assert (await store.settle([], NOW)).results == []


async def test_settle_records_quantity_and_rejects_a_negative_one(store: Store) -> None:
    """USAGE quantity = the event's quantity, 0 (unset) meaning 1; a negative one is REJECTED
    (the boundary refuses it first; the store holds the same rule) and replays as REJECTED."""
    pid = await make_wallet(store, topup=1000, threshold=0)
    resp = await store.settle(
        [
            commit_event("q1", pid, 40, quantity=37),
            commit_event("q2", pid, 5),
            commit_event("q3", pid, 6, quantity=-2),
            pb.SettlementEvent(event_id="q4", kind=pb.EXPIRE, project_id=pid, held_amount=9),
        ],
        NOW,
    )
    assert [r.status for r in resp.results] == [pb.APPLIED, pb.APPLIED, pb.REJECTED, pb.APPLIED]
    assert "quantity" in resp.results[2].error and "-2" in resp.results[2].error
    assert resp.results[2].ledger_seq == 0
    assert resp.wallets[0].balance == 1000 - 45
    usage = {e.reference: e.quantity for e in await ledger(store, pid) if e.kind == pb.USAGE}
    assert usage == {"q1": 37, "q2": 1}
    cursor = await store.last_cursor()
    again = await store.settle([commit_event("q3", pid, 6, quantity=3)], NOW + 1)
    assert (again.results[0].status, again.results[0].error) == (
        pb.REJECTED,
        resp.results[2].error,
    )
    assert (await store.get_wallet(pid)).balance == 1000 - 45
    assert await store.last_cursor() == cursor
    assert await store.verify() == []


async def test_settle_changes_once_per_wallet_per_batch(store: Store) -> None:
    pid = await make_wallet(store, topup=300, threshold=100)
    cursor = await store.last_cursor()
    version = (await store.get_wallet(pid)).version
    resp = await store.settle([commit_event(f"b{i}", pid, 50) for i in range(5)], NOW)
    assert resp.wallets[0].balance == 50 and resp.wallets[0].state == pb.LOW
    assert resp.wallets[0].version == version + 1
    changes = await store.changes_after(cursor, 100)
    assert [c.WhichOneof("change") for c in changes] == ["wallet", "lifecycle"]
    assert changes[0].wallet == resp.wallets[0]
    assert changes[1].lifecycle.kind == pb.LOW_BALANCE_ALERT
    # Many events, one crossing into GRACE, computed once for the batch.
    cursor = await store.last_cursor()
    await store.settle([commit_event(f"c{i}", pid, 30) for i in range(3)], NOW)
    assert await lifecycle_after(store, cursor) == [(pb.GRACE_STARTED, pb.LOW, pb.GRACE)]


@pytest.fixture(scope="module", params=BACKENDS)
def model_backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_dsn: str
) -> Iterator[Backend]:
    """One store location for all examples of the model test (each example uses new ids)."""
    b = make_backend(request.param, tmp_path_factory.mktemp("model"), pg_dsn)
    yield b
    asyncio.run(b.drop())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_settle_model_random_batches(model_backend: Backend, data: st.DataObject) -> None:
    """Random batches with repeats and reorderings: balances equal the model, replays are no-ops."""
    n_events = data.draw(st.integers(1, 40), label="events")
    universe = [
        pb.SettlementEvent(
            event_id=f"ev-{i}",
            kind=data.draw(st.sampled_from([pb.COMMIT, pb.COMMIT, pb.RELEASE, pb.EXPIRE])),
            project_id=data.draw(st.sampled_from(["a", "b", "c", "ghost"])),
            amount=0,
        )
        for i in range(n_events)
    ]
    for e in universe:
        if e.kind == pb.COMMIT:
            e.amount = data.draw(st.integers(0, 500))
    batches = data.draw(
        st.lists(
            st.lists(st.integers(0, n_events - 1), min_size=1, max_size=30), min_size=1, max_size=6
        ),
        label="batches",
    )
    replay_order = data.draw(st.permutations(range(len(batches))), label="replay order")
    asyncio.run(_run_settle_model(model_backend, universe, batches, replay_order))


async def _run_settle_model(
    b: Backend,
    universe: list[pb.SettlementEvent],
    batches: list[list[int]],
    replay_order: list[int],
) -> None:
    store = await open_store(b.url)
    try:
        suffix = uuid.uuid4().hex[:8]
        names = {p: f"{p}-{suffix}" for p in ("a", "b", "c", "ghost")}
        for p in ("a", "b", "c"):
            await make_wallet(store, names[p], topup=10_000, threshold=1000)
        seen: set[str] = set()
        charged = {p: 0 for p in ("a", "b", "c")}
        entries = {p: 1 for p in ("a", "b", "c")}  # the top-up
        for batch in batches:
            events = [_renamed(universe[i], names) for i in batch]
            resp = await store.settle(events, NOW)
            for idx, r in zip(batch, resp.results, strict=True):
                e = universe[idx]
                if e.project_id == "ghost":
                    assert r.status == pb.REJECTED
                elif e.event_id in seen:
                    assert r.status == pb.DUPLICATE
                else:
                    assert r.status == pb.APPLIED
                    charged[e.project_id] += e.amount if e.kind == pb.COMMIT else 0
                    entries[e.project_id] += e.kind == pb.COMMIT and e.amount > 0
                seen.add(e.event_id)
        balances = {p: (await store.get_wallet(names[p])).balance for p in charged}
        assert balances == {p: 10_000 - c for p, c in charged.items()}
        cursor = await store.last_cursor()
        for i in replay_order:
            resp = await store.settle([_renamed(universe[j], names) for j in batches[i]], NOW + 5)
            assert all(r.status in (pb.DUPLICATE, pb.REJECTED) for r in resp.results)
        assert {p: (await store.get_wallet(names[p])).balance for p in charged} == balances
        assert await store.last_cursor() == cursor
        assert {p: len(await ledger(store, names[p])) for p in entries} == entries
        assert await store.verify() == []
    finally:
        await store.close()


def _renamed(e: pb.SettlementEvent, names: dict[str, str]) -> pb.SettlementEvent:
    out = pb.SettlementEvent()
    out.CopyFrom(e)
    out.project_id = names[e.project_id]
    out.event_id = f"{e.event_id}-{names['a']}"
    return out


# ---------------------------------------------------------------- reservations


async def test_reservation_commit_overage_release_and_expiry(store: Store) -> None:
    pid = await make_wallet(store, topup=100, threshold=0, overdraft=10)
    r1 = await store.reserve(pb.ReserveRequest(request_id=rid(), project_id=pid, amount=60), NOW)
    res = r1.reservation
    assert (res.state, res.meter, res.expires_at_ms) == (pb.ACTIVE, "requests", NOW + 300_000)
    assert (r1.wallet.reserved, r1.wallet.available, r1.wallet.balance) == (60, 40, 100)
    assert await store.get_reservation(res.reservation_id) == res
    with pytest.raises(FailedPrecondition, match="insufficient"):
        await store.reserve(pb.ReserveRequest(request_id=rid(), project_id=pid, amount=51), NOW)
    r2 = await store.reserve(pb.ReserveRequest(request_id=rid(), project_id=pid, amount=50), NOW)
    assert r2.wallet.available == -10  # within the overdraft allowance

    with pytest.raises(FailedPrecondition, match="allow_overage"):
        await store.commit(
            pb.CommitRequest(request_id=rid(), reservation_id=res.reservation_id, amount=61), NOW
        )
    c = await store.commit(
        pb.CommitRequest(
            request_id=rid(), reservation_id=res.reservation_id, amount=70, allow_overage=True
        ),
        NOW,
    )
    assert (c.reservation.state, c.reservation.committed_amount) == (pb.COMMITTED, 70)
    assert (c.entry.kind, c.entry.amount, c.entry.reference) == (pb.USAGE, -70, res.reservation_id)
    assert (c.wallet.balance, c.wallet.reserved) == (30, 50)
    with pytest.raises(FailedPrecondition, match="COMMITTED"):
        await store.release(
            pb.ReleaseRequest(request_id=rid(), reservation_id=res.reservation_id), NOW
        )

    rel = await store.release(
        pb.ReleaseRequest(request_id=rid(), reservation_id=r2.reservation.reservation_id), NOW
    )
    assert (rel.reservation.state, rel.wallet.reserved, rel.wallet.balance) == (pb.RELEASED, 0, 30)

    r3 = await store.reserve(
        pb.ReserveRequest(request_id=rid(), project_id=pid, amount=5, ttl_seconds=10, meter="gpu"),
        NOW,
    )
    zero = await store.reserve(pb.ReserveRequest(request_id=rid(), project_id=pid, amount=5), NOW)
    done = await store.commit(
        pb.CommitRequest(
            request_id=rid(), reservation_id=zero.reservation.reservation_id, amount=0
        ),
        NOW,
    )
    assert not done.HasField("entry") and done.wallet.balance == 30
    assert await store.expire_reservations(NOW + 9_999) == 0
    assert await store.expire_reservations(NOW + 10_000) == 1
    expired = await store.get_reservation(r3.reservation.reservation_id)
    assert (expired.state, expired.ended_at_ms) == (pb.EXPIRED_RESERVATION, NOW + 10_000)
    assert (await store.get_wallet(pid)).reserved == 0
    with pytest.raises(FailedPrecondition):
        await store.commit(
            pb.CommitRequest(
                request_id=rid(), reservation_id=r3.reservation.reservation_id, amount=1
            ),
            NOW + 10_001,
        )
    with pytest.raises(NotFound):
        await store.get_reservation("res_missing")
    with pytest.raises(NotFound):
        await store.release(pb.ReleaseRequest(request_id=rid(), reservation_id="res_missing"), NOW)
    assert await store.verify() == []


async def test_commit_past_expiry_is_refused_before_the_job_runs(store: Store) -> None:
    pid = await make_wallet(store, topup=100, threshold=0)
    r = await store.reserve(
        pb.ReserveRequest(request_id=rid(), project_id=pid, amount=5, ttl_seconds=1), NOW
    )
    with pytest.raises(FailedPrecondition, match="expired"):
        await store.commit(
            pb.CommitRequest(
                request_id=rid(), reservation_id=r.reservation.reservation_id, amount=5
            ),
            NOW + 1000,
        )


async def test_reserve_refused_in_grace(store: Store) -> None:
    pid = await make_wallet(store, overdraft=1000)
    with pytest.raises(FailedPrecondition, match="GRACE"):
        await store.reserve(pb.ReserveRequest(request_id=rid(), project_id=pid, amount=1), NOW)


# ---------------------------------------------------------------- quotas and keys


async def test_quotas_set_get_list_delete(store: Store) -> None:
    pid = await make_wallet(store)
    with pytest.raises(NotFound):
        await store.set_quota(
            pb.SetQuotaRequest(
                request_id=rid(), quota=pb.Quota(project_id=new_pid(), name="x", limit=1)
            ),
            NOW,
        )
    cursor = await store.last_cursor()
    q = pb.Quota(
        project_id=pid, name="rpm", algorithm=pb.SLIDING_WINDOW, limit=100, window_seconds=60
    )
    first = (await store.set_quota(pb.SetQuotaRequest(request_id=rid(), quota=q), NOW)).quota
    assert (first.limit, first.updated_at_ms) == (100, NOW) and first.version > 0
    conc = pb.Quota(project_id=pid, name="concurrent", algorithm=pb.CONCURRENCY, limit=3)
    await store.set_quota(pb.SetQuotaRequest(request_id=rid(), quota=conc), NOW)
    q.limit = 200
    second = (await store.set_quota(pb.SetQuotaRequest(request_id=rid(), quota=q), NOW + 1)).quota
    assert second.version > first.version and await store.get_quota(pid, "rpm") == second
    assert [x.name for x in await store.list_quotas(pid)] == ["concurrent", "rpm"]
    deleted = (
        await store.delete_quota(
            pb.DeleteQuotaRequest(request_id=rid(), project_id=pid, name="rpm"), NOW
        )
    ).quota
    assert deleted == second
    with pytest.raises(NotFound):
        await store.get_quota(pid, "rpm")
    with pytest.raises(NotFound):
        await store.delete_quota(
            pb.DeleteQuotaRequest(request_id=rid(), project_id=pid, name="rpm"), NOW
        )
    third = (await store.set_quota(pb.SetQuotaRequest(request_id=rid(), quota=q), NOW + 2)).quota
    assert third.version > second.version  # re-created: the version never goes back
    changes = [c for c in await store.changes_after(cursor, 100) if c.HasField("quota")]
    assert [(c.quota.quota.name, c.quota.deleted) for c in changes] == [
        ("rpm", False),
        ("concurrent", False),
        ("rpm", False),
        ("rpm", True),
        ("rpm", False),
    ]
    assert all(c.project_id == pid for c in changes)
    with pytest.raises(NotFound):
        await store.list_quotas(new_pid())


async def test_api_keys_issue_resolve_revoke(store: Store) -> None:
    pid = await make_wallet(store)
    key_hash = "ab" * 32
    req = pb.IssueApiKeyRequest(request_id=rid(), project_id=pid, name="ci")
    issued = (
        await store.issue_api_key(req, "key_0123456789abcdef", key_hash, "cg_abcdefg", NOW)
    ).key
    replay = (await store.issue_api_key(req, "key_fedcba9876543210", "cd" * 32, "cg_x", NOW)).key
    assert replay == issued  # a replay returns the first key; the new id/hash are not stored
    with pytest.raises(NotFound):
        await store.resolve_api_key("cd" * 32)
    assert await store.resolve_api_key(key_hash) == issued
    key, snapshot = await store.resolve_api_key_with_snapshot(key_hash)
    assert key == issued and snapshot == await store.get_snapshot(pid)
    with pytest.raises(NotFound):
        await store.resolve_api_key_with_snapshot("cd" * 32)
    with pytest.raises(NotFound):
        await store.issue_api_key(
            pb.IssueApiKeyRequest(request_id=rid(), project_id=new_pid(), name="x"),
            "key_1",
            "ef" * 32,
            "cg",
            NOW,
        )
    cursor = await store.last_cursor()
    revoked = (
        await store.revoke_api_key(
            pb.RevokeApiKeyRequest(request_id=rid(), key_id=issued.key_id), NOW + 5
        )
    ).key
    assert revoked.revoked_at_ms == NOW + 5
    assert (await store.resolve_api_key(key_hash)).revoked_at_ms == NOW + 5
    key, snapshot = await store.resolve_api_key_with_snapshot(key_hash)
    assert key.revoked_at_ms == NOW + 5 and snapshot is None
    changes = await store.changes_after(cursor, 10)
    assert [c.WhichOneof("change") for c in changes] == ["key_revoked"]
    assert changes[0].key_revoked == pb.ApiKeyRevoked(
        key_id=issued.key_id, key_hash=key_hash, project_id=pid
    )
    # Revoking again (new request) changes nothing and keeps the first revocation time.
    again = (
        await store.revoke_api_key(
            pb.RevokeApiKeyRequest(request_id=rid(), key_id=issued.key_id), NOW + 9
        )
    ).key
    assert again.revoked_at_ms == NOW + 5
    with pytest.raises(NotFound):
        await store.revoke_api_key(
            pb.RevokeApiKeyRequest(request_id=rid(), key_id="key_missing"), NOW
        )


# ---------------------------------------------------------------- ledger, verify, reads


async def test_ledger_is_append_only(store: Store, backend: Backend) -> None:
    pid = await make_wallet(store, topup=100)
    with pytest.raises((sqlite3.IntegrityError, asyncpg.PostgresError), match="append-only"):
        await backend.raw(f"UPDATE ledger SET amount = 1000 WHERE project_id = '{pid}'")
    with pytest.raises((sqlite3.IntegrityError, asyncpg.PostgresError), match="append-only"):
        await backend.raw(f"DELETE FROM ledger WHERE project_id = '{pid}'")
    assert [e.amount for e in await ledger(store, pid)] == [100]


async def test_verify_detects_tampering(store: Store, backend: Backend) -> None:
    pid = await make_wallet(store, topup=100)
    await spend(store, pid, 30)
    await store.reserve(pb.ReserveRequest(request_id=rid(), project_id=pid, amount=5), NOW)
    assert await store.verify() == []
    await backend.raw(f"UPDATE wallets SET balance = balance + 1 WHERE project_id = '{pid}'")
    problems = await store.verify()
    assert any("stored balance 71 != ledger sum 70" in p for p in problems), problems
    await backend.raw(f"UPDATE wallets SET balance = 70, reserved = 0 WHERE project_id = '{pid}'")
    assert any("reserved" in p for p in await store.verify())
    # Someone with DDL rights bypasses the append-only guard: the balance_after chain breaks.
    await backend.raw(f"UPDATE wallets SET reserved = 5 WHERE project_id = '{pid}'")
    assert await store.verify() == []
    unguard = (
        "DROP TRIGGER ledger_no_update"
        if backend.name == "sqlite"
        else "ALTER TABLE ledger DISABLE TRIGGER ledger_no_change"
    )
    await backend.raw(unguard)
    await backend.raw(f"UPDATE ledger SET amount = -31 WHERE project_id = '{pid}' AND amount = -30")
    problems = await store.verify()
    assert any("balance_after 70 != running sum 69" in p for p in problems), problems
    assert any("stored balance 70 != ledger sum 69" in p for p in problems), problems


async def test_list_wallets_pages_by_organization(store: Store) -> None:
    org = f"org-{uuid.uuid4().hex[:6]}"
    pids = sorted([await make_wallet(store, org=org) for _ in range(5)])
    await make_wallet(store, org="elsewhere")
    seen: list[str] = []
    token = ""
    while True:
        page, token = await store.list_wallets(org, 2, token)
        assert len(page) <= 2
        seen.extend(w.project_id for w in page)
        if not token:
            break
    assert seen == pids
    everything, token = await store.list_wallets("", 0, "")
    assert len(everything) == 6 and token == ""
    with pytest.raises(InvalidArgument):
        await store.list_wallets(org, 2, "not a token!")
    with pytest.raises(InvalidArgument):
        await store.list_transactions(pids[0], 2, "dzpub3Q")  # a wallet token, not a ledger one


async def test_list_transactions_newest_first(store: Store) -> None:
    pid = await make_wallet(store, threshold=0)
    for i in range(1, 8):
        await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=i), NOW + i)
    page, token = await store.list_transactions(pid, 3, "")
    assert [e.amount for e in page] == [7, 6, 5] and token
    page2, token = await store.list_transactions(pid, 3, token)
    page3, token = await store.list_transactions(pid, 3, token)
    assert [e.amount for e in page2 + page3] == [4, 3, 2, 1] and token == ""
    assert page[0].balance_after == 28 and page[0].kind == pb.TOPUP
    with pytest.raises(NotFound):
        await store.list_transactions(new_pid(), 3, "")
    with pytest.raises(InvalidArgument):
        await store.list_transactions(pid, 3, "%%%")


async def test_explain_usage_groups_by_meter(store: Store) -> None:
    pid = await make_wallet(store, topup=10_000)
    await store.record_usage(
        pb.RecordUsageRequest(
            request_id=rid(), project_id=pid, meter="machine_hours", amount=300, quantity=3
        ),
        NOW + 10,
    )
    await store.settle([commit_event("u1", pid, 7), commit_event("u2", pid, 8)], NOW + 20)
    report = await store.explain_usage(pid, 0, 0)
    assert [(m.meter, m.amount, m.quantity, m.entries) for m in report.meters] == [
        ("machine_hours", 300, 3, 1),
        ("requests", 15, 2, 2),
    ]
    assert report.total_amount == 315 and report.wallet.balance == 10_000 - 315
    late = await store.explain_usage(pid, NOW + 15, NOW + 100)
    assert [(m.meter, m.amount) for m in late.meters] == [("requests", 15)]
    assert (await store.explain_usage(pid, NOW, NOW + 15)).total_amount == 300


async def test_snapshot_and_change_log(store: Store) -> None:
    assert (await store.last_cursor(), await store.oldest_cursor()) == (0, 0)
    notified: list[int] = []
    store.add_change_listener(notified.append)
    pid = await make_wallet(store, topup=100)
    other = await make_wallet(store, topup=50, now=NOW + 100)
    await store.set_quota(
        pb.SetQuotaRequest(
            request_id=rid(),
            quota=pb.Quota(project_id=pid, name="c", algorithm=pb.CONCURRENCY, limit=2),
        ),
        NOW + 200,
    )
    snap = await store.get_snapshot(pid)
    assert snap.wallet == await store.get_wallet(pid)
    assert [q.name for q in snap.quotas] == ["c"]
    assert snap.cursor == await store.last_cursor() == notified[-1]
    changes = await store.changes_after(0, 1000)
    cursors = [c.cursor for c in changes]
    assert cursors == sorted(set(cursors)) and cursors[0] == await store.oldest_cursor()
    assert all(c.project_id in (pid, other) for c in changes)
    assert [c.cursor for c in await store.changes_after(cursors[1], 2)] == cursors[2:4]
    assert await store.prune_changes(NOW + 100) == len(
        [c for c in changes if c.occurred_at_ms < NOW + 100]
    )
    assert await store.oldest_cursor() > cursors[0]
    assert await store.prune_changes(NOW + 10**9) > 0
    assert await store.last_cursor() == cursors[-1] == await store.oldest_cursor()
    await store.top_up(pb.TopUpRequest(request_id=rid(), project_id=pid, amount=1), NOW + 300)
    assert await store.last_cursor() > cursors[-1]


async def test_error_types_are_service_errors(store: Store) -> None:
    with pytest.raises(ServiceError):
        await store.get_quota(new_pid(), "x")


async def test_bad_urls_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        await open_store("mysql://localhost/db")
    with pytest.raises(InvalidArgument):
        await open_store("postgresql://postgres@127.0.0.1/x?schema=Bad-Name")


# ---------------------------------------------------------------- the pure lifecycle rules


@given(
    threshold=st.integers(0, 100),
    balances=st.lists(st.integers(-50, 150), min_size=1, max_size=30),
    expire_at=st.sets(st.integers(0, 29)),
)
def test_domain_transitions_alert_once_per_crossing(
    threshold: int, balances: list[int], expire_at: set[int]
) -> None:
    policy = domain.Policy(threshold, 60)
    start = domain.transition(domain.UNSPECIFIED, 0, 0, NOW, policy)
    assert (start.state, start.grace_until_ms, start.events) == (domain.GRACE, NOW + 60_000, ())
    state, until = start.state, start.grace_until_ms
    for i, balance in enumerate(balances):
        now = NOW + i * 1000
        t = domain.transition(state, until, balance, now, policy)
        kinds = [e.kind for e in t.events]
        crossed = state == domain.HEALTHY and (balance < threshold or balance <= 0)
        assert kinds.count(pb.LOW_BALANCE_ALERT) == (1 if crossed else 0)
        assert (pb.GRACE_STARTED in kinds) == (
            balance <= 0 and state in (domain.HEALTHY, domain.LOW)
        )
        assert (pb.WALLET_RESTORED in kinds) == (
            balance > 0 and state in (domain.GRACE, domain.EXPIRED)
        )
        if balance > 0:
            assert t.state == domain.state_for_balance(balance, threshold) and t.grace_until_ms == 0
        else:
            assert t.state in (domain.GRACE, domain.EXPIRED) and t.grace_until_ms > 0
            assert t.grace_until_ms == (
                until if state in (domain.GRACE, domain.EXPIRED) else now + 60_000
            )
        state, until = t.state, t.grace_until_ms
        if i in expire_at:
            e = domain.expire_grace(state, until, balance, now + 60_000)
            assert (e.state == domain.EXPIRED) == (state in (domain.GRACE, domain.EXPIRED))
            assert [x.kind for x in e.events] == (
                [pb.WALLET_EXPIRED] if state == domain.GRACE else []
            )
            state = e.state
        assert domain.state_is_consistent(state, balance, threshold)
