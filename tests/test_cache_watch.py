"""Cache fill, the Watch push stream and reconcile, against a real Redis and a real authority."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import CollectorRegistry

from admission import cache, keys
from admission.authority import AuthorityClient, AuthorityClientConfig
from admission.cache import CacheFiller, Reconciler, WatchSubscriber
from admission.decision import Reason
from admission.engine import AdmissionEngine
from admission.errors import AuthorityUnavailable
from admission.flusher import Flusher
from admission.identity import IdentityResolver
from admission.lease import LeaseAdmitter
from creditservice.auth import hash_secret
from creditservice.clock import ManualClock
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc
from tests.fixtures_admission import authority_client_for
from tests.fixtures_authority import admin_md, authority_config, make_wallet, new_project_id
from tests.services import eventually, free_port
from tests.test_flusher import SHARDS, make_policy, wallet_hash

UNSL = 5000


@pytest.fixture
def filler(
    rclient: aioredis.Redis, auth_client: AuthorityClient, registry: CollectorRegistry
) -> CacheFiller:
    return CacheFiller(rclient, auth_client, unsettled_limit=UNSL, shards=SHARDS, registry=registry)


@contextlib.asynccontextmanager
async def watching(
    filler: CacheFiller, registry: CollectorRegistry, start_cursor: int
) -> AsyncIterator[WatchSubscriber]:
    sub = WatchSubscriber(
        filler, start_cursor=start_cursor, resync_on_start=False, registry=registry
    )
    await sub.start()
    try:
        yield sub
    finally:
        await sub.aclose()
        await filler.aclose()


def qdefs_key(pid: str) -> str:
    return keys.quota_defs(keys.shard_of(pid, SHARDS), pid)


async def set_quota(
    stub: pb_grpc.CreditServiceAsyncStub, token: str, pid: str, name: str, limit: int
) -> None:
    await stub.SetQuota(
        pb.SetQuotaRequest(
            request_id=f"q-{pid}-{name}-{limit}",
            quota=pb.Quota(
                project_id=pid,
                name=name,
                algorithm=pb.SLIDING_WINDOW,
                limit=limit,
                window_seconds=60,
            ),
        ),
        metadata=admin_md(token),
        timeout=10,
    )


async def test_fill_writes_snapshot_and_quotas_unknown_is_false(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    filler: CacheFiller,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    wallet = await make_wallet(authority_stub, token, pid, balance=700, overdraft_limit=30)
    await set_quota(authority_stub, token, pid, "requests", 100)
    await authority_stub.SetQuota(
        pb.SetQuotaRequest(
            request_id=f"qc-{pid}",
            quota=pb.Quota(project_id=pid, name="parallel", algorithm=pb.CONCURRENCY, limit=4),
        ),
        metadata=admin_md(token),
        timeout=10,
    )
    assert await filler.fill(pid) is True
    got = await wallet_hash(rclient, pid)
    assert got[keys.W_SNAPSHOT] == 700 and got[keys.W_OVERDRAFT] == 30
    assert got[keys.W_VERSION] >= wallet.version and got[keys.W_STATE] == pb.HEALTHY
    assert got[keys.W_HELD] == 0 and got[keys.W_UNSETTLED] == 0
    assert got[keys.W_UNSETTLED_LIMIT] == UNSL
    quotas = await rclient.hgetall(qdefs_key(pid))
    assert quotas == {b"requests": b"rate:100:60", b"parallel": b"concurrency:4:0"}

    # A refill never touches this tier's counters.
    wkey = keys.wallet(keys.shard_of(pid, SHARDS), pid)
    await rclient.hset(wkey, mapping={keys.W_HELD: 17, keys.W_UNSETTLED: 23})
    assert await filler.refresh(pid) is True
    got = await wallet_hash(rclient, pid)
    assert got[keys.W_HELD] == 17 and got[keys.W_UNSETTLED] == 23

    assert await filler.fill(new_project_id("nobody")) is False


async def test_concurrent_fills_share_one_authority_call(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    registry: CollectorRegistry,
) -> None:
    pid = new_project_id()
    await make_wallet(authority_stub, authority.config.admin_token, pid, balance=50)
    before = auth_client.calls["GetAdmissionSnapshot"]
    results = await asyncio.gather(*(filler.fill(pid) for _ in range(25)))
    assert results == [True] * 25
    assert auth_client.calls["GetAdmissionSnapshot"] - before == 1
    assert registry.get_sample_value("creditgate_cache_fills_total", {"result": "filled"}) == 1
    assert registry.get_sample_value("creditgate_cache_fills_total", {"result": "shared"}) == 24


async def test_fill_with_authority_down_raises_unavailable(
    rclient: aioredis.Redis, registry: CollectorRegistry
) -> None:
    cfg = AuthorityClientConfig(target=f"127.0.0.1:{free_port()}", token="x", timeout_s=0.5)
    async with AuthorityClient(cfg) as client:
        filler = CacheFiller(
            rclient, client, unsettled_limit=UNSL, shards=SHARDS, registry=registry
        )
        with pytest.raises(AuthorityUnavailable) as info:
            await filler.fill(new_project_id())
        assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)


async def test_watch_applies_topup_quota_and_lifecycle_within_1s(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    md = admin_md(token)
    clock = cast(ManualClock, authority.clock)
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100, grace_period_seconds=60)
    snapshot = await auth_client.get_snapshot(pid)
    assert snapshot is not None
    assert await filler.fill(pid)

    async def wallet_is(**want: int) -> bool:
        got = await wallet_hash(rclient, pid)
        return all(got.get(k) == v for k, v in want.items())

    async with watching(filler, registry, snapshot.cursor):
        await authority_stub.TopUp(
            pb.TopUpRequest(request_id=f"t1-{pid}", project_id=pid, amount=400),
            metadata=md,
            timeout=10,
        )
        await eventually(lambda: wallet_is(snap=500))

        await set_quota(authority_stub, token, pid, "requests", 42)
        await eventually(lambda: _equals(rclient.hget(qdefs_key(pid), "requests"), b"rate:42:60"))
        await authority_stub.DeleteQuota(
            pb.DeleteQuotaRequest(request_id=f"qd-{pid}", project_id=pid, name="requests"),
            metadata=md,
            timeout=10,
        )
        await eventually(lambda: _equals(rclient.hget(qdefs_key(pid), "requests"), None))

        # Spend everything: GRACE; past the grace deadline the job expires it: EXPIRED.
        await authority_stub.Adjust(
            pb.AdjustRequest(
                request_id=f"adj-{pid}",
                project_id=pid,
                kind=pb.ADJUSTMENT,
                amount=-500,
                reason="test: drain the wallet",
            ),
            metadata=md,
            timeout=10,
        )
        await eventually(lambda: wallet_is(snap=0, state=pb.GRACE))
        assert (await wallet_hash(rclient, pid))[keys.W_GRACE_UNTIL] > 0
        clock.advance(seconds=61)
        await authority.run_jobs_once()
        await eventually(lambda: wallet_is(state=pb.EXPIRED))

        await authority_stub.TopUp(
            pb.TopUpRequest(request_id=f"t2-{pid}", project_id=pid, amount=10),
            metadata=md,
            timeout=10,
        )
        await eventually(lambda: wallet_is(snap=10, gu=0, state=pb.HEALTHY))
    assert registry.get_sample_value("creditgate_watch_events_total", {"kind": "lifecycle"})


async def _equals(value: Awaitable[object], want: object) -> bool:
    return await value == want


async def test_older_versions_never_overwrite_newer(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    registry: CollectorRegistry,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100)
    old = await auth_client.get_snapshot(pid)
    assert old is not None
    await authority_stub.TopUp(
        pb.TopUpRequest(request_id=f"t-{pid}", project_id=pid, amount=1),
        metadata=admin_md(token),
        timeout=10,
    )
    assert await filler.fill(pid)
    newer = await wallet_hash(rclient, pid)
    assert newer[keys.W_SNAPSHOT] == 101

    # Watch path, fill path and the flusher's ack path all refuse the older snapshot.
    assert await filler.store.apply_wallet(old.wallet) == (True, False)
    assert await filler.store.fill(old, UNSL) is False
    flusher = Flusher(rclient, auth_client, shards=SHARDS, gateway_id="vers", registry=registry)
    shard = keys.shard_of(pid, SHARDS)
    assert await flusher._ack_shard(shard, [], [], [old.wallet]) == (0, 0, 0, 0)
    assert await wallet_hash(rclient, pid) == newer

    # A wallet event for a project nobody cached creates nothing.
    ghost = pb.Wallet(project_id=new_project_id("ghost"), available=5, version=9)
    assert await filler.store.apply_wallet(ghost) == (False, False)
    assert await wallet_hash(rclient, ghost.project_id) == {}


async def test_events_during_a_fill_are_replayed_after_it(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100)
    await set_quota(authority_stub, token, pid, "requests", 5)
    stale = await auth_client.get_snapshot(pid)
    assert stale is not None
    # A quota change the stream delivers while a fill (of an older snapshot) is in flight.
    later = pb.WatchEvent(
        cursor=stale.cursor + 1,
        project_id=pid,
        quota=pb.QuotaChange(
            quota=pb.Quota(
                project_id=pid,
                name="requests",
                algorithm=pb.SLIDING_WINDOW,
                limit=9,
                window_seconds=60,
            )
        ),
    )
    filler._buffers[pid] = []
    await filler.on_event(later)  # buffered, not applied to a project being filled
    assert await rclient.exists(qdefs_key(pid)) == 0
    await filler.store.fill(stale, UNSL)
    await filler._replay(pid, stale.cursor)
    assert await rclient.hget(qdefs_key(pid), "requests") == b"rate:9:60"
    assert pid not in filler._buffers


async def test_watch_reconnects_after_authority_restart(
    tmp_path: Path, rclient: aioredis.Redis, registry: CollectorRegistry
) -> None:
    cfg = authority_config(f"sqlite:///{tmp_path / 'restart.db'}")
    cfg = dataclasses.replace(cfg, grpc_listen=f"127.0.0.1:{free_port()}", http_listen="")
    pid = new_project_id()
    srv = AuthorityServer(cfg)
    await srv.start()
    restarted: AuthorityServer | None = None
    try:
        async with authority_client_for(srv) as client:
            await make_wallet(client.stub, cfg.admin_token, pid, balance=10)
            filler = CacheFiller(
                rclient, client, unsettled_limit=UNSL, shards=SHARDS, registry=registry
            )
            snapshot = await client.get_snapshot(pid)
            assert snapshot is not None and await filler.fill(pid)
            async with watching(filler, registry, snapshot.cursor) as sub:
                await srv.stop()
                await eventually(lambda: _false(sub.connected.is_set()), within_s=5)
                restarted = AuthorityServer(dataclasses.replace(cfg))
                await restarted.start()
                await client.stub.TopUp(
                    pb.TopUpRequest(request_id=f"t-{pid}", project_id=pid, amount=5),
                    metadata=admin_md(cfg.admin_token),
                    timeout=10,
                    wait_for_ready=True,
                )
                # Reconnect backoff is capped at 1 s; the change then arrives from the cursor.
                await eventually(lambda: _snap_is(rclient, pid, 15), within_s=3.0)
                assert sub.resyncs == 0
            assert (registry.get_sample_value("creditgate_watch_reconnects_total") or 0) >= 1
    finally:
        if restarted is not None:
            await restarted.stop()
        with contextlib.suppress(Exception):
            await srv.stop()


class CountedSleep:
    """A WatchSubscriber's `sleep`: records each backoff instead of waiting it out; the
    `stop_after`-th call parks the subscriber until it is closed."""

    def __init__(
        self, stop_after: int, at: dict[int, Callable[[], Awaitable[None]]] | None = None
    ) -> None:
        self.delays: list[float] = []
        self.stop_after = stop_after
        self.at = at or {}  # n -> what happens during the n-th wait (1-based)
        self.done = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        action = self.at.get(len(self.delays))
        if action is not None:
            await action()
        if len(self.delays) >= self.stop_after:
            self.done.set()
            await asyncio.Event().wait()  # until aclose() cancels the subscriber


async def watch_backoffs(
    client: AuthorityClient,
    rclient: aioredis.Redis,
    registry: CollectorRegistry,
    attempts: int,
    at: dict[int, Callable[[], Awaitable[None]]] | None = None,
) -> list[float]:
    """The waits of a WatchSubscriber between its first `attempts` failed connections."""
    filler = CacheFiller(rclient, client, unsettled_limit=UNSL, shards=SHARDS, registry=registry)
    sleep = CountedSleep(attempts, at)
    sub = WatchSubscriber(filler, resync_on_start=False, registry=registry, sleep=sleep)
    await sub.start()
    try:
        async with asyncio.timeout(10):
            await sleep.done.wait()
        assert not sub.connected.is_set()
    finally:
        await sub.aclose()
        await filler.aclose()
    return sleep.delays


async def test_watch_refused_token_backs_off_up_to_30s_and_says_so_once(
    authority: AuthorityServer,
    rclient: aioredis.Redis,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway started without the admin token: the authority answers UNAUTHENTICATED, which
    no reconnect cures. It used to reconnect about once a second forever, logging each time."""
    cfg = AuthorityClientConfig(target=authority.grpc_target, token="")
    with caplog.at_level(logging.DEBUG, logger="admission.cache"):
        async with AuthorityClient(cfg) as client:
            delays = await watch_backoffs(client, rclient, registry, 13)
    assert delays == pytest.approx([0.05 * 2**i for i in range(10)] + [30.0] * 3)
    assert registry.get_sample_value("creditgate_watch_reconnects_total") == 13
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, loud  # 13 refusals, one line
    assert "the authority refused the gateway's token" in loud[0]
    assert "--token / CREDITGATE_ADMIN_TOKEN" in loud[0]
    assert "UNAUTHENTICATED" in loud[0]


