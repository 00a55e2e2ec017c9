"""Watch over real gRPC: resume from a cursor, live delivery within 1 s, filtering, tenant
isolation, ResyncRequired, heartbeats and delivery of changes made by another authority process.

No sleeps: every wait is for an event, with a deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from creditservice.clock import ManualClock
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from tests.fixtures_authority import (
    admin_md,
    authority_config,
    credit_stub,
    expect_rpc_error,
    make_wallet,
    new_project_id,
    next_watch_event,
)

if TYPE_CHECKING:
    from creditservice.v1.credit_pb2_grpc import CreditServiceAsyncStub as Stub

LIVE_DEADLINE_S = 1.0  # invariant 6: a change reaches a watcher within 1 s


async def open_watch(stub: Stub, md: object, **kw: object) -> tuple[Any, pb.WatchEvent]:
    """Start a Watch and wait for its opening heartbeat (the stream is then live)."""
    call = stub.Watch(pb.WatchRequest(**kw), metadata=md)  # type: ignore[arg-type]
    opening = await next_watch_event(call, 5.0, skip_heartbeats=False)
    assert opening.HasField("heartbeat")
    return call, opening


async def top_up(stub: Stub, md: object, pid: str, amount: int, rid: str) -> pb.TopUpResponse:
    return await stub.TopUp(  # type: ignore[no-any-return]
        pb.TopUpRequest(request_id=rid, project_id=pid, amount=amount), metadata=md
    )


async def test_live_delivery_from_now(authority: AuthorityServer, authority_stub: Stub) -> None:
    md = admin_md(authority.config.admin_token)
    pid = new_project_id()
    await make_wallet(authority_stub, authority.config.admin_token, pid, balance=100)
    call, opening = await open_watch(authority_stub, md)
    assert opening.cursor == await authority.core.store.last_cursor()
    for i in range(1, 4):
        await top_up(authority_stub, md, pid, 10, f"live-{i}")
        event = await next_watch_event(call, LIVE_DEADLINE_S)
        assert event.project_id == pid and event.wallet.balance == 100 + 10 * i
        assert event.cursor > opening.cursor
    call.cancel()


async def test_resume_from_cursor(authority: AuthorityServer, authority_stub: Stub) -> None:
    token = authority.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100)
    after_first = (
        await authority_stub.GetAdmissionSnapshot(
            pb.GetAdmissionSnapshotRequest(project_id=pid), metadata=md
        )
    ).snapshot.cursor
    await top_up(authority_stub, md, pid, 1, "r-1")
    await top_up(authority_stub, md, pid, 2, "r-2")

    call, opening = await open_watch(authority_stub, md, after_cursor=after_first)
    assert opening.cursor == after_first
    balances = []
    cursors = []
    for _ in range(2):
        event = await next_watch_event(call)
        balances.append(event.wallet.balance)
        cursors.append(event.cursor)
    assert balances == [101, 103] and cursors == sorted(set(cursors))
    assert cursors[0] > after_first
    # ... then live, continuing after the replay.
    await top_up(authority_stub, md, pid, 3, "r-3")
    live = await next_watch_event(call, LIVE_DEADLINE_S)
    assert live.wallet.balance == 106 and live.cursor > cursors[-1]
    call.cancel()

    # Resuming from the last delivered cursor replays nothing twice.
    again, _ = await open_watch(authority_stub, md, after_cursor=live.cursor)
    await top_up(authority_stub, md, pid, 4, "r-4")
    nxt = await next_watch_event(again, LIVE_DEADLINE_S)
    assert nxt.wallet.balance == 110
    again.cancel()


async def test_filter_by_project(authority: AuthorityServer, authority_stub: Stub) -> None:
    token = authority.config.admin_token
    md = admin_md(token)
    a, b = new_project_id("a"), new_project_id("b")
    await make_wallet(authority_stub, token, a, balance=100)
    await make_wallet(authority_stub, token, b, balance=100)
    call, _ = await open_watch(authority_stub, md, project_ids=[a])
    await top_up(authority_stub, md, b, 5, "f-b")
    await authority_stub.SetQuota(
        pb.SetQuotaRequest(
            request_id="f-q",
            quota=pb.Quota(
                project_id=b, name="rps", algorithm=pb.SLIDING_WINDOW, limit=5, window_seconds=1
            ),
        ),
        metadata=md,
    )
    await top_up(authority_stub, md, a, 7, "f-a")
    event = await next_watch_event(call, LIVE_DEADLINE_S)
    assert event.project_id == a and event.wallet.balance == 107
    call.cancel()


async def test_tenant_isolation(authority: AuthorityServer, authority_stub: Stub) -> None:
    token = authority.config.admin_token
    md = admin_md(token)
    a, b = new_project_id("a"), new_project_id("b")
    await make_wallet(authority_stub, token, a, balance=100)
    await make_wallet(authority_stub, token, b, balance=100)
    secrets = {}
    for pid in (a, b):
        issued = await authority_stub.IssueApiKey(
            pb.IssueApiKeyRequest(request_id=f"k-{pid}", project_id=pid), metadata=md
        )
        secrets[pid] = issued.secret
    key_a = admin_md(secrets[a])

    # SECURITY: without a filter a project key sees its own project only...
    call, _ = await open_watch(authority_stub, key_a)
    await top_up(authority_stub, md, b, 5, "t-b")
    await authority_stub.SetQuota(
        pb.SetQuotaRequest(
            request_id="t-qb",
            quota=pb.Quota(project_id=b, name="c", algorithm=pb.CONCURRENCY, limit=2),
        ),
        metadata=md,
    )
    await top_up(authority_stub, md, a, 9, "t-a")
    event = await next_watch_event(call, LIVE_DEADLINE_S)
    assert event.project_id == a and event.wallet.balance == 109
    call.cancel()

    # ... and it may not ask for another project, alone or among its own.
    for ids in ([b], [a, b]):
        denied = authority_stub.Watch(pb.WatchRequest(project_ids=ids), metadata=key_a)
        await expect_rpc_error(denied.read(), grpc.StatusCode.PERMISSION_DENIED, "project")

    # Replaying history from cursor 1 shows a project key nothing of project b either.
    replay, _ = await open_watch(authority_stub, key_a, after_cursor=1)
    await top_up(authority_stub, md, a, 1, "t-marker")
    seen: list[pb.WatchEvent] = []
    while not seen or seen[-1].wallet.balance != 110:
        seen.append(await next_watch_event(replay, 5.0))
    assert {e.project_id for e in seen} == {a}
    replay.cancel()


async def test_revoked_key_ends_its_watch(authority: AuthorityServer, authority_stub: Stub) -> None:
    token = authority.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100)
    issued = await authority_stub.IssueApiKey(
        pb.IssueApiKeyRequest(request_id="k", project_id=pid), metadata=md
    )
    call, _ = await open_watch(authority_stub, admin_md(issued.secret))
    admin_call, _ = await open_watch(authority_stub, md, project_ids=[pid])
    await authority_stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(request_id="rv", key_id=issued.key.key_id), metadata=md
    )
    # The admin (and gateways) see the revocation as a change...
    event = await next_watch_event(admin_call, LIVE_DEADLINE_S)
    assert event.key_revoked.key_id == issued.key.key_id and event.key_revoked.project_id == pid
    admin_call.cancel()
    # ... and the revoked key's own stream ends.
    await expect_rpc_error(
        next_watch_event(call, LIVE_DEADLINE_S), grpc.StatusCode.UNAUTHENTICATED, "revoked"
    )


async def test_resync_after_pruning(
    authority: AuthorityServer, authority_stub: Stub, authority_clock: ManualClock
) -> None:
    token = authority.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100)
    await top_up(authority_stub, md, pid, 1, "p-1")
    authority_clock.advance(seconds=8 * 24 * 3600)  # past the 7-day change retention
    await top_up(authority_stub, md, pid, 2, "p-2")
    report = await authority.run_jobs_once()
    assert report.changes_pruned > 0
    oldest = await authority.core.store.oldest_cursor()
    assert oldest > 2

    call = authority_stub.Watch(pb.WatchRequest(after_cursor=1), metadata=md)
    first = await next_watch_event(call, 5.0, skip_heartbeats=False)
    assert first.HasField("resync") and "pruned" in first.resync.reason
    assert first.cursor == oldest - 1
    # After the resync the stream continues with what is still retained, then live.
    kept = await next_watch_event(call, 5.0)
    assert kept.cursor == oldest and kept.wallet.balance == 103
    await top_up(authority_stub, md, pid, 3, "p-3")
    live = await next_watch_event(call, LIVE_DEADLINE_S)
    assert live.wallet.balance == 106
    call.cancel()

    # A cursor from beyond this authority's log (another database) also asks for a resync.
    ahead = authority_stub.Watch(pb.WatchRequest(after_cursor=10**9), metadata=md)
    first = await next_watch_event(ahead, 5.0, skip_heartbeats=False)
    assert first.HasField("resync") and "ahead" in first.resync.reason
    assert first.cursor == await authority.core.store.last_cursor()
    ahead.cancel()


async def test_heartbeats_while_idle(tmp_path: Path) -> None:
    cfg = authority_config(f"sqlite:///{tmp_path / 'hb.db'}")
    cfg.heartbeat_interval_s = 0.05
    async with AuthorityServer(cfg) as srv, grpc.aio.insecure_channel(srv.grpc_target) as ch:
        stub = credit_stub(ch)
        call, opening = await open_watch(stub, admin_md(cfg.admin_token))
        for _ in range(3):
            beat = await next_watch_event(call, 2.0, skip_heartbeats=False)
            assert beat.HasField("heartbeat") and beat.cursor == opening.cursor
        call.cancel()


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    pg_dsn: str = request.getfixturevalue("pg_dsn")
    return f"{pg_dsn}?schema=shared_{uuid.uuid4().hex[:10]}"


async def test_changes_of_another_process_arrive(shared_database: str) -> None:
    """Two authorities on one database: a change made through one reaches the other's watchers
    by polling (the in-process wake-up cannot see it)."""
    db = shared_database
    first_cfg = authority_config(db)
    second_cfg = authority_config(db)
    second_cfg.admin_token = first_cfg.admin_token
    md = admin_md(first_cfg.admin_token)
    async with (
        AuthorityServer(first_cfg) as first,
        AuthorityServer(second_cfg) as second,
        grpc.aio.insecure_channel(first.grpc_target) as ch1,
        grpc.aio.insecure_channel(second.grpc_target) as ch2,
    ):
        watcher = credit_stub(ch1)
        writer = credit_stub(ch2)
        pid = new_project_id()
        call, _ = await open_watch(watcher, md)
        await make_wallet(writer, first_cfg.admin_token, pid, balance=50)
        event = await next_watch_event(call, LIVE_DEADLINE_S)
        assert event.project_id == pid
        call.cancel()


async def test_shutdown_ends_watch_streams(tmp_path: Path) -> None:
    cfg = authority_config(f"sqlite:///{tmp_path / 'end.db'}")
    srv = AuthorityServer(cfg)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
            stub = credit_stub(ch)
            call, _ = await open_watch(stub, admin_md(cfg.admin_token))
            await srv.stop()
            with pytest.raises((AssertionError, grpc.aio.AioRpcError)):
                await next_watch_event(call, 5.0)
    finally:
        await srv.stop()


async def test_resync_when_pruning_overtakes_a_slow_stream(
    authority: AuthorityServer, authority_stub: Stub, authority_clock: ManualClock
) -> None:
    """Drives CreditCore.Watch directly so the stream is deterministically paused while the log
    it has not read yet is pruned."""
    token = authority.config.admin_token
    md = admin_md(token)
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100)
    core = authority.core
    stream = core.Watch(pb.WatchRequest(), await core.authenticate(token))
    assert isinstance(stream, AsyncGenerator)
    opening = await anext(stream)
    assert opening.HasField("heartbeat")
    await top_up(authority_stub, md, pid, 1, "s-1")
    await top_up(authority_stub, md, pid, 2, "s-2")
    authority_clock.advance(seconds=8 * 24 * 3600)
    await top_up(authority_stub, md, pid, 3, "s-3")
    assert (await core.prune_changes_once()) > 0
    oldest = await core.store.oldest_cursor()
    resync = await anext(stream)
    assert resync.HasField("resync") and resync.cursor == oldest - 1
    kept = await anext(stream)
    assert kept.cursor == oldest and kept.wallet.balance == 106
    await stream.aclose()
