"""Every RPC of the authority over real gRPC on loopback: the happy path and its bad inputs.

Each refusal asserts the status code, that the message names the problem, and that nothing was
written (the change log's end and every wallet are unchanged).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from creditservice import grpc_service
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from tests.fixtures_authority import (
    admin_md,
    authority_config,
    authority_state,
    credit_stub,
    expect_rpc_error,
    make_wallet,
    new_project_id,
    next_watch_event,
)
from tests.services import free_port, wait_for_port

if TYPE_CHECKING:
    from creditservice.v1.credit_pb2_grpc import CreditServiceAsyncStub as Stub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
Md = tuple[tuple[str, str], ...]


@dataclass
class World:
    srv: AuthorityServer
    stub: Stub
    admin: Md
    a: str
    b: str
    key_a: Md
    key_b: Md
    secret_a: str


@pytest.fixture
async def world(authority: AuthorityServer, authority_stub: Stub) -> World:
    token = authority.config.admin_token
    a = new_project_id("a")
    b = new_project_id("b")
    await make_wallet(authority_stub, token, a, balance=10_000, organization_id="org-a")
    await make_wallet(authority_stub, token, b, balance=10_000, organization_id="org-b")
    keys = []
    for pid in (a, b):
        issued = await authority_stub.IssueApiKey(
            pb.IssueApiKeyRequest(request_id=f"key-{pid}", project_id=pid, name="test"),
            metadata=admin_md(token),
        )
        keys.append(issued.secret)
    return World(
        authority,
        authority_stub,
        admin_md(token),
        a,
        b,
        admin_md(keys[0]),
        admin_md(keys[1]),
        keys[0],
    )


async def refused(
    w: World, call: Awaitable[object], code: grpc.StatusCode, *words: str
) -> grpc.aio.AioRpcError:
    """The call fails with `code` naming `words`, and the authority's state did not change."""
    before = await authority_state(w.srv)
    err = await expect_rpc_error(call, code, *words)
    assert await authority_state(w.srv) == before, "a refused request changed the authority"
    return err


async def credential_checks(
    w: World, call: Callable[..., Awaitable[object]], request: object, *, admin_only: bool
) -> None:
    """Missing and wrong credentials are UNAUTHENTICATED; a project key on an admin op is DENIED."""
    await refused(w, call(request), UNAUTH, "missing credential")
    await refused(w, call(request, metadata=admin_md("not-the-token")), UNAUTH, "credential")
    forged = "cg_" + "A" * 43
    await refused(w, call(request, metadata=admin_md(forged)), UNAUTH, "unknown API key")
    if admin_only:
        await refused(w, call(request, metadata=w.key_a), DENIED, "admin")


# ---------------------------------------------------------------- wallets


async def test_create_wallet(world: World) -> None:
    w = world
    pid = new_project_id("new")
    req = pb.CreateWalletRequest(
        request_id="cw-1", project_id=pid, organization_id="org-x", low_balance_threshold=100
    )
    wallet = (await w.stub.CreateWallet(req, metadata=w.admin)).wallet
    assert (wallet.project_id, wallet.organization_id, wallet.balance) == (pid, "org-x", 0)
    assert wallet.state == pb.GRACE  # a new wallet with balance 0 starts in grace
    assert wallet.version >= 1

    def bad(**kw: object) -> pb.CreateWalletRequest:
        fields: dict[str, object] = {
            "request_id": "cw-bad",
            "project_id": new_project_id(),
            "organization_id": "org-x",
        }
        fields.update(kw)
        return pb.CreateWalletRequest(**fields)  # type: ignore[arg-type]

    create = w.stub.CreateWallet
    await refused(w, create(bad(project_id="Bad Id"), metadata=w.admin), INVALID, "project_id")
    await refused(
        w, create(bad(project_id=""), metadata=w.admin), INVALID, "project_id", "required"
    )
    await refused(w, create(bad(organization_id=""), metadata=w.admin), INVALID, "organization_id")
    await refused(w, create(bad(request_id=""), metadata=w.admin), INVALID, "request_id")
    await refused(w, create(bad(request_id="has space"), metadata=w.admin), INVALID, "request_id")
    await refused(
        w, create(bad(low_balance_threshold=-1), metadata=w.admin), INVALID, "low_balance_threshold"
    )
    await refused(w, create(bad(overdraft_limit=2**62), metadata=w.admin), INVALID, "overdraft")
    await refused(w, create(bad(grace_period_seconds=-5), metadata=w.admin), INVALID, "grace")
    await refused(
        w,
        create(bad(request_id="cw-dup", project_id=w.a), metadata=w.admin),
        grpc.StatusCode.ALREADY_EXISTS,
        w.a,
    )
    await credential_checks(w, create, bad(), admin_only=True)


async def test_get_wallet(world: World) -> None:
    w = world
    req = pb.GetWalletRequest(project_id=w.a)
    assert (await w.stub.GetWallet(req, metadata=w.admin)).wallet.balance == 10_000
    assert (await w.stub.GetWallet(req, metadata=w.key_a)).wallet.project_id == w.a
    await refused(w, w.stub.GetWallet(req, metadata=w.key_b), DENIED, "project")
    await refused(
        w,
        w.stub.GetWallet(pb.GetWalletRequest(project_id="nope-x"), metadata=w.admin),
        NOT_FOUND,
        "nope-x",
    )
    await refused(
        w,
        w.stub.GetWallet(pb.GetWalletRequest(project_id="../etc"), metadata=w.admin),
        INVALID,
        "project_id",
    )
    await credential_checks(w, w.stub.GetWallet, req, admin_only=False)