async def test_watch_unreachable_authority_keeps_the_1s_backoff_cap(
    rclient: aioredis.Redis, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """UNAVAILABLE cures itself: reconnects stay at most 1 s apart (invariant 6 after an
    outage), and each interruption is logged as before."""
    cfg = AuthorityClientConfig(target=f"127.0.0.1:{free_port()}", token="x")
    with caplog.at_level(logging.WARNING, logger="admission.cache"):
        async with AuthorityClient(cfg) as client:
            delays = await watch_backoffs(client, rclient, registry, 8)
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    interrupted = [r for r in caplog.records if "Watch stream interrupted" in r.getMessage()]
    assert len(interrupted) == 8
    assert all("UNAVAILABLE" in r.getMessage() for r in interrupted)


async def test_watch_back_to_the_1s_cap_when_a_refusal_turns_into_an_outage(
    tmp_path: Path, rclient: aioredis.Redis, registry: CollectorRegistry
) -> None:
    """The refusal's long backoff does not carry over to an error that cures itself."""
    cfg = authority_config(f"sqlite:///{tmp_path / 'refusing.db'}")
    cfg = dataclasses.replace(cfg, grpc_listen=f"127.0.0.1:{free_port()}", http_listen="")
    srv = AuthorityServer(cfg)
    await srv.start()
    try:
        client_cfg = AuthorityClientConfig(target=srv.grpc_target, token="")
        async with AuthorityClient(client_cfg) as client:
            # Refused 6 times (the 6th wait is 1.6 s), then the authority goes away.
            delays = await watch_backoffs(client, rclient, registry, 9, at={6: srv.stop})
    finally:
        with contextlib.suppress(Exception):
            await srv.stop()
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 1.0, 1.0, 1.0])


