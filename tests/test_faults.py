"""Faults between the tiers: crashes around XACK, an authority outage, dead gateways, replays.

Every test ends by comparing the authority ledger's USAGE sum with what the gateway committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from admission import keys
from admission.authority import AuthorityClient
from admission.cache import CacheFiller
from admission.decision import Reason
from admission.engine import AdmissionEngine
from admission.errors import AuthorityUnavailable
from admission.flusher import Flusher
from creditservice.server import AuthorityConfig, AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc
from tests.fixtures_admission import authority_client_for
from tests.fixtures_authority import authority_config, make_wallet, new_project_id
from tests.test_flusher import (
    POLICY,
    SHARDS,
    charge,
    drain_all,
    ledger_usage,
    make_policy,
    wallet_hash,
)


def build_engine(
    rclient: aioredis.Redis,
    client: AuthorityClient,
    registry: CollectorRegistry,
    unsettled_limit: int = 1_000_000,
    gateway_id: str = "gw-faults",
) -> AdmissionEngine:
    policy = make_policy(unsettled_limit)
    filler = CacheFiller(
        rclient, client, unsettled_limit=unsettled_limit, shards=SHARDS, registry=registry
    )
    return AdmissionEngine(rclient, policy, filler, gateway_id=gateway_id)


@dataclasses.dataclass
class StoppableAuthority:
    """An authority on SQLite that a test stops (srv.stop()) and starts again on the same
    address and database (restart())."""

    cfg: AuthorityConfig
    srv: AuthorityServer
    target: str
    restarted: AuthorityServer | None = None

    async def restart(self) -> None:
        self.restarted = AuthorityServer(dataclasses.replace(self.cfg, grpc_listen=self.target))
        await self.restarted.start()


@contextlib.asynccontextmanager
async def stoppable_authority(db: Path) -> AsyncIterator[StoppableAuthority]:
    cfg = authority_config(f"sqlite:///{db}")
    srv = AuthorityServer(cfg)
    await srv.start()
    authority = StoppableAuthority(cfg, srv, srv.grpc_target)
    try:
        yield authority
    finally:
        if authority.restarted is not None:
            await authority.restarted.stop()
        with contextlib.suppress(Exception):
            await srv.stop()


async def test_flusher_dies_between_authority_apply_and_xack(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
) -> None:
    registry = CollectorRegistry()
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=1000)
    engine = build_engine(rclient, auth_client, registry)
    committed = 0
    for amount in (11, 12, 13):
        assert (await engine.commit(await charge(engine, pid), amount)).ok
        committed += amount

    dying = Flusher(rclient, auth_client, shards=SHARDS, gateway_id="dying", registry=registry)
    batch = await dying.read_batch()
    reply = await dying.send(batch)  # the authority applied the batch...
    assert [r.status for r in reply.results] == [pb.APPLIED] * 3
    # ...and the flusher died before XACK: another one reclaims and re-sends.
    heir = Flusher(
        rclient, auth_client, shards=SHARDS, gateway_id="heir", claim_idle_ms=0, registry=registry
    )
    assert await drain_all(heir) == 3
    assert registry.get_sample_value("creditgate_settle_events_total", {"status": "duplicate"}) == 3
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0
    # The zombie wakes up and acknowledges late: XACK returns 0, uns is not taken off twice.
    late = await dying.ack(batch, reply)
    assert late.acked == 0 and late.unsettled_released == 0
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0

    await engine.drain()
    assert await ledger_usage(authority_stub, token, pid) == committed


async def test_same_batch_delivered_twice(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
) -> None:
    registry = CollectorRegistry()
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=1000)
    engine = build_engine(rclient, auth_client, registry)
    committed = 0
    for amount in (5, 0, 40):
        assert (await engine.commit(await charge(engine, pid), amount)).ok
        committed += amount
    assert (await engine.release(await charge(engine, pid))).ok

    flusher = Flusher(rclient, auth_client, shards=SHARDS, gateway_id="twice", registry=registry)
    batch = await flusher.read_batch()
    first = await flusher.send(batch)
    second = await flusher.send(batch)
    assert [r.status for r in second.results] == [pb.DUPLICATE] * 4
    assert [r.ledger_seq for r in second.results] == [r.ledger_seq for r in first.results]
    assert (await flusher.ack(batch, second)).acked == 4
    assert (await flusher.ack(batch, first)).acked == 0
    hash_ = await wallet_hash(rclient, pid)
    assert hash_[keys.W_UNSETTLED] == 0 and hash_[keys.W_SNAPSHOT] == 1000 - committed

    await engine.drain()
    assert await ledger_usage(authority_stub, token, pid) == committed


async def _flush_until_settled(flusher: Flusher, deadline_s: float) -> int:
    """Flush, tolerating the authority still coming back, until the outbox is empty."""
    total = 0
    async with asyncio.timeout(deadline_s):
        while True:
            try:
                n = await flusher.flush_once()
            except AuthorityUnavailable:
                await asyncio.sleep(0.05)  # the channel reconnects: poll again
                continue
            if n == 0:
                return total
            total += n


async def test_authority_outage_admits_within_cache_then_backlog_then_settles(
    tmp_path: Path,
    rclient: aioredis.Redis,
) -> None:
    registry = CollectorRegistry()
    pid = new_project_id()
    async with stoppable_authority(tmp_path / "outage.db") as authority:
        token, target = authority.cfg.admin_token, authority.target
        async with grpc_stub(target) as stub:
            await make_wallet(stub, token, pid, balance=1000)
        async with authority_client_for(authority.srv) as client:
            engine = build_engine(rclient, client, registry, unsettled_limit=50)
            flusher = Flusher(
                rclient, client, shards=SHARDS, gateway_id="outage", registry=registry
            )
            assert (await engine.commit(await charge(engine, pid), 10)).ok  # warms the cache
            assert await drain_all(flusher) == 1
            committed = 10

            await authority.srv.stop()  # the authority goes away
            for _ in range(5):
                assert (await engine.commit(await charge(engine, pid), 10)).ok
                committed += 10
            route = engine.policy.route("charge")
            assert route is not None
            denied = await engine.admit(engine.request_for(route, pid))
            assert not denied.admitted and denied.reason is Reason.SETTLEMENT_BACKLOG
            assert denied.retry_after_seconds
            with pytest.raises(AuthorityUnavailable):
                await flusher.flush_once()
            assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 50  # nothing acked

            await authority.restart()
            assert await _flush_until_settled(flusher, 15.0) == 5
            hash_ = await wallet_hash(rclient, pid)
            assert hash_[keys.W_UNSETTLED] == 0 and hash_[keys.W_SNAPSHOT] == 1000 - committed
            again = await engine.admit(engine.request_for(route, pid))
            assert again.admitted and again.hold is not None
            assert (await engine.release(again.hold)).ok
            assert await drain_all(flusher) == 1
            await engine.drain()
        async with grpc_stub(target) as stub:
            assert await ledger_usage(stub, token, pid) == committed


async def test_a_batch_the_authority_refused_survives_a_redis_data_loss(
    tmp_path: Path, rclient: aioredis.Redis
) -> None:
    """Settle fails (the authority is away), then Redis loses its data: the batch now exists
    only in the flusher, which keeps it and settles it once the authority is back."""
    registry = CollectorRegistry()
    pid = new_project_id()
    async with stoppable_authority(tmp_path / "loss.db") as authority:
        token, target = authority.cfg.admin_token, authority.target
        async with grpc_stub(target) as stub:
            await make_wallet(stub, token, pid, balance=1000)
        async with authority_client_for(authority.srv) as client:
            engine = build_engine(rclient, client, registry)
            flusher = Flusher(rclient, client, shards=SHARDS, gateway_id="loss", registry=registry)
            for amount in (3, 4):
                assert (await engine.commit(await charge(engine, pid), amount)).ok
            await authority.srv.stop()
            with pytest.raises(AuthorityUnavailable):
                await flusher.flush_once()
            await rclient.delete(keys.outbox(keys.shard_of(pid, SHARDS)))  # data lost
            await authority.restart()
            await flusher.drain(15.0)
            await engine.drain()
        async with grpc_stub(target) as stub:
            assert await ledger_usage(stub, token, pid) == 7


async def test_dead_gateway_holds_expire_and_settle_as_expire_events(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
) -> None:
    registry = CollectorRegistry()
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=1000)
    doomed = build_engine(rclient, auth_client, registry, gateway_id="doomed")
    holds = [await charge(doomed, pid) for _ in range(3)]
    assert (await doomed.commit(holds[0], 10)).ok
    await doomed.drain()  # the process dies: holds[1:] are never ended by it
    assert (await wallet_hash(rclient, pid))[keys.W_HELD] == 20

    survivor = build_engine(rclient, auth_client, registry, gateway_id="survivor")
    # Virtual clock: the shard's scripts add this offset to Redis TIME; past the 300 s TTL.
    await rclient.set(keys.clock_offset(keys.shard_of(pid, SHARDS)), 301_000)
    flusher = Flusher(
        rclient,
        auth_client,
        shards=SHARDS,
        gateway_id="survivor",
        sweeper=survivor,
        sweep_interval_ms=20,
        block_ms=20,
        registry=registry,
    )
    runner = asyncio.create_task(flusher.run())
    try:
        async with asyncio.timeout(10):
            while True:
                hash_ = await wallet_hash(rclient, pid)
                swept = registry.get_sample_value("creditgate_holds_expired_total") or 0
                settled = registry.get_sample_value(
                    "creditgate_settle_events_total", {"status": "applied"}
                )
                # Other tests' forgotten holds on this shard may be swept too: at least ours.
                if hash_[keys.W_HELD] == 0 and swept >= 2 and (settled or 0) >= 3:
                    break
                await asyncio.sleep(0.02)  # polling a condition with a deadline
    finally:
        flusher.stop()
        async with asyncio.timeout(10):
            await runner
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0
    await survivor.drain()
    assert await ledger_usage(authority_stub, token, pid) == 10


@contextlib.asynccontextmanager
async def grpc_stub(target: str) -> AsyncIterator[pb_grpc.CreditServiceAsyncStub]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        yield cast("pb_grpc.CreditServiceAsyncStub", pb_grpc.CreditServiceStub(channel))


async def test_cli_flusher_settles_then_drains_on_sigterm(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    redis_url: str,
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    token = authority.config.admin_token
    pid = new_project_id()
    await make_wallet(authority_stub, token, pid, balance=1000)
    engine = build_engine(rclient, auth_client, registry)
    assert (await engine.commit(await charge(engine, pid), 21)).ok
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(POLICY.format(unsl=1_000_000))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway_plugin.cli",
        "flusher",
        "--redis",
        redis_url,
        "--authority",
        authority.grpc_target,
        "--token",
        token,
        "--policy",
        str(policy_file),
        "--gateway-id",
        "cli",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        try:
            async with asyncio.timeout(20):
                while True:
                    if await ledger_usage(authority_stub, token, pid) == 21:
                        break
                    await asyncio.sleep(0.05)  # polling a condition with a deadline
        except TimeoutError:
            proc.kill()
            _, stderr = await proc.communicate()
            raise AssertionError(stderr.decode()[-3000:]) from None
        # Committed after the flusher settled the first one: the shutdown drain settles it.
        assert (await engine.commit(await charge(engine, pid), 4)).ok
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await engine.drain()
    assert (await wallet_hash(rclient, pid))[keys.W_UNSETTLED] == 0
    assert await ledger_usage(authority_stub, token, pid) == 25
