"""Invariant 3 over real gRPC: re-sending a Settle batch or a unary mutation changes nothing and
returns the original result, failures included.

A Hypothesis test replays random Settle batches (subsets, duplicates, reorderings, exact
re-sends) against a model of per-event deduplication; unary replays run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from tests.fixtures_authority import (
    admin_md,
    authority_state,
    credit_stub,
    expect_rpc_error,
    make_wallet,
    new_project_id,
)

if TYPE_CHECKING:
    from creditservice.v1.credit_pb2_grpc import CreditServiceAsyncStub as Stub

START_BALANCE = 1_000_000
UNKNOWN = "ghost-project"


@dataclass(frozen=True)
class Ev:
    event_id: str
    kind: int
    project: int  # index into the example's projects; 2 = a project that does not exist
    amount: int

    def message(self, projects: list[str], run: str) -> pb.SettlementEvent:
        # Examples share one authority: ids carry the example's run id so none collide.
        return pb.SettlementEvent(
            event_id=f"{run}-{self.event_id}",
            kind=self.kind,  # type: ignore[arg-type]
            project_id=projects[self.project],
            hold_id=self.event_id,
            held_amount=max(self.amount, 1),
            amount=self.amount,
        )


@dataclass
class Model:
    """Per-event deduplication: the first sighting decides, later ones repeat it as DUPLICATE."""

    projects: list[str]
    status: dict[str, int] = field(default_factory=dict)  # event id -> first status
    seq: dict[str, int] = field(default_factory=dict)  # event id -> first ledger_seq
    balances: dict[str, int] = field(default_factory=dict)

    def expect(self, ev: Ev) -> int:
        if ev.event_id in self.status:
            return pb.REJECTED if self.status[ev.event_id] == pb.REJECTED else pb.DUPLICATE
        status = pb.REJECTED if ev.project == 2 else pb.APPLIED
        self.status[ev.event_id] = status
        if status == pb.APPLIED and ev.kind == pb.COMMIT:
            self.balances[self.projects[ev.project]] -= ev.amount
        return status


events_st = st.lists(
    st.builds(
        Ev,
        event_id=st.integers(0, 10**6).map(str),
        kind=st.sampled_from([pb.COMMIT, pb.COMMIT, pb.RELEASE, pb.EXPIRE]),
        project=st.sampled_from([0, 0, 1, 2]),
        amount=st.integers(0, 5_000),
    ).map(lambda e: e if e.kind == pb.COMMIT else Ev(e.event_id, e.kind, e.project, 0)),
    min_size=1,
    max_size=12,
    unique_by=lambda e: e.event_id,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pool=events_st, data=st.data())
async def test_settle_replays_match_model(
    authority: AuthorityServer, authority_stub: Stub, pool: list[Ev], data: st.DataObject
) -> None:
    token = authority.config.admin_token
    md = admin_md(token)
    run = uuid.uuid4().hex[:12]
    projects = [new_project_id("h"), new_project_id("h"), UNKNOWN]
    for pid in projects[:2]:
        await make_wallet(authority_stub, token, pid, balance=START_BALANCE)
    model = Model(projects, balances={pid: START_BALANCE for pid in projects[:2]})
    sent: list[tuple[list[Ev], list[pb.SettleResult]]] = []

    for _ in range(data.draw(st.integers(1, 5), label="batches")):
        resend = data.draw(st.booleans(), label="resend an earlier batch") if sent else False
        if resend:
            batch, original = sent[data.draw(st.integers(0, len(sent) - 1), label="which")]
        else:
            batch = data.draw(
                st.lists(st.sampled_from(pool), min_size=1, max_size=20),
                label="batch (subset, duplicates, any order)",
            )
            original = []
        expected = [model.expect(ev) for ev in batch]
        resp = await authority_stub.Settle(
            pb.SettleRequest(events=[ev.message(projects, run) for ev in batch]), metadata=md
        )
        assert [r.event_id for r in resp.results] == [f"{run}-{ev.event_id}" for ev in batch]
        assert [r.status for r in resp.results] == expected
        for ev, result in zip(batch, resp.results, strict=True):
            if ev.event_id not in model.seq:
                model.seq[ev.event_id] = result.ledger_seq
                assert (result.ledger_seq > 0) == (
                    result.status == pb.APPLIED and ev.kind == pb.COMMIT and ev.amount > 0
                )
            else:  # a replay returns the first application's result
                assert result.ledger_seq == model.seq[ev.event_id]
            if result.status == pb.REJECTED:
                assert UNKNOWN in result.error
        if original:
            assert [(r.event_id, r.ledger_seq) for r in resp.results] == [
                (r.event_id, r.ledger_seq) for r in original
            ]
        sent.append((batch, list(resp.results)))
        for wallet in resp.wallets:
            assert wallet.balance == model.balances[wallet.project_id]

    for pid in projects[:2]:
        got = await authority_stub.GetWallet(pb.GetWalletRequest(project_id=pid), metadata=md)
        assert got.wallet.balance == model.balances[pid]


# ---------------------------------------------------------------- unary mutations


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> AuthorityServer:
    # Sync on purpose: the session's pg_dsn fixture must not start inside a running loop.
    name = "authority" if request.param == "sqlite" else "authority_pg"
    srv: AuthorityServer = request.getfixturevalue(name)
    return srv


async def test_every_mutation_replays_its_first_result(backend: AuthorityServer) -> None:
    token = backend.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    async with grpc.aio.insecure_channel(backend.grpc_target) as ch:
        stub = credit_stub(ch)
        calls: list[tuple[str, Any]] = [
            (
                "CreateWallet",
                pb.CreateWalletRequest(request_id="m1", project_id=pid, organization_id="org"),
            ),
            ("TopUp", pb.TopUpRequest(request_id="m2", project_id=pid, amount=10_000)),
            (
                "Adjust",
                pb.AdjustRequest(
                    request_id="m3", project_id=pid, kind=pb.ADJUSTMENT, amount=-5, reason="fix"
                ),
            ),
            (
                "SetWalletPolicy",
                pb.SetWalletPolicyRequest(
                    request_id="m4",
                    project_id=pid,
                    low_balance_threshold=10,
                    grace_period_seconds=60,
                ),
            ),
            (
                "SetQuota",
                pb.SetQuotaRequest(
                    request_id="m5",
                    quota=pb.Quota(
                        project_id=pid,
                        name="rps",
                        algorithm=pb.SLIDING_WINDOW,
                        limit=5,
                        window_seconds=1,
                    ),
                ),
            ),
            ("DeleteQuota", pb.DeleteQuotaRequest(request_id="m6", project_id=pid, name="rps")),
            (
                "RecordUsage",
                pb.RecordUsageRequest(request_id="m7", project_id=pid, meter="gpu", amount=7),
            ),
            ("Reserve", pb.ReserveRequest(request_id="m8", project_id=pid, amount=100)),
            ("Reserve", pb.ReserveRequest(request_id="m9", project_id=pid, amount=50)),
        ]
        first: dict[str, Any] = {}
        for method, request in calls:
            first[request.request_id] = await getattr(stub, method)(request, metadata=md)
        r1 = first["m8"].reservation.reservation_id
        r2 = first["m9"].reservation.reservation_id
        calls += [
            ("Commit", pb.CommitRequest(request_id="m10", reservation_id=r1, amount=60)),
            ("Release", pb.ReleaseRequest(request_id="m11", reservation_id=r2)),
            ("IssueApiKey", pb.IssueApiKeyRequest(request_id="m12", project_id=pid)),
        ]
        for method, request in calls[-3:]:
            first[request.request_id] = await getattr(stub, method)(request, metadata=md)
        key_id = first["m12"].key.key_id
        calls.append(("RevokeApiKey", pb.RevokeApiKeyRequest(request_id="m13", key_id=key_id)))
        first["m13"] = await stub.RevokeApiKey(calls[-1][1], metadata=md)

        before = await authority_state(backend)
        for method, request in calls:
            again = await getattr(stub, method)(request, metadata=md)
            if method == "IssueApiKey":  # the secret is shown once; the key is the same
                assert first["m12"].secret and not again.secret
                assert again.key == first["m12"].key
            else:
                assert again == first[request.request_id], method
        assert await authority_state(backend) == before


async def test_failures_replay_too(backend: AuthorityServer) -> None:
    token = backend.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    async with grpc.aio.insecure_channel(backend.grpc_target) as ch:
        stub = credit_stub(ch)
        early = pb.TopUpRequest(request_id="early", project_id=pid, amount=500)
        await expect_rpc_error(stub.TopUp(early, metadata=md), grpc.StatusCode.NOT_FOUND, pid)
        await make_wallet(stub, token, pid, balance=100)
        # The project exists now, yet the same request id repeats its first result.
        await expect_rpc_error(stub.TopUp(early, metadata=md), grpc.StatusCode.NOT_FOUND, pid)
        big = pb.ReserveRequest(request_id="big", project_id=pid, amount=1_000)
        await expect_rpc_error(
            stub.Reserve(big, metadata=md), grpc.StatusCode.FAILED_PRECONDITION, "insufficient"
        )
        await stub.TopUp(
            pb.TopUpRequest(request_id="more", project_id=pid, amount=5_000), metadata=md
        )
        await expect_rpc_error(
            stub.Reserve(big, metadata=md), grpc.StatusCode.FAILED_PRECONDITION, "insufficient"
        )
        wallet = await stub.GetWallet(pb.GetWalletRequest(project_id=pid), metadata=md)
        assert (wallet.wallet.balance, wallet.wallet.reserved) == (5_100, 0)

        # The same request id with other parameters is refused.
        other = pb.TopUpRequest(request_id="more", project_id=pid, amount=5_001)
        await expect_rpc_error(
            stub.TopUp(other, metadata=md), grpc.StatusCode.FAILED_PRECONDITION, "more"
        )
        wallet = await stub.GetWallet(pb.GetWalletRequest(project_id=pid), metadata=md)
        assert wallet.wallet.balance == 5_100