async def _false(value: bool) -> bool:
    return not value


async def _snap_is(rclient: aioredis.Redis, pid: str, snap: int) -> bool:
    return (await wallet_hash(rclient, pid)).get(keys.W_SNAPSHOT) == snap


async def test_reconcile_reports_and_repairs_drift(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    filler: CacheFiller,
    registry: CollectorRegistry,
) -> None:
    pid = new_project_id()
    await make_wallet(authority_stub, authority.config.admin_token, pid, balance=300)
    assert await filler.fill(pid)
    wkey = keys.wallet(keys.shard_of(pid, SHARDS), pid)
    await rclient.hset(wkey, keys.W_SNAPSHOT, 999_999)
    reconciler = Reconciler(filler, registry=registry)
    drifted = await reconciler.run_once()
    assert pid in drifted
    assert (await wallet_hash(rclient, pid))[keys.W_SNAPSHOT] == 300
    assert (registry.get_sample_value("creditgate_cache_drift_total") or 0) >= 1
    assert pid not in await reconciler.run_once()


class RecordingKeyCache:
    """A KeyCache that records what the Watch stream asked of it."""

    def __init__(self) -> None:
        self.cleared = 0
        self.evicted: list[str] = []
        self.connected: list[bool] = []

    def evict(self, key_hash: str) -> None:
        self.evicted.append(key_hash)

    def clear(self) -> None:
        self.cleared += 1

    def set_watch_connected(self, connected: bool) -> None:
        self.connected.append(connected)