async def test_list_wallets(world: World) -> None:
    w = world
    for i in range(3):
        await make_wallet(w.stub, w.srv.config.admin_token, f"{w.a}-{i}", organization_id="org-a")
    page = await w.stub.ListWallets(
        pb.ListWalletsRequest(organization_id="org-a", page_size=2), metadata=w.admin
    )
    assert len(page.wallets) == 2 and page.next_page_token
    rest = await w.stub.ListWallets(
        pb.ListWalletsRequest(
            organization_id="org-a", page_size=2, page_token=page.next_page_token
        ),
        metadata=w.admin,
    )
    seen = {x.project_id for x in [*page.wallets, *rest.wallets]}
    assert seen == {w.a, *(f"{w.a}-{i}" for i in range(3))}
    everyone = await w.stub.ListWallets(pb.ListWalletsRequest(), metadata=w.admin)
    assert {w.a, w.b} <= {x.project_id for x in everyone.wallets}

    lw = w.stub.ListWallets
    await refused(
        w,
        lw(pb.ListWalletsRequest(page_token="garbage!"), metadata=w.admin),
        INVALID,
        "page_token",
    )
    await refused(
        w, lw(pb.ListWalletsRequest(page_size=1001), metadata=w.admin), INVALID, "page_size"
    )
    await refused(
        w, lw(pb.ListWalletsRequest(page_size=-1), metadata=w.admin), INVALID, "page_size"
    )
    await refused(
        w,
        lw(pb.ListWalletsRequest(organization_id="Org A"), metadata=w.admin),
        INVALID,
        "organization_id",
    )
    # SECURITY: a project key lists nothing, not even its own organization's wallets.
    await credential_checks(w, lw, pb.ListWalletsRequest(organization_id="org-a"), admin_only=True)


async def test_top_up(world: World) -> None:
    w = world
    resp = await w.stub.TopUp(
        pb.TopUpRequest(request_id="t-1", project_id=w.a, amount=2_500, reference="pay_1"),
        metadata=w.admin,
    )
    assert resp.wallet.balance == 12_500
    assert (resp.entry.kind, resp.entry.amount, resp.entry.balance_after) == (
        pb.TOPUP,
        2_500,
        12_500,
    )
    assert resp.entry.reference == "pay_1"

    def req(amount: int, pid: str | None = None) -> pb.TopUpRequest:
        return pb.TopUpRequest(request_id="t-bad", project_id=pid or w.a, amount=amount)

    for amount in (0, -5, 10**15 + 1, 2**62, -(2**63)):
        await refused(w, w.stub.TopUp(req(amount), metadata=w.admin), INVALID, "amount")
    await refused(
        w, w.stub.TopUp(req(1, "ghost-project"), metadata=w.admin), NOT_FOUND, "ghost-project"
    )
    await refused(w, w.stub.TopUp(req(1, "NO"), metadata=w.admin), INVALID, "project_id")
    await refused(
        w,
        w.stub.TopUp(
            pb.TopUpRequest(request_id="t-r", project_id=w.a, amount=1, reference="x" * 300),
            metadata=w.admin,
        ),
        INVALID,
        "reference",
    )
    # SECURITY: a project key cannot credit itself or another project.
    await credential_checks(w, w.stub.TopUp, req(5), admin_only=True)
    await refused(w, w.stub.TopUp(req(5, w.b), metadata=w.key_a), DENIED, "admin")


async def test_adjust(world: World) -> None:
    w = world
    adj = w.stub.Adjust
    sla = await adj(
        pb.AdjustRequest(
            request_id="a-1",
            project_id=w.a,
            kind=pb.SLA_CREDIT,
            amount=100,
            reason="outage 2026-01-01",
        ),
        metadata=w.admin,
    )
    assert (sla.entry.kind, sla.entry.amount, sla.wallet.balance) == (pb.SLA_CREDIT, 100, 10_100)
    neg = await adj(
        pb.AdjustRequest(
            request_id="a-2", project_id=w.a, kind=pb.ADJUSTMENT, amount=-300, reason="correction"
        ),
        metadata=w.admin,
    )
    assert (neg.entry.amount, neg.wallet.balance) == (-300, 9_800)
    refund = await adj(
        pb.AdjustRequest(
            request_id="a-3", project_id=w.a, kind=pb.REFUND, amount=50, reason="refund"
        ),
        metadata=w.admin,
    )
    assert refund.wallet.balance == 9_850

    def req(kind: int, amount: int, reason: str = "why") -> pb.AdjustRequest:
        return pb.AdjustRequest(
            request_id="a-bad",
            project_id=w.a,
            kind=kind,  # type: ignore[arg-type]
            amount=amount,
            reason=reason,
        )

    for kind in (pb.ENTRY_KIND_UNSPECIFIED, pb.TOPUP, pb.USAGE, 99):
        await refused(w, adj(req(kind, 5), metadata=w.admin), INVALID, "kind")
    await refused(w, adj(req(pb.SLA_CREDIT, -5), metadata=w.admin), INVALID, "amount", "> 0")
    await refused(w, adj(req(pb.REFUND, 0), metadata=w.admin), INVALID, "amount")
    await refused(w, adj(req(pb.ADJUSTMENT, 0), metadata=w.admin), INVALID, "amount", "!= 0")
    await refused(w, adj(req(pb.ADJUSTMENT, -(2**62)), metadata=w.admin), INVALID, "amount")
    await refused(w, adj(req(pb.SLA_CREDIT, 10**15 + 1), metadata=w.admin), INVALID, "amount")
    await refused(w, adj(req(pb.SLA_CREDIT, 5, reason=" "), metadata=w.admin), INVALID, "reason")
    await credential_checks(w, adj, req(pb.SLA_CREDIT, 5), admin_only=True)


async def test_list_transactions(world: World) -> None:
    w = world
    for i in range(3):
        await w.stub.TopUp(
            pb.TopUpRequest(request_id=f"lt-{i}", project_id=w.a, amount=i + 1), metadata=w.admin
        )
    page = await w.stub.ListTransactions(
        pb.ListTransactionsRequest(project_id=w.a, page_size=2), metadata=w.key_a
    )
    assert [e.amount for e in page.entries] == [3, 2]  # newest first
    rest = await w.stub.ListTransactions(
        pb.ListTransactionsRequest(project_id=w.a, page_size=2, page_token=page.next_page_token),
        metadata=w.admin,
    )
    assert [e.amount for e in rest.entries] == [1, 10_000]
    seqs = [e.seq for e in [*page.entries, *rest.entries]]
    assert seqs == sorted(seqs, reverse=True)

    lt = w.stub.ListTransactions
    await refused(
        w, lt(pb.ListTransactionsRequest(project_id=w.a), metadata=w.key_b), DENIED, "project"
    )
    await refused(
        w,
        lt(pb.ListTransactionsRequest(project_id=w.a, page_size=5000), metadata=w.admin),
        INVALID,
        "page_size",
    )
    await refused(
        w, lt(pb.ListTransactionsRequest(project_id="A"), metadata=w.admin), INVALID, "project_id"
    )
    await credential_checks(w, lt, pb.ListTransactionsRequest(project_id=w.a), admin_only=False)


