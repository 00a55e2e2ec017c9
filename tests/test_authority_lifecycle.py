"""Wallet lifecycle end to end over gRPC, on SQLite and PostgreSQL: HEALTHY -> LOW (one alert per
crossing) -> GRACE (deadline) -> EXPIRED (ManualClock + jobs) -> a top-up restores; every
transition is observed on Watch. Also the reservation-expiry job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest

from creditservice.clock import ManualClock
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from tests.fixtures_authority import (
    admin_md,
    credit_stub,
    make_wallet,
    new_project_id,
    next_watch_event,
)

if TYPE_CHECKING:
    from creditservice.v1.credit_pb2_grpc import CreditServiceAsyncStub as Stub


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> AuthorityServer:
    # Sync on purpose: the session's pg_dsn fixture must not start inside a running loop.
    name = "authority" if request.param == "sqlite" else "authority_pg"
    srv: AuthorityServer = request.getfixturevalue(name)
    return srv


class Step:
    """Runs one change and collects exactly the Watch events it caused (up to the log's end)."""

    def __init__(self, srv: AuthorityServer, call: Any, cursor: int) -> None:
        self.srv = srv
        self.call = call
        self.cursor = cursor

    @classmethod
    async def watch(cls, srv: AuthorityServer, stub: Stub, pid: str) -> Step:
        md = admin_md(srv.config.admin_token)
        call = stub.Watch(pb.WatchRequest(project_ids=[pid]), metadata=md)
        opening = await next_watch_event(call, 5.0, skip_heartbeats=False)
        return cls(srv, call, opening.cursor)

    async def events(self) -> list[pb.WatchEvent]:
        end = await self.srv.core.store.last_cursor()
        got: list[pb.WatchEvent] = []
        while self.cursor < end:
            event = await next_watch_event(self.call, 1.0)
            got.append(event)
            self.cursor = event.cursor
        return got

    async def lifecycle(self) -> list[tuple[int, int, int]]:
        return [
            (e.lifecycle.kind, e.lifecycle.from_state, e.lifecycle.to_state)
            for e in await self.events()
            if e.HasField("lifecycle")
        ]


async def settle(stub: Stub, md: Any, pid: str, event_id: str, amount: int) -> pb.Wallet:
    resp: pb.SettleResponse = await stub.Settle(
        pb.SettleRequest(
            events=[
                pb.SettlementEvent(
                    event_id=event_id,
                    kind=pb.COMMIT,
                    project_id=pid,
                    hold_id=event_id,
                    held_amount=amount,
                    amount=amount,
                )
            ]
        ),
        metadata=md,
    )
    assert resp.results[0].status == pb.APPLIED
    (wallet,) = resp.wallets
    return wallet


async def top_up(stub: Stub, md: Any, pid: str, rid: str, amount: int) -> pb.Wallet:
    resp: pb.TopUpResponse = await stub.TopUp(
        pb.TopUpRequest(request_id=rid, project_id=pid, amount=amount), metadata=md
    )
    return resp.wallet


async def check(stub: Stub, md: Any, pid: str, cost: int) -> pb.CheckAdmissionResponse:
    resp: pb.CheckAdmissionResponse = await stub.CheckAdmission(
        pb.CheckAdmissionRequest(project_id=pid, cost=cost), metadata=md
    )
    return resp


async def test_wallet_lifecycle(backend: AuthorityServer) -> None:
    srv = backend
    clock = srv.clock
    assert isinstance(clock, ManualClock)
    token = srv.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
        stub = credit_stub(ch)
        wallet = await make_wallet(
            stub, token, pid, balance=5_000, low_balance_threshold=1_000, grace_period_seconds=60
        )
        assert wallet.state == pb.HEALTHY
        step = await Step.watch(srv, stub, pid)

        # HEALTHY -> LOW: one alert.
        wallet = await settle(stub, md, pid, "e1", 4_500)
        assert (wallet.balance, wallet.state) == (500, pb.LOW)
        assert await step.lifecycle() == [(pb.LOW_BALANCE_ALERT, pb.HEALTHY, pb.LOW)]
        # LOW -> LOW: no second alert for the same crossing.
        wallet = await settle(stub, md, pid, "e2", 100)
        assert wallet.state == pb.LOW
        assert await step.lifecycle() == []
        # Back above the threshold, then below again: a new crossing alerts once more.
        wallet = await top_up(stub, md, pid, "t1", 2_000)
        assert (wallet.balance, wallet.state) == (2_400, pb.HEALTHY)
        assert await step.lifecycle() == []
        await settle(stub, md, pid, "e3", 1_500)
        assert await step.lifecycle() == [(pb.LOW_BALANCE_ALERT, pb.HEALTHY, pb.LOW)]

        # LOW -> GRACE at balance <= 0, with the deadline = now + grace period.
        started = clock.now_ms()
        wallet = await settle(stub, md, pid, "e4", 1_000)
        assert (wallet.balance, wallet.state) == (-100, pb.GRACE)
        assert wallet.grace_until_ms == started + 60_000
        events = [e for e in await step.events() if e.HasField("lifecycle")]
        assert [(e.lifecycle.kind, e.lifecycle.to_state) for e in events] == [
            (pb.GRACE_STARTED, pb.GRACE)
        ]
        assert events[0].lifecycle.grace_until_ms == started + 60_000
        grace = await check(stub, md, pid, 1)
        assert not grace.allowed and grace.reason == pb.ADMISSION_REASON_WALLET_GRACE
        assert (await check(stub, md, pid, 0)).allowed  # free routes still pass in GRACE

        # Before the deadline the grace job changes nothing.
        clock.advance(seconds=59)
        assert (await srv.run_jobs_once()).grace_expired == 0
        assert (await check(stub, md, pid, 0)).allowed

        # GRACE -> EXPIRED once the deadline passed (the job or its background loop).
        clock.advance(seconds=1)
        await srv.run_jobs_once()
        assert await step.lifecycle() == [(pb.WALLET_EXPIRED, pb.GRACE, pb.EXPIRED)]
        expired = await check(stub, md, pid, 0)
        assert not expired.allowed and expired.reason == pb.ADMISSION_REASON_WALLET_EXPIRED
        assert expired.wallet.state == pb.EXPIRED

        # A top-up that lifts the balance above 0 restores the wallet.
        wallet = await top_up(stub, md, pid, "t2", 10_000)
        assert (wallet.balance, wallet.state, wallet.grace_until_ms) == (9_900, pb.HEALTHY, 0)
        assert await step.lifecycle() == [(pb.WALLET_RESTORED, pb.EXPIRED, pb.HEALTHY)]
        assert (await check(stub, md, pid, 9_900)).allowed
        step.call.cancel()


async def test_healthy_straight_to_grace_alerts_too(backend: AuthorityServer) -> None:
    token = backend.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    async with grpc.aio.insecure_channel(backend.grpc_target) as ch:
        stub = credit_stub(ch)
        await make_wallet(stub, token, pid, balance=100, low_balance_threshold=50)
        step = await Step.watch(backend, stub, pid)
        await settle(stub, md, pid, "all", 150)
        assert await step.lifecycle() == [
            (pb.LOW_BALANCE_ALERT, pb.HEALTHY, pb.GRACE),
            (pb.GRACE_STARTED, pb.HEALTHY, pb.GRACE),
        ]
        step.call.cancel()


async def test_reservation_expiry_job(backend: AuthorityServer) -> None:
    clock = backend.clock
    assert isinstance(clock, ManualClock)
    token = backend.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    async with grpc.aio.insecure_channel(backend.grpc_target) as ch:
        stub = credit_stub(ch)
        await make_wallet(stub, token, pid, balance=1_000)
        held = await stub.Reserve(
            pb.ReserveRequest(request_id="r", project_id=pid, amount=300, ttl_seconds=30),
            metadata=md,
        )
        rid = held.reservation.reservation_id
        assert held.wallet.available == 700
        step = await Step.watch(backend, stub, pid)
        clock.advance(seconds=31)
        await backend.run_jobs_once()
        got = await stub.GetReservation(pb.GetReservationRequest(reservation_id=rid), metadata=md)
        assert got.reservation.state == pb.EXPIRED_RESERVATION
        changed = [e for e in await step.events() if e.HasField("wallet")]
        assert changed and changed[-1].wallet.available == 1_000
        assert changed[-1].wallet.reserved == 0
        step.call.cancel()