async def test_resync_after_authority_replaced_refills_every_cached_project(
    tmp_path: Path, rclient: aioredis.Redis, registry: CollectorRegistry
) -> None:
    cfg = authority_config(f"sqlite:///{tmp_path / 'first.db'}")
    cfg = dataclasses.replace(cfg, grpc_listen=f"127.0.0.1:{free_port()}", http_listen="")
    pid = new_project_id()
    stale_key = keys.api_key("ab" * 32)
    srv = AuthorityServer(cfg)
    await srv.start()
    replaced: AuthorityServer | None = None
    try:
        async with authority_client_for(srv) as client:
            await make_wallet(client.stub, cfg.admin_token, pid, balance=10)
            for amount in (1, 2, 3):  # a long history: a high version and cursor
                await client.stub.TopUp(
                    pb.TopUpRequest(request_id=f"t{amount}-{pid}", project_id=pid, amount=amount),
                    metadata=admin_md(cfg.admin_token),
                    timeout=10,
                )
            filler = CacheFiller(
                rclient, client, unsettled_limit=UNSL, shards=SHARDS, registry=registry
            )
            snapshot = await client.get_snapshot(pid)
            assert snapshot is not None and await filler.fill(pid)
            await rclient.set(stale_key, pid)
            keycache = RecordingKeyCache()
            sub = WatchSubscriber(
                filler,
                key_caches=(keycache,),
                start_cursor=snapshot.cursor,
                resync_on_start=False,
                registry=registry,
            )
            await sub.start()
            try:
                await srv.stop()
                # Another database behind the same address: its log is behind our cursor.
                other = dataclasses.replace(cfg, database=f"sqlite:///{tmp_path / 'other.db'}")
                replaced = AuthorityServer(other)
                await replaced.start()
                async with grpc.aio.insecure_channel(cfg.grpc_listen) as channel:
                    fresh = pb_grpc.CreditServiceStub(channel)
                    await make_wallet(fresh, cfg.admin_token, pid, balance=77)
                await eventually(lambda: _snap_is(rclient, pid, 77), within_s=5.0)
                await eventually(lambda: _equals(rclient.exists(stale_key), 0), within_s=2.0)
                assert keycache.cleared >= 1
                # Resumes from the new log's position: later changes arrive without a resync.
                await client.stub.TopUp(
                    pb.TopUpRequest(request_id=f"late-{pid}", project_id=pid, amount=5),
                    metadata=admin_md(cfg.admin_token),
                    timeout=10,
                    wait_for_ready=True,
                )
                await eventually(lambda: _snap_is(rclient, pid, 82), within_s=1.0)
                assert sub.cursor < snapshot.cursor
            finally:
                await sub.aclose()
                await filler.aclose()
    finally:
        if replaced is not None:
            await replaced.stop()
        with contextlib.suppress(Exception):
            await srv.stop()