async def test_set_wallet_policy(world: World) -> None:
    w = world
    resp = await w.stub.SetWalletPolicy(
        pb.SetWalletPolicyRequest(
            request_id="sp-1",
            project_id=w.a,
            low_balance_threshold=20_000,
            grace_period_seconds=60,
            overdraft_limit=500,
        ),
        metadata=w.admin,
    )
    assert (resp.wallet.low_balance_threshold, resp.wallet.grace_period_seconds) == (20_000, 60)
    assert (resp.wallet.overdraft_limit, resp.wallet.state) == (500, pb.LOW)

    def req(**kw: int) -> pb.SetWalletPolicyRequest:
        fields = {"low_balance_threshold": 0, "grace_period_seconds": 60, "overdraft_limit": 0}
        fields.update(kw)
        return pb.SetWalletPolicyRequest(request_id="sp-bad", project_id=w.a, **fields)

    sp = w.stub.SetWalletPolicy
    await refused(
        w, sp(req(grace_period_seconds=0), metadata=w.admin), INVALID, "grace_period_seconds", "> 0"
    )
    await refused(
        w, sp(req(low_balance_threshold=-1), metadata=w.admin), INVALID, "low_balance_threshold"
    )
    await refused(w, sp(req(overdraft_limit=-1), metadata=w.admin), INVALID, "overdraft_limit")
    await refused(w, sp(req(overdraft_limit=2**62), metadata=w.admin), INVALID, "overdraft_limit")
    await credential_checks(w, sp, req(), admin_only=True)


async def test_explain_usage(world: World) -> None:
    w = world
    await w.stub.RecordUsage(
        pb.RecordUsageRequest(
            request_id="ru-1", project_id=w.a, meter="machine_hours", amount=700, quantity=2
        ),
        metadata=w.admin,
    )
    await w.stub.Settle(
        pb.SettleRequest(
            events=[
                pb.SettlementEvent(
                    event_id="ev-1",
                    kind=pb.COMMIT,
                    project_id=w.a,
                    hold_id="h1",
                    held_amount=10,
                    amount=10,
                    meter="requests",
                ),
            ]
        ),
        metadata=w.admin,
    )
    resp = await w.stub.ExplainUsage(pb.ExplainUsageRequest(project_id=w.a), metadata=w.key_a)
    by_meter = {m.meter: (m.amount, m.entries) for m in resp.meters}
    assert by_meter == {"machine_hours": (700, 1), "requests": (10, 1)}
    assert resp.total_amount == 710 and resp.wallet.balance == 10_000 - 710

    ex = w.stub.ExplainUsage
    await refused(
        w,
        ex(pb.ExplainUsageRequest(project_id=w.a, since_ms=10, until_ms=5), metadata=w.admin),
        INVALID,
        "since_ms",
    )
    await refused(
        w,
        ex(pb.ExplainUsageRequest(project_id=w.a, since_ms=-1), metadata=w.admin),
        INVALID,
        "since_ms",
    )
    await refused(
        w, ex(pb.ExplainUsageRequest(project_id=w.a), metadata=w.key_b), DENIED, "project"
    )
    await credential_checks(w, ex, pb.ExplainUsageRequest(project_id=w.a), admin_only=False)


# ---------------------------------------------------------------- quotas


def quota(
    pid: str,
    name: str = "requests",
    algorithm: int = pb.SLIDING_WINDOW,
    limit: int = 100,
    window: int = 60,
) -> pb.Quota:
    return pb.Quota(
        project_id=pid,
        name=name,
        algorithm=algorithm,  # type: ignore[arg-type]
        limit=limit,
        window_seconds=window,
    )


async def test_set_get_list_delete_quota(world: World) -> None:
    w = world
    rate = await w.stub.SetQuota(
        pb.SetQuotaRequest(request_id="q-1", quota=quota(w.a)), metadata=w.admin
    )
    assert (rate.quota.limit, rate.quota.window_seconds, rate.quota.version >= 1) == (100, 60, True)
    await w.stub.SetQuota(
        pb.SetQuotaRequest(request_id="q-2", quota=quota(w.a, "concurrent", pb.CONCURRENCY, 4, 0)),
        metadata=w.admin,
    )
    got = await w.stub.GetQuota(
        pb.GetQuotaRequest(project_id=w.a, name="concurrent"), metadata=w.key_a
    )
    assert (got.quota.algorithm, got.quota.limit) == (pb.CONCURRENCY, 4)
    listed = await w.stub.ListQuotas(pb.ListQuotasRequest(project_id=w.a), metadata=w.key_a)
    assert sorted(q.name for q in listed.quotas) == ["concurrent", "requests"]
    deleted = await w.stub.DeleteQuota(
        pb.DeleteQuotaRequest(request_id="q-3", project_id=w.a, name="requests"), metadata=w.admin
    )
    assert deleted.quota.name == "requests"
    await refused(
        w,
        w.stub.GetQuota(pb.GetQuotaRequest(project_id=w.a, name="requests"), metadata=w.admin),
        NOT_FOUND,
        "requests",
    )


