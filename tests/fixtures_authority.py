"""Fixtures of the authority tests: a running AuthorityServer (SQLite or PostgreSQL) and a stub.

The authority runs on loopback with a random admin token and a ManualClock starting at START_MS;
tests move time with `authority_clock.advance(...)` and `await authority.run_jobs_once()`.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest

from creditservice.clock import ManualClock
from creditservice.server import AuthorityConfig, AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc

START_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z: where every authority fixture's ManualClock starts."""


def credit_stub(channel: grpc.aio.Channel) -> pb_grpc.CreditServiceAsyncStub:
    """A typed async stub (without grpc types the generated overloads miss aio channels)."""
    return cast("pb_grpc.CreditServiceAsyncStub", pb_grpc.CreditServiceStub(channel))


def admin_md(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying a bearer token (the admin's or a project key's secret)."""
    return (("authorization", f"Bearer {token}"),)


def new_project_id(prefix: str = "p") -> str:
    """A project id no other test uses (tests share Redis, never the authority database)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def authority_config(database: str) -> AuthorityConfig:
    return AuthorityConfig(
        database=database,
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        # Never starting with "-": the CLI tests pass it as `--token VALUE`.
        admin_token="admin-" + secrets.token_urlsafe(24),
        clock=ManualClock(START_MS),
        shutdown_grace_s=1.0,
    )


async def make_wallet(
    stub: pb_grpc.CreditServiceAsyncStub,
    admin_token: str,
    project_id: str | None = None,
    *,
    balance: int = 0,
    organization_id: str = "org-test",
    low_balance_threshold: int = 0,
    grace_period_seconds: int = 0,
    overdraft_limit: int = 0,
) -> pb.Wallet:
    """Create a wallet (and top it up to `balance` when > 0); returns the resulting wallet."""
    pid = project_id or new_project_id()
    md = admin_md(admin_token)
    created: pb.CreateWalletResponse = await stub.CreateWallet(
        pb.CreateWalletRequest(
            request_id=f"create-{pid}",
            project_id=pid,
            organization_id=organization_id,
            low_balance_threshold=low_balance_threshold,
            grace_period_seconds=grace_period_seconds,
            overdraft_limit=overdraft_limit,
        ),
        metadata=md,
        timeout=10,
    )
    if balance <= 0:
        return created.wallet
    topped: pb.TopUpResponse = await stub.TopUp(
        pb.TopUpRequest(request_id=f"fund-{pid}", project_id=pid, amount=balance),
        metadata=md,
        timeout=10,
    )
    return topped.wallet


async def expect_rpc_error(
    call: Awaitable[object], code: grpc.StatusCode, *words: str
) -> grpc.aio.AioRpcError:
    """Await a call that must fail with `code` and a message containing every one of `words`."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    for word in words:
        assert word in (err.details() or ""), f"{word!r} not in {err.details()!r}"
    return err


async def authority_state(srv: AuthorityServer) -> tuple[int, list[bytes]]:
    """What a rejected request must leave unchanged: the change log's end and every wallet."""
    wallets, _ = await srv.core.store.list_wallets("", 1000, "")
    return await srv.core.store.last_cursor(), [w.SerializeToString() for w in wallets]


async def next_watch_event(
    call: Any,
    deadline_s: float = 1.0,
    *,
    skip_heartbeats: bool = True,
) -> pb.WatchEvent:
    """The next event of a Watch call within the deadline (polls a condition, no sleep)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        remaining = end - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"no Watch event within {deadline_s}s")
        event = await asyncio.wait_for(call.read(), remaining)
        if event is grpc.aio.EOF:
            raise AssertionError("the Watch stream ended")
        assert isinstance(event, pb.WatchEvent)
        if skip_heartbeats and event.HasField("heartbeat"):
            continue
        return event


@pytest.fixture
async def authority(tmp_path: Path) -> AsyncIterator[AuthorityServer]:
    """A running authority on SQLite in tmp_path (gRPC and REST on free loopback ports)."""
    cfg = authority_config(f"sqlite:///{tmp_path / 'authority.db'}")
    async with AuthorityServer(cfg) as srv:
        yield srv


@pytest.fixture
async def authority_pg(pg_dsn: str) -> AsyncIterator[AuthorityServer]:
    """The same on PostgreSQL, in a fresh schema of the session's private database."""
    schema = f"authority_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(pg_dsn)
    query = f"{parts.query}&schema={schema}" if parts.query else f"schema={schema}"
    cfg = authority_config(urlunsplit(parts._replace(query=query)))
    try:
        async with AuthorityServer(cfg) as srv:
            yield srv
    finally:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
def authority_clock(authority: AuthorityServer) -> ManualClock:
    return cast(ManualClock, authority.clock)


@pytest.fixture
async def authority_stub(
    authority: AuthorityServer,
) -> AsyncIterator[pb_grpc.CreditServiceAsyncStub]:
    """A grpc.aio stub bound to `authority`; the channel is closed after the test."""
    async with grpc.aio.insecure_channel(authority.grpc_target) as channel:
        yield credit_stub(channel)