async def _issue_key(stub: pb_grpc.CreditServiceAsyncStub, token: str, pid: str) -> str:
    reply = await stub.IssueApiKey(
        pb.IssueApiKeyRequest(request_id=f"key-{pid}", project_id=pid, name="test"),
        metadata=admin_md(token),
        timeout=10,
    )
    return str(reply.secret)


async def _keyed_project(
    stub: pb_grpc.CreditServiceAsyncStub, client: AuthorityClient, token: str
) -> tuple[str, str, pb.ProjectSnapshot]:
    """A new project with 100 credits and a key: its id, the key's secret, its snapshot."""
    pid = new_project_id()
    await make_wallet(stub, token, pid, balance=100)
    secret = await _issue_key(stub, token, pid)
    start = await client.get_snapshot(pid)
    assert start is not None
    return pid, secret, start


async def _top_up_delivered(
    stub: pb_grpc.CreditServiceAsyncStub, token: str, pid: str, watch: WatchSubscriber
) -> None:
    """Top the project up by 50 and wait until the Watch has delivered the change."""
    before = watch.cursor
    await stub.TopUp(
        pb.TopUpRequest(request_id=f"t-{pid}", project_id=pid, amount=50),
        metadata=admin_md(token),
        timeout=10,
    )

    async def delivered() -> bool:
        return watch.cursor > before

    await eventually(delivered)