async def test_quota_refusals(world: World) -> None:
    w = world
    sq = w.stub.SetQuota

    def req(q: pb.Quota | None) -> pb.SetQuotaRequest:
        return pb.SetQuotaRequest(request_id="q-bad", quota=q)

    await refused(w, sq(req(None), metadata=w.admin), INVALID, "quota", "required")
    await refused(
        w, sq(req(quota(w.a, window=0)), metadata=w.admin), INVALID, "quota.window_seconds"
    )
    await refused(
        w,
        sq(req(quota(w.a, "c", pb.CONCURRENCY, 4, 5)), metadata=w.admin),
        INVALID,
        "quota.window_seconds",
        "CONCURRENCY",
    )
    await refused(w, sq(req(quota(w.a, limit=0)), metadata=w.admin), INVALID, "quota.limit")
    await refused(w, sq(req(quota(w.a, limit=-1)), metadata=w.admin), INVALID, "quota.limit")
    await refused(w, sq(req(quota(w.a, "Bad Name")), metadata=w.admin), INVALID, "quota.name")
    await refused(w, sq(req(quota(w.a, "x" * 65)), metadata=w.admin), INVALID, "quota.name")
    await refused(
        w,
        sq(req(quota(w.a, algorithm=pb.QUOTA_ALGORITHM_UNSPECIFIED)), metadata=w.admin),
        INVALID,
        "quota.algorithm",
    )
    await refused(w, sq(req(quota("ghost-project")), metadata=w.admin), NOT_FOUND, "ghost-project")
    await credential_checks(w, sq, req(quota(w.a)), admin_only=True)

    await w.stub.SetQuota(pb.SetQuotaRequest(request_id="q-ok", quota=quota(w.a)), metadata=w.admin)
    gq = w.stub.GetQuota
    await refused(
        w,
        gq(pb.GetQuotaRequest(project_id=w.a, name="requests"), metadata=w.key_b),
        DENIED,
        "project",
    )
    await refused(
        w, gq(pb.GetQuotaRequest(project_id=w.a, name="nope"), metadata=w.key_a), NOT_FOUND, "nope"
    )
    await refused(
        w, gq(pb.GetQuotaRequest(project_id=w.a, name=""), metadata=w.key_a), INVALID, "name"
    )
    await credential_checks(
        w, gq, pb.GetQuotaRequest(project_id=w.a, name="requests"), admin_only=False
    )
    lq = w.stub.ListQuotas
    await refused(w, lq(pb.ListQuotasRequest(project_id=w.a), metadata=w.key_b), DENIED, "project")
    await refused(
        w, lq(pb.ListQuotasRequest(project_id=""), metadata=w.admin), INVALID, "project_id"
    )
    await credential_checks(w, lq, pb.ListQuotasRequest(project_id=w.a), admin_only=False)
    dq = w.stub.DeleteQuota
    await refused(
        w,
        dq(pb.DeleteQuotaRequest(request_id="dq", project_id=w.a, name="nope"), metadata=w.admin),
        NOT_FOUND,
        "nope",
    )
    await refused(
        w,
        dq(pb.DeleteQuotaRequest(request_id="dq2", project_id=w.a, name="B!"), metadata=w.admin),
        INVALID,
        "name",
    )
    await credential_checks(
        w,
        dq,
        pb.DeleteQuotaRequest(request_id="dq3", project_id=w.a, name="requests"),
        admin_only=True,
    )


# ---------------------------------------------------------------- reservations


async def test_reservations(world: World) -> None:
    w = world
    held = await w.stub.Reserve(
        pb.ReserveRequest(request_id="r-1", project_id=w.a, amount=1_000, ttl_seconds=60),
        metadata=w.admin,
    )
    rid = held.reservation.reservation_id
    assert held.reservation.state == pb.ACTIVE and held.reservation.meter == "requests"
    assert (held.wallet.reserved, held.wallet.available) == (1_000, 9_000)
    got = await w.stub.GetReservation(
        pb.GetReservationRequest(reservation_id=rid), metadata=w.key_a
    )
    assert got.reservation.amount == 1_000
    await refused(
        w,
        w.stub.GetReservation(pb.GetReservationRequest(reservation_id=rid), metadata=w.key_b),
        DENIED,
        "project",
    )
    done = await w.stub.Commit(
        pb.CommitRequest(request_id="c-1", reservation_id=rid, amount=400), metadata=w.admin
    )
    assert done.reservation.state == pb.COMMITTED and done.reservation.committed_amount == 400
    assert (done.wallet.balance, done.wallet.reserved) == (9_600, 0)
    assert (done.entry.kind, done.entry.amount) == (pb.USAGE, -400)

    second = await w.stub.Reserve(
        pb.ReserveRequest(request_id="r-2", project_id=w.a, amount=10), metadata=w.admin
    )
    released = await w.stub.Release(
        pb.ReleaseRequest(request_id="rel-1", reservation_id=second.reservation.reservation_id),
        metadata=w.admin,
    )
    assert released.reservation.state == pb.RELEASED and released.wallet.reserved == 0


async def test_reservation_refusals(world: World) -> None:
    w = world
    rs = w.stub.Reserve

    def req(amount: int = 10, **kw: object) -> pb.ReserveRequest:
        fields: dict[str, object] = {"request_id": "r-bad", "project_id": w.a, "amount": amount}
        fields.update(kw)
        return pb.ReserveRequest(**fields)  # type: ignore[arg-type]

    for amount in (0, -1, 2**62):
        await refused(w, rs(req(amount), metadata=w.admin), INVALID, "amount")
    await refused(w, rs(req(ttl_seconds=-1), metadata=w.admin), INVALID, "ttl_seconds")
    await refused(w, rs(req(meter="bad meter"), metadata=w.admin), INVALID, "meter")
    await refused(
        w, rs(req(project_id="ghost-project"), metadata=w.admin), NOT_FOUND, "ghost-project"
    )
    await expect_rpc_error(
        rs(req(10_001, request_id="r-big"), metadata=w.admin),
        grpc.StatusCode.FAILED_PRECONDITION,
        "insufficient",
    )
    await credential_checks(w, rs, req(), admin_only=True)

    cm = w.stub.Commit
    await refused(
        w,
        cm(
            pb.CommitRequest(request_id="c", reservation_id="res-ghost", amount=1), metadata=w.admin
        ),
        NOT_FOUND,
        "res-ghost",
    )
    await refused(
        w,
        cm(pb.CommitRequest(request_id="c", reservation_id="bad id", amount=1), metadata=w.admin),
        INVALID,
        "reservation_id",
    )
    await refused(
        w,
        cm(pb.CommitRequest(request_id="c", reservation_id="r1", amount=-1), metadata=w.admin),
        INVALID,
        "amount",
        ">= 0",
    )
    await credential_checks(
        w, cm, pb.CommitRequest(request_id="c", reservation_id="r1"), admin_only=True
    )
    rl = w.stub.Release
    await refused(
        w,
        rl(pb.ReleaseRequest(request_id="r", reservation_id=""), metadata=w.admin),
        INVALID,
        "reservation_id",
    )
    await refused(
        w,
        rl(pb.ReleaseRequest(request_id="r", reservation_id="res-ghost"), metadata=w.admin),
        NOT_FOUND,
        "res-ghost",
    )
    await credential_checks(
        w, rl, pb.ReleaseRequest(request_id="r", reservation_id="r1"), admin_only=True
    )
    gr = w.stub.GetReservation
    await refused(
        w,
        gr(pb.GetReservationRequest(reservation_id="res-ghost"), metadata=w.admin),
        NOT_FOUND,
        "res-ghost",
    )
    await refused(
        w,
        gr(pb.GetReservationRequest(reservation_id="a/b"), metadata=w.admin),
        INVALID,
        "reservation_id",
    )
    await credential_checks(w, gr, pb.GetReservationRequest(reservation_id="r1"), admin_only=False)