async def test_a_key_resolved_at_the_authority_fills_its_project_in_the_same_call(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    registry: CollectorRegistry,
) -> None:
    """A new project's first request: one authority call (the key, with its snapshot)."""
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=300)
    await set_quota(authority_stub, token, pid, "requests", 7)
    secret = await _issue_key(authority_stub, token, pid)
    identity = IdentityResolver(rclient, auth_client, registry=registry, snapshots=filler)
    calls = dict(auth_client.calls)
    assert await identity.resolve(secret) == pid
    await filler.filled(pid)  # the write is not waited for by the resolution
    assert auth_client.calls["ResolveApiKey"] == calls.get("ResolveApiKey", 0) + 1
    assert auth_client.calls["GetAdmissionSnapshot"] == calls.get("GetAdmissionSnapshot", 0)
    got = await wallet_hash(rclient, pid)
    assert got[keys.W_SNAPSHOT] == 300 and got[keys.W_UNSETTLED_LIMIT] == UNSL
    assert await rclient.hgetall(qdefs_key(pid)) == {b"requests": b"rate:7:60"}
    assert registry.get_sample_value("creditgate_cache_fills_total", {"result": "offered"}) == 1

    # A project already cached is left as it is: its state there may be newer.
    await rclient.hset(keys.wallet(keys.shard_of(pid, SHARDS), pid), keys.W_SNAPSHOT, 299)
    snapshot = await auth_client.get_snapshot(pid)
    assert snapshot is not None
    with filler.recording() as recording:
        pass
    assert await filler.offer(snapshot, recording) is True
    assert (await wallet_hash(rclient, pid))[keys.W_SNAPSHOT] == 299


def _hold_back_first_write(
    filler: CacheFiller, monkeypatch: pytest.MonkeyPatch, error: Exception | None = None
) -> tuple[asyncio.Event, list[str]]:
    """The first snapshot write waits for the returned gate (then fails with `error`, when
    given); every write's mode is recorded in the returned list."""
    gate = asyncio.Event()
    writes: list[str] = []
    fill = filler.store.fill

    async def held_back(*args: Any, **kwargs: Any) -> Any:
        writes.append(kwargs["mode"])
        if len(writes) == 1:
            await gate.wait()
            if error is not None:
                raise error
        return await fill(*args, **kwargs)

    monkeypatch.setattr(filler.store, "fill", held_back)
    return gate, writes