# ---------------------------------------------------------------- settlement and usage


def ev(
    event_id: str,
    pid: str,
    kind: int = pb.COMMIT,
    amount: int = 5,
    held: int = 10,
    quantity: int = 0,
) -> pb.SettlementEvent:
    return pb.SettlementEvent(
        event_id=event_id,
        kind=kind,  # type: ignore[arg-type]
        project_id=pid,
        hold_id=event_id,
        held_amount=held,
        amount=amount,
        meter="requests",
        route="GET /v1/things",
        gateway_id="gw-1",
        quantity=quantity,
    )


async def test_settle(world: World) -> None:
    w = world
    resp = await w.stub.Settle(
        pb.SettleRequest(
            events=[
                ev("e1", w.a, amount=7),
                ev("e2", w.a, pb.RELEASE, 0),
                ev("e3", w.b, pb.EXPIRE, 0),
                ev("e4", "ghost-project"),
                ev("e1", w.a, amount=7),
            ]
        ),
        metadata=w.admin,
    )
    statuses = [(r.event_id, r.status) for r in resp.results]
    assert statuses == [
        ("e1", pb.APPLIED),
        ("e2", pb.APPLIED),
        ("e3", pb.APPLIED),
        ("e4", pb.REJECTED),
        ("e1", pb.DUPLICATE),
    ]
    assert (
        resp.results[0].ledger_seq > 0 and resp.results[4].ledger_seq == resp.results[0].ledger_seq
    )
    assert "ghost-project" in resp.results[3].error
    wallets = {x.project_id: x.balance for x in resp.wallets}
    assert wallets[w.a] == 10_000 - 7


async def test_settle_refusals(world: World) -> None:
    w = world
    st = w.stub.Settle
    await refused(w, st(pb.SettleRequest(), metadata=w.admin), INVALID, "events", "at least one")
    big = pb.SettleRequest(events=[ev(f"b{i}", w.a, amount=1) for i in range(10_001)])
    await refused(w, st(big, metadata=w.admin), INVALID, "10001", "10000")
    cases = [
        (ev("", w.a), "events[1].event_id"),
        (ev("bad id!", w.a), "events[1].event_id"),
        (ev("x1", w.a, kind=pb.SETTLE_KIND_UNSPECIFIED), "events[1].kind"),
        (ev("x2", w.a, amount=-1), "events[1].amount"),
        (ev("x3", w.a, held=-1), "events[1].held_amount"),
        (ev("x4", w.a, amount=2**62), "events[1].amount"),
        (ev("x5", w.a, kind=pb.RELEASE, amount=3), "events[1].amount"),
        (ev("x6", "Not Valid"), "events[1].project_id"),
        (ev("x7", w.a, quantity=-1), "events[1].quantity"),
    ]
    for bad, field in cases:
        batch = pb.SettleRequest(events=[ev("fine", w.a), bad])
        await refused(w, st(batch, metadata=w.admin), INVALID, field)
    await credential_checks(w, st, pb.SettleRequest(events=[ev("k1", w.a)]), admin_only=True)
    # SECURITY: a project key cannot settle, not even its own project's events.
    await refused(w, st(pb.SettleRequest(events=[ev("k2", w.a)]), metadata=w.key_a), DENIED)


async def test_record_usage(world: World) -> None:
    w = world
    resp = await w.stub.RecordUsage(
        pb.RecordUsageRequest(
            request_id="u-1",
            project_id=w.a,
            meter="machine_hours",
            amount=1_234,
            quantity=3600,
            description="batch job",
        ),
        metadata=w.admin,
    )
    assert (resp.entry.kind, resp.entry.amount, resp.entry.meter) == (
        pb.USAGE,
        -1_234,
        "machine_hours",
    )
    assert resp.entry.quantity == 3600 and resp.wallet.balance == 10_000 - 1_234

    ru = w.stub.RecordUsage

    def req(**kw: object) -> pb.RecordUsageRequest:
        fields: dict[str, object] = {
            "request_id": "u-bad",
            "project_id": w.a,
            "meter": "gpu",
            "amount": 5,
        }
        fields.update(kw)
        return pb.RecordUsageRequest(**fields)  # type: ignore[arg-type]

    await refused(w, ru(req(meter=""), metadata=w.admin), INVALID, "meter", "required")
    for amount in (0, -3, 10**15 + 1):
        await refused(w, ru(req(amount=amount), metadata=w.admin), INVALID, "amount")
    await refused(w, ru(req(quantity=-1), metadata=w.admin), INVALID, "quantity")
    await refused(
        w, ru(req(project_id="ghost-project"), metadata=w.admin), NOT_FOUND, "ghost-project"
    )
    await credential_checks(w, ru, req(), admin_only=True)


async def test_check_admission(world: World) -> None:
    w = world
    ca = w.stub.CheckAdmission
    ok = await ca(pb.CheckAdmissionRequest(project_id=w.a, cost=10_000), metadata=w.key_a)
    assert ok.allowed and ok.reason == pb.ADMISSION_REASON_ADMITTED
    no = await ca(pb.CheckAdmissionRequest(project_id=w.a, cost=10_001), metadata=w.admin)
    assert not no.allowed and no.reason == pb.ADMISSION_REASON_INSUFFICIENT_CREDITS
    ghost = await ca(pb.CheckAdmissionRequest(project_id="ghost-project", cost=1), metadata=w.admin)
    assert not ghost.allowed and ghost.reason == pb.ADMISSION_REASON_UNKNOWN_PROJECT
    await refused(
        w, ca(pb.CheckAdmissionRequest(project_id=w.a, cost=-1), metadata=w.admin), INVALID, "cost"
    )
    await refused(
        w,
        ca(pb.CheckAdmissionRequest(project_id=w.a, cost=2**62), metadata=w.admin),
        INVALID,
        "cost",
    )
    await refused(
        w, ca(pb.CheckAdmissionRequest(project_id=w.a), metadata=w.key_b), DENIED, "project"
    )
    await credential_checks(w, ca, pb.CheckAdmissionRequest(project_id=w.a), admin_only=False)