@pytest.mark.parametrize(
    "write_error",
    [None, redis.exceptions.ResponseError("OOM"), redis.exceptions.ConnectionError("gone")],
    ids=["written", "write-refused", "redis-away"],
)
async def test_a_first_lease_sync_ahead_of_the_keys_snapshot_waits_for_its_write(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    write_error: Exception | None,
) -> None:
    """The key's snapshot is written to Redis while the resolution goes on, not waited for. A
    first lease sync that gets to Redis before that write finds the project cold, and waits
    for the write as for any fill in flight: admitted, with no GetAdmissionSnapshot call. When
    Redis refuses that write, the lease's fill asks the authority for the snapshot instead;
    when Redis is away, the request is refused (503) without that call."""
    token = authority.config.admin_token
    pid, secret, _ = await _keyed_project(authority_stub, auth_client, token)
    gate, writes = _hold_back_first_write(filler, monkeypatch, write_error)
    policy = make_policy()
    engine = AdmissionEngine(rclient, policy, filler, gateway_id="gw-offer")
    leases = LeaseAdmitter(engine.store, policy, filler, route_problem=engine.route_problem)
    charge = policy.route("charge")
    assert charge is not None
    identity = IdentityResolver(rclient, auth_client, registry=registry, snapshots=filler)
    calls = dict(auth_client.calls)
    async with asyncio.timeout(5):  # the resolution does not wait for the held-back write
        assert await identity.resolve(secret) == pid
    assert await wallet_hash(rclient, pid) == {}
    first = asyncio.ensure_future(leases.admit(charge, pid))
    try:
        await asyncio.sleep(0)  # one loop turn: the request registers as the lease's waiter
        assert await leases.sync_round() == 1
        assert leases.stats.cold == 1, "the sync got to Redis before the write"
    finally:
        gate.set()
    async with asyncio.timeout(10):
        while not first.done():
            await leases.sync_round()
            await asyncio.wait({first}, timeout=0.01)  # the write completes meanwhile
    decision = first.result()
    fills = auth_client.calls["GetAdmissionSnapshot"] - calls.get("GetAdmissionSnapshot", 0)
    assert auth_client.calls["ResolveApiKey"] == calls.get("ResolveApiKey", 0) + 1
    if isinstance(write_error, redis.exceptions.ConnectionError):
        assert not decision.admitted and decision.reason is Reason.UNAVAILABLE
        assert (fills, writes) == (0, ["offer"])
    else:
        assert decision.admitted and decision.hold is not None
        assert leases.end_local(decision.hold, True, 10) is None
        assert (fills, writes) == (
            (0, ["offer"]) if write_error is None else (1, ["offer", "fill"])
        )
        assert (await wallet_hash(rclient, pid))[keys.W_SNAPSHOT] == 100
    await leases.aclose()