async def test_get_admission_snapshot(world: World) -> None:
    w = world
    await w.stub.SetQuota(pb.SetQuotaRequest(request_id="q", quota=quota(w.a)), metadata=w.admin)
    snap = (
        await w.stub.GetAdmissionSnapshot(
            pb.GetAdmissionSnapshotRequest(project_id=w.a), metadata=w.key_a
        )
    ).snapshot
    assert snap.wallet.balance == 10_000 and [q.name for q in snap.quotas] == ["requests"]
    assert snap.cursor == await w.srv.core.store.last_cursor()
    gs = w.stub.GetAdmissionSnapshot
    await refused(
        w, gs(pb.GetAdmissionSnapshotRequest(project_id=w.a), metadata=w.key_b), DENIED, "project"
    )
    await refused(
        w,
        gs(pb.GetAdmissionSnapshotRequest(project_id="ghost-project"), metadata=w.admin),
        NOT_FOUND,
        "ghost-project",
    )
    await refused(
        w,
        gs(pb.GetAdmissionSnapshotRequest(project_id="-x"), metadata=w.admin),
        INVALID,
        "project_id",
    )
    await credential_checks(w, gs, pb.GetAdmissionSnapshotRequest(project_id=w.a), admin_only=False)


async def test_watch_rpc(world: World) -> None:
    w = world
    call = w.stub.Watch(pb.WatchRequest(project_ids=[w.a]), metadata=w.key_a)
    # The opening heartbeat says the stream is live: a change before it would be missed
    # (a stream without after_cursor starts from now).
    opening = await next_watch_event(call, 5.0, skip_heartbeats=False)
    assert opening.HasField("heartbeat")
    await w.stub.TopUp(pb.TopUpRequest(request_id="wt", project_id=w.a, amount=1), metadata=w.admin)
    event = await next_watch_event(call, 5.0)
    assert event.project_id == w.a and event.wallet.balance == 10_001
    call.cancel()

    async def first(request: pb.WatchRequest, md: Md | None) -> None:
        stream = w.stub.Watch(request, metadata=md)
        await stream.read()

    await expect_rpc_error(first(pb.WatchRequest(project_ids=[w.b]), w.key_a), DENIED, "project")
    await expect_rpc_error(
        first(pb.WatchRequest(project_ids=["Bad"]), w.admin), INVALID, "project_ids[0]"
    )
    await expect_rpc_error(
        first(pb.WatchRequest(after_cursor=-1), w.admin), INVALID, "after_cursor"
    )
    await expect_rpc_error(first(pb.WatchRequest(), None), UNAUTH, "missing credential")
    await expect_rpc_error(first(pb.WatchRequest(), admin_md("wrong")), UNAUTH, "credential")


# ---------------------------------------------------------------- api keys


async def test_issue_api_key(world: World) -> None:
    w = world
    req = pb.IssueApiKeyRequest(request_id="k-1", project_id=w.a, name="ci")
    first = await w.stub.IssueApiKey(req, metadata=w.admin)
    assert re.fullmatch(r"cg_[A-Za-z0-9_-]{43}", first.secret)
    assert re.fullmatch(r"key_[0-9a-f]{16}", first.key.key_id)
    assert first.key.prefix == first.secret[:10] and first.key.project_id == w.a
    # The secret is shown once: a replay returns the same key without it.
    again = await w.stub.IssueApiKey(req, metadata=w.admin)
    assert again.key == first.key and again.secret == ""
    wallet = await w.stub.GetWallet(
        pb.GetWalletRequest(project_id=w.a), metadata=admin_md(first.secret)
    )
    assert wallet.wallet.project_id == w.a

    ik = w.stub.IssueApiKey
    await refused(
        w,
        ik(pb.IssueApiKeyRequest(request_id="k-2", project_id="ghost-project"), metadata=w.admin),
        NOT_FOUND,
        "ghost-project",
    )
    await refused(
        w,
        ik(
            pb.IssueApiKeyRequest(request_id="k-3", project_id=w.a, name="n" * 200),
            metadata=w.admin,
        ),
        INVALID,
        "name",
    )
    # SECURITY: a project key cannot mint keys, for itself or for another project.
    await credential_checks(
        w, ik, pb.IssueApiKeyRequest(request_id="k-4", project_id=w.b), admin_only=True
    )


async def test_revoke_and_resolve_api_key(world: World) -> None:
    w = world
    key_hash = hashlib.sha256(w.secret_a.encode()).hexdigest()
    resolved = await w.stub.ResolveApiKey(
        pb.ResolveApiKeyRequest(key_hash=key_hash), metadata=w.admin
    )
    assert resolved.key.project_id == w.a and resolved.key.revoked_at_ms == 0
    key_id = resolved.key.key_id
    assert not resolved.HasField("snapshot"), "only when asked"
    with_snapshot = await w.stub.ResolveApiKey(
        pb.ResolveApiKeyRequest(key_hash=key_hash, include_snapshot=True), metadata=w.admin
    )
    assert with_snapshot.key == resolved.key
    expected = await w.stub.GetAdmissionSnapshot(
        pb.GetAdmissionSnapshotRequest(project_id=w.a), metadata=w.admin
    )
    assert with_snapshot.snapshot == expected.snapshot
    assert with_snapshot.snapshot.wallet.available == 10_000
    # Warm the authority's key cache, then revoke: the cached key must stop working at once.
    await w.stub.GetWallet(pb.GetWalletRequest(project_id=w.a), metadata=w.key_a)
    revoked = await w.stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(request_id="rv-1", key_id=key_id), metadata=w.admin
    )
    assert revoked.key.revoked_at_ms > 0
    await expect_rpc_error(
        w.stub.GetWallet(pb.GetWalletRequest(project_id=w.a), metadata=w.key_a), UNAUTH, "revoked"
    )
    after = await w.stub.ResolveApiKey(pb.ResolveApiKeyRequest(key_hash=key_hash), metadata=w.admin)
    assert after.key.revoked_at_ms == revoked.key.revoked_at_ms
    # A revoked key resolves (so that gateways learn it is revoked) but brings no snapshot.
    after = await w.stub.ResolveApiKey(
        pb.ResolveApiKeyRequest(key_hash=key_hash, include_snapshot=True), metadata=w.admin
    )
    assert after.key.revoked_at_ms > 0 and not after.HasField("snapshot")

    rv = w.stub.RevokeApiKey
    await refused(
        w,
        rv(pb.RevokeApiKeyRequest(request_id="rv-2", key_id="key_0123"), metadata=w.admin),
        INVALID,
        "key_id",
    )
    await refused(
        w,
        rv(pb.RevokeApiKeyRequest(request_id="rv-3", key_id="key_" + "0" * 16), metadata=w.admin),
        NOT_FOUND,
        "key_0000000000000000",
    )
    await credential_checks(
        w, rv, pb.RevokeApiKeyRequest(request_id="rv-4", key_id=key_id), admin_only=False
    )
    await refused(
        w,
        rv(pb.RevokeApiKeyRequest(request_id="rv-5", key_id=key_id), metadata=w.key_b),
        DENIED,
        "admin",
    )

    rs = w.stub.ResolveApiKey
    await refused(
        w, rs(pb.ResolveApiKeyRequest(key_hash="ABC"), metadata=w.admin), INVALID, "key_hash"
    )
    await refused(
        w,
        rs(pb.ResolveApiKeyRequest(key_hash=key_hash.upper()), metadata=w.admin),
        INVALID,
        "key_hash",
    )
    await refused(w, rs(pb.ResolveApiKeyRequest(key_hash="0" * 64), metadata=w.admin), NOT_FOUND)
    await credential_checks(w, rs, pb.ResolveApiKeyRequest(key_hash=key_hash), admin_only=False)
    await refused(
        w, rs(pb.ResolveApiKeyRequest(key_hash=key_hash), metadata=w.key_b), DENIED, "admin"
    )


# ---------------------------------------------------------------- export / import


async def test_export_import(world: World, tmp_path: Path) -> None:
    w = world
    await w.stub.Settle(pb.SettleRequest(events=[ev("x1", w.a, amount=9)]), metadata=w.admin)
    records = [r async for r in w.stub.Export(pb.ExportRequest(), metadata=w.admin)]
    assert records[0].HasField("header") and records[-1].HasField("trailer")
    assert records[-1].trailer.ledger_sum == 20_000 - 9

    async with AuthorityServer(authority_config(f"sqlite:///{tmp_path / 'copy.db'}")) as copy:
        copy_md = admin_md(copy.config.admin_token)
        async with grpc.aio.insecure_channel(copy.grpc_target) as ch:
            stub = credit_stub(ch)

            async def feed() -> object:
                for r in records:
                    yield r

            imported = await stub.Import(feed(), metadata=copy_md)
            assert imported.wallets == 2 and imported.digest == records[-1].trailer.digest
            for pid in (w.a, w.b):
                mine = await w.stub.GetWallet(pb.GetWalletRequest(project_id=pid), metadata=w.admin)
                theirs = await stub.GetWallet(pb.GetWalletRequest(project_id=pid), metadata=copy_md)
                assert theirs.wallet == mine.wallet
            # Importing into a non-empty authority is refused.
            await expect_rpc_error(
                stub.Import(feed(), metadata=copy_md), grpc.StatusCode.FAILED_PRECONDITION
            )

            # Keys migrate with the import (hashes only); a project key still is no admin.
            await expect_rpc_error(stub.Import(feed(), metadata=w.key_a), DENIED, "admin")
            await expect_rpc_error(stub.Import(feed()), UNAUTH, "missing credential")

    async def drain(md: Md | None) -> None:
        async for _ in w.stub.Export(pb.ExportRequest(), metadata=md):
            pass

    await expect_rpc_error(drain(w.key_a), DENIED, "admin")
    await expect_rpc_error(drain(None), UNAUTH, "missing credential")

    async def one() -> object:
        yield records[0]

    await refused(w, w.stub.Import(one(), metadata=w.key_a), DENIED, "admin")
    await refused(w, w.stub.Import(one()), UNAUTH, "missing credential")


async def test_import_refusal_reaches_a_client_still_sending(world: World, tmp_path: Path) -> None:
    """A refused import reports its real status even while the client is still writing.

    A server that ends a client-streaming call early makes grpc.aio's pending write fail, and
    the client then sees INTERNAL ("execute_batch") instead of the server's status (grpc/grpc
    #36066). The authority reads the rest of the stream before answering, so a long stream
    refused at its first record, by its credential or at a bad record still gets its own code.
    """
    w = world
    records = [r async for r in w.stub.Export(pb.ExportRequest(), metadata=w.admin)]
    filler = records[1:-1] * 10  # records sent after the point of refusal

    def feed(*head: pb.ExportRecord) -> AsyncIterator[pb.ExportRecord]:
        async def gen() -> AsyncIterator[pb.ExportRecord]:
            for r in (*head, *filler):
                yield r

        return gen()

    # Without the drain, about one call in thirty failed: 300 calls all but never pass.
    for _ in range(100):
        # Not empty: refused before the first record is read.
        await expect_rpc_error(
            w.stub.Import(feed(records[0]), metadata=w.admin),
            grpc.StatusCode.FAILED_PRECONDITION,
            "empty",
        )
        await expect_rpc_error(w.stub.Import(feed(records[0]), metadata=w.key_a), DENIED, "admin")
        await expect_rpc_error(w.stub.Import(feed(records[0])), UNAUTH, "missing credential")

    # Empty, but a bad record early in the stream: the transaction is rolled back.
    copy_db = f"sqlite:///{tmp_path / 'copy.db'}"
    async with (
        AuthorityServer(authority_config(copy_db)) as copy,
        grpc.aio.insecure_channel(copy.grpc_target) as ch,
    ):
        stub = credit_stub(ch)
        md = admin_md(copy.config.admin_token)
        for _ in range(30):
            await expect_rpc_error(
                stub.Import(feed(records[0], records[0]), metadata=md),
                grpc.StatusCode.INVALID_ARGUMENT,
                "unexpected record",
            )
        listed = await stub.ListWallets(pb.ListWalletsRequest(), metadata=md)
        assert not listed.wallets