async def test_events_replayed_after_an_offered_snapshot_tell_the_leases(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A top-up the Watch delivers while the key's snapshot is being written is buffered, then
    applied after the write, and the leases are told (a sync may have read Redis in between,
    now that the request does not wait for the write). A later fill finds the snapshot there
    and asks the authority nothing."""
    token = authority.config.admin_token
    pid, secret, start = await _keyed_project(authority_stub, auth_client, token)
    told: list[str] = []
    filler.project_listeners = (told.append,)
    gate, _ = _hold_back_first_write(filler, monkeypatch)
    async with watching(filler, registry, start.cursor) as watch:
        identity = IdentityResolver(rclient, auth_client, registry=registry, snapshots=filler)
        try:
            async with asyncio.timeout(5):
                assert await identity.resolve(secret) == pid
            await _top_up_delivered(authority_stub, token, pid, watch)
            assert told == [], "buffered behind the write: nothing applied yet"
        finally:
            gate.set()
        await filler.filled(pid)
        assert told == [pid]
        assert (await wallet_hash(rclient, pid))[keys.W_SNAPSHOT] == 150
        calls = auth_client.calls["GetAdmissionSnapshot"]
        assert await filler.fill(pid) is True
        assert auth_client.calls["GetAdmissionSnapshot"] == calls
        assert registry.get_sample_value("creditgate_cache_fills_total", {"result": "landed"}) == 1


async def test_an_event_after_the_keys_snapshot_is_applied_after_it(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    registry: CollectorRegistry,
) -> None:
    """A top-up the Watch delivers between the key's snapshot and its write to Redis is not
    lost: nothing applied it (the project was not cached), so the offer replays it."""
    token = authority.config.admin_token
    pid, secret, start = await _keyed_project(authority_stub, auth_client, token)
    async with watching(filler, registry, start.cursor) as watch:
        with filler.recording() as recording:
            key, snapshot = await auth_client.resolve_api_key_with_snapshot(hash_secret(secret))
            assert key is not None and snapshot is not None
            assert snapshot.wallet.available == 100
            await _top_up_delivered(authority_stub, token, pid, watch)
            assert watch.cursor > snapshot.cursor
        assert await wallet_hash(rclient, pid) == {}, "not cached: the top-up applied nothing"
        # Without what was recorded, the snapshot would be written without the top-up.
        with filler.recording() as nothing:
            pass
        stale = pb.ProjectSnapshot()
        stale.CopyFrom(snapshot)
        assert await filler.offer(stale, nothing) is True
        assert (await wallet_hash(rclient, pid))[keys.W_SNAPSHOT] == 100
        await rclient.delete(keys.wallet(keys.shard_of(pid, SHARDS), pid), qdefs_key(pid))

        assert await filler.offer(snapshot, recording) is True
        assert (await wallet_hash(rclient, pid))[keys.W_SNAPSHOT] == 150


async def test_an_overflowed_recording_leaves_the_project_to_a_fill(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=100)
    snapshot = await auth_client.get_snapshot(pid)
    assert snapshot is not None
    monkeypatch.setattr(cache, "RECORDING_LIMIT", 2)
    other = pb.WatchEvent(cursor=snapshot.cursor + 1, project_id="someone-else")
    with filler.recording() as recording:
        for i in range(3):
            other.cursor = snapshot.cursor + 1 + i
            await filler.on_event(other)
    assert recording.overflowed and len(recording.events) == 2
    assert await filler.offer(snapshot, recording) is False
    assert await wallet_hash(rclient, pid) == {}


async def test_an_event_at_any_await_of_the_key_resolution_is_applied(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    filler: CacheFiller,
    registry: CollectorRegistry,
) -> None:
    """The resolver's own Redis calls are awaits too: a top-up the Watch delivers during one
    of them (after the authority answered) ends up in Redis. Found in review: the recording
    used to end before the key mapping's SET, and offer() started after it."""
    token = authority.config.admin_token
    pid, secret, start = await _keyed_project(authority_stub, auth_client, token)
    async with watching(filler, registry, start.cursor) as watch:

        class DeliveredDuringSet:
            """The test's Redis client, except that SET first has a top-up delivered."""

            def __getattr__(self, name: str) -> object:
                return getattr(rclient, name)

            async def set(self, *args: object, **kwargs: object) -> object:
                await _top_up_delivered(authority_stub, token, pid, watch)
                return await rclient.set(*args, **kwargs)  # type: ignore[arg-type]

        identity = IdentityResolver(
            cast(aioredis.Redis, DeliveredDuringSet()),
            auth_client,
            registry=registry,
            snapshots=filler,
        )
        assert await identity.resolve(secret) == pid
        await filler.filled(pid)
        assert (await wallet_hash(rclient, pid))[keys.W_SNAPSHOT] == 150