async def test_import_refusal_is_sent_to_a_client_that_never_half_closes(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain is bounded: a refused client that keeps its stream open gets the status."""
    monkeypatch.setattr(grpc_service, "DRAIN_S", 0.2)
    w = world
    header, *_ = [r async for r in w.stub.Export(pb.ExportRequest(), metadata=w.admin)]
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[pb.ExportRecord]:
        yield header
        await never.wait()

    await expect_rpc_error(
        w.stub.Import(stalled(), metadata=w.admin), grpc.StatusCode.FAILED_PRECONDITION, "empty"
    )
    # A caller without a valid credential gets the short bound, not the authenticated one.
    monkeypatch.setattr(grpc_service, "DRAIN_S", 600.0)
    monkeypatch.setattr(grpc_service, "UNAUTHENTICATED_DRAIN_S", 0.2)
    async with asyncio.timeout(60):
        await expect_rpc_error(w.stub.Import(stalled()), UNAUTH, "missing credential")


async def test_import_refusal_survives_a_message_that_does_not_parse(
    world: World, tmp_path: Path
) -> None:
    """The rest of a refused stream may hold bytes that are no ExportRecord: the refusal's own
    status still reaches the client (not UNKNOWN from the failed parse)."""
    w = world
    header = pb.ExportRecord(header=pb.ExportHeader(format_version=1)).SerializeToString()

    def garbage() -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            yield header
            yield b"\xff\xff\xff\xff"  # not a protobuf message

        return gen()

    async with grpc.aio.insecure_channel(w.srv.grpc_target) as ch:
        raw_import = ch.stream_unary(
            "/creditservice.v1.CreditService/Import",
            request_serializer=lambda b: b,
            response_deserializer=pb.ImportResponse.FromString,
        )
        await expect_rpc_error(raw_import(garbage()), UNAUTH, "missing credential")
        await expect_rpc_error(raw_import(garbage(), metadata=w.key_a), DENIED, "admin")
        await expect_rpc_error(
            raw_import(garbage(), metadata=w.admin), grpc.StatusCode.FAILED_PRECONDITION, "empty"
        )
    # Into an empty authority the bad message itself is the refusal.
    copy_db = f"sqlite:///{tmp_path / 'copy.db'}"
    async with (
        AuthorityServer(authority_config(copy_db)) as copy,
        grpc.aio.insecure_channel(copy.grpc_target) as ch,
    ):
        raw_import = ch.stream_unary(
            "/creditservice.v1.CreditService/Import",
            request_serializer=lambda b: b,
            response_deserializer=pb.ImportResponse.FromString,
        )
        md = admin_md(copy.config.admin_token)
        await expect_rpc_error(
            raw_import(garbage(), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "does not parse"
        )


# ---------------------------------------------------------------- health, reflection


async def test_health_and_reflection(authority: AuthorityServer) -> None:
    async with grpc.aio.insecure_channel(authority.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "creditservice.v1.CreditService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask() -> object:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for answer in refl.ServerReflectionInfo(ask(), timeout=5):
            names = {s.name for s in answer.list_services_response.service}
            assert "creditservice.v1.CreditService" in names
            assert "grpc.health.v1.Health" in names
            break


async def test_graceful_shutdown_reports_not_serving(tmp_path: Path) -> None:
    srv = AuthorityServer(authority_config(f"sqlite:///{tmp_path / 'a.db'}"))
    await srv.start()
    async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(srv.stop())
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


def test_admin_token_required() -> None:
    cfg = authority_config("sqlite:///unused.db")
    cfg.admin_token = ""
    with pytest.raises(ValueError, match="admin_token"):
        AuthorityServer(cfg)


def test_serve_forever_stops_on_sigterm(tmp_path: Path) -> None:
    """The CLI's entry point runs until SIGTERM, then shuts down cleanly (exit status 0)."""
    port = free_port()
    script = (
        "import asyncio\n"
        "from creditservice.server import AuthorityConfig, serve_forever\n"
        f"cfg = AuthorityConfig(database='sqlite:///{tmp_path / 's.db'}',\n"
        f"                      grpc_listen='127.0.0.1:{port}', http_listen='', admin_token='t')\n"
        "asyncio.run(serve_forever(cfg))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    try:
        wait_for_port(port, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def test_second_authority_on_a_taken_port_fails(
    authority: AuthorityServer, tmp_path: Path
) -> None:
    cfg = authority_config(f"sqlite:///{tmp_path / 'other.db'}")
    cfg.grpc_listen = authority.grpc_target
    with pytest.raises((OSError, RuntimeError)):
        async with AuthorityServer(cfg):
            pass


async def test_revocation_by_another_process_takes_effect(tmp_path: Path) -> None:
    """Two authorities on one database: a key revoked through one stops working at the other
    within the key cache TTL (polled with a deadline)."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = authority_config(db), authority_config(db)
    two.admin_token = one.admin_token
    one.key_cache_ttl_s = 0.2
    md = admin_md(one.admin_token)
    pid = new_project_id()
    async with (
        AuthorityServer(one) as first,
        AuthorityServer(two) as second,
        grpc.aio.insecure_channel(first.grpc_target) as ch1,
        grpc.aio.insecure_channel(second.grpc_target) as ch2,
    ):
        stub1, stub2 = credit_stub(ch1), credit_stub(ch2)
        await make_wallet(stub1, one.admin_token, pid, balance=10)
        issued = await stub1.IssueApiKey(
            pb.IssueApiKeyRequest(request_id="k", project_id=pid), metadata=md
        )
        key = admin_md(issued.secret)
        await stub1.GetWallet(pb.GetWalletRequest(project_id=pid), metadata=key)  # cached now
        await stub2.RevokeApiKey(
            pb.RevokeApiKeyRequest(request_id="rv", key_id=issued.key.key_id), metadata=md
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + one.key_cache_ttl_s + 2.0
        while True:
            try:
                await stub1.GetWallet(pb.GetWalletRequest(project_id=pid), metadata=key)
            except grpc.aio.AioRpcError as err:
                assert err.code() == UNAUTH and "revoked" in (err.details() or "")
                break
            assert loop.time() < deadline, "revoked key still accepted after the cache TTL"
            await asyncio.sleep(0.01)  # poll interval of the condition, bounded by the deadline


async def test_unexpected_failure_is_internal_and_logged(
    authority: AuthorityServer, authority_stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure that is no ServiceError (here: the store was closed under the server) becomes
    INTERNAL without details for the caller, and its traceback goes to the log."""
    await authority.core.store.close()
    err = await expect_rpc_error(
        authority_stub.GetWallet(
            pb.GetWalletRequest(project_id="x"), metadata=admin_md(authority.config.admin_token)
        ),
        grpc.StatusCode.INTERNAL,
    )
    assert err.details() == "internal error"
    logged = [r for r in caplog.records if r.name == "creditservice.grpc_service"]
    assert logged and logged[0].exc_info is not None and "GetWallet" in logged[0].getMessage()
