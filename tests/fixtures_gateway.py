"""Fixtures of the gateway tests: an aiohttp app protected by the plugin, against real services.

`gateway_factory(routes, policy_text=..., **config)` builds an app with the given handlers,
calls setup() with the session Redis and the test's authority, starts it under aiohttp's test
client and returns a `Gateway` (client, state, registry). `project_factory(...)` creates a
wallet and an API key at the authority and returns (project_id, secret).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from admission import keys
from admission.policy import parse_policy
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc
from gateway_plugin import GatewayConfig, GatewayState, setup
from tests.fixtures_authority import admin_md, make_wallet
from tests.services import RedisProcess, start_redis

GATEWAY_POLICY = """
[settings]
shards = 4
admission = "lease"
credit_retry_after_seconds = 30
backlog_retry_after_seconds = 5
unavailable_retry_after_seconds = 2
unmatched = "deny"

[quotas.requests]
kind = "rate"
limit = 5
window_seconds = 60

[quotas.concurrent]
kind = "concurrency"
limit = 2

[quotas.tiny]
kind = "rate"
limit = 1
window_seconds = 3600

[[routes]]
name = "charged"
method = "GET"
path = "/charged"
cost = 10
quotas = ["requests", "concurrent"]

[[routes]]
name = "slow"
method = "GET"
path = "/slow"
cost = 10
quotas = ["concurrent"]

[[routes]]
name = "free"
method = "GET"
path = "/free"
quotas = ["requests"]

[[routes]]
name = "reported"
method = "POST"
path = "/reported"
cost = 100
commit = "reported"

[[routes]]
name = "overage"
method = "POST"
path = "/overage"
cost = 10
commit = "overage"

[[routes]]
name = "boom"
method = "GET"
path = "/boom"
cost = 10

[[routes]]
name = "status"
method = "GET"
path = "/status/{code}"
cost = 10

[[routes]]
name = "charge-on-error"
method = "GET"
path = "/sticky/{code}"
cost = 10
release_on_error = false

[[routes]]
name = "shadow"
method = "GET"
path = "/shadow"
cost = 10
quotas = ["tiny"]
shadow = true

[[routes]]
name = "stream-release"
method = "GET"
path = "/stream/release"
cost = 10
on_disconnect = "release"

[[routes]]
name = "stream-commit"
method = "GET"
path = "/stream/commit"
cost = 10
on_disconnect = "commit"

[[routes]]
name = "sub"
method = "GET"
path = "/api/**"
cost = 10
"""


RouteTable = Sequence[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]


@dataclass
class Gateway:
    client: TestClient[web.Request, web.Application]
    state: GatewayState
    registry: CollectorRegistry

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    async def settle_everything(self, deadline_s: float = 10.0) -> None:
        """Every commit/release reached Redis and a flusher settled it with the authority:
        each outbox group has nothing undelivered (lag) and nothing unacknowledged (pending)."""
        await self.state.wait_settled(deadline_s)
        assert not self.state.settling
        redis = self.state.redis
        shards = self.state.policy.settings.shards
        async with asyncio.timeout(deadline_s):
            while True:
                busy = 0
                for shard in range(shards):
                    busy += await _unsettled(redis, keys.outbox(shard))
                if not busy:
                    return
                await asyncio.sleep(0.01)  # polling a condition with a deadline


async def _unsettled(redis: Any, outbox: str) -> int:
    """Entries of one outbox its consumer group has not acknowledged (or not read yet)."""
    try:
        groups = await redis.xinfo_groups(outbox)
    except ResponseError as err:
        if "no such key" not in str(err):
            raise
        # Nothing was written to this shard, and no flusher has created its group yet (one
        # that met a Redis error at start creates it on its next round).
        return 0
    for group in groups:
        if _text(group["name"]) == keys.OUTBOX_GROUP:
            return int(group["pending"]) + int(group.get("lag") or 0)
    return int(await redis.xlen(outbox))  # no group yet: nothing of it was read


# The same policy with one Redis script call per request (hold mode).
GATEWAY_POLICY_HOLD = GATEWAY_POLICY.replace('admission = "lease"', 'admission = "hold"', 1)


async def credits_in_flight(state: GatewayState, project: str) -> dict[str, int]:
    """{"held": credits held by requests not ended, "uns": committed, not yet settled}.

    Hold mode: the wallet hash's own fields. Lease mode: Redis's `held` counts the whole lease
    block, so what requests hold is the process's lease (`inflight`); `uns` is Redis's.
    """
    shard = keys.shard_of(project, state.policy.settings.shards)
    raw = await state.redis.hgetall(keys.wallet(shard, project))
    out = {k.decode(): int(v) for k, v in raw.items() if k.decode() in ("held", "uns")}
    if state.leases is not None:
        out["held"] = sum(x.inflight for x in state.leases.leases if x.project_id == project)
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class GatewayFactory(Protocol):
    async def __call__(
        self,
        routes: RouteTable,
        *,
        policy_text: str = ...,
        sub_app: str | None = ...,
        redis_url: str | None = ...,
        server_kwargs: dict[str, Any] | None = ...,
        static: dict[str, Any] | None = ...,
        **config: Any,
    ) -> Gateway: ...


class ProjectFactory(Protocol):
    async def __call__(
        self,
        balance: int = ...,
        *,
        low_balance_threshold: int = ...,
        grace_period_seconds: int = ...,
    ) -> tuple[str, str]: ...


@pytest.fixture
def gateway_redis() -> Iterator[RedisProcess]:
    """A Redis per gateway test: outbox streams are per shard, not per project, so a flusher
    of another test would otherwise read (and settle elsewhere) this test's events."""
    proc = start_redis()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def gateway_factory(
    authority: AuthorityServer, gateway_redis: RedisProcess, aiohttp_client: Any
) -> GatewayFactory:
    # Argument order matters: the client (and the app's shutdown) is torn down before the
    # authority and Redis it talks to.
    async def make(
        routes: RouteTable,
        *,
        policy_text: str = GATEWAY_POLICY,
        sub_app: str | None = None,
        redis_url: str | None = None,
        server_kwargs: dict[str, Any] | None = None,
        static: dict[str, Any] | None = None,
        **config: Any,
    ) -> Gateway:
        registry = CollectorRegistry()
        cfg = GatewayConfig(
            policy=parse_policy(policy_text, "test-policy.toml"),
            redis_url=redis_url or gateway_redis.url,
            authority_target=authority.grpc_target,
            authority_token=authority.config.admin_token,
            gateway_id=f"test-gw-{uuid.uuid4().hex[:8]}",
            sweep_interval_seconds=0.2,
            registry=registry,
            **config,
        )
        app = web.Application()
        target = app
        if sub_app is not None:
            target = web.Application()
        for method, path, handler in routes:
            target.router.add_route(method, path, handler)
        if static is not None:
            target.router.add_static(**static)
        state = setup(target, cfg)
        if sub_app is not None:
            app.add_subapp(sub_app, target)
        client = await aiohttp_client(app, server_kwargs=server_kwargs)
        return Gateway(client, state, registry)

    return make


@pytest.fixture
def project_factory(
    authority: AuthorityServer, authority_stub: pb_grpc.CreditServiceAsyncStub
) -> ProjectFactory:
    token = authority.config.admin_token

    async def make(
        balance: int = 1000, *, low_balance_threshold: int = 0, grace_period_seconds: int = 0
    ) -> tuple[str, str]:
        wallet = await make_wallet(
            authority_stub,
            token,
            balance=balance,
            low_balance_threshold=low_balance_threshold,
            grace_period_seconds=grace_period_seconds,
        )
        issued = await authority_stub.IssueApiKey(
            pb.IssueApiKeyRequest(
                request_id=f"key-{wallet.project_id}",
                project_id=wallet.project_id,
                name="test",
            ),
            metadata=admin_md(token),
            timeout=10,
        )
        return wallet.project_id, issued.secret

    return make


async def usage_sum(
    stub: pb_grpc.CreditServiceAsyncStub, token: str, project_id: str
) -> tuple[int, int]:
    """(sum of USAGE amounts charged, requests charged) in the project's ledger.

    Requests are the entries' quantities: a hold-mode entry is one request, a lease-mode entry
    aggregates the commits of one route+meter between two lease syncs."""
    total = entries = 0
    page = ""
    while True:
        resp = await stub.ListTransactions(
            pb.ListTransactionsRequest(project_id=project_id, page_size=1000, page_token=page),
            metadata=admin_md(token),
            timeout=10,
        )
        for e in resp.entries:
            if e.kind == pb.USAGE:
                total += -e.amount
                entries += e.quantity
        page = resp.next_page_token
        if not page:
            return total, entries


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """Another Redis only this test uses (so the test may stop it)."""
    proc = start_redis()
    try:
        yield proc
    finally:
        proc.stop()


async def leave_mid_request(
    port: int, path: str, secret: str, entered: asyncio.Event, *, body_sent: str | None = None
) -> None:
    """A client that sends GET `path` with its API key, waits until the handler has started
    (`entered`), then closes the connection. `body_sent`: announce a 10-byte body and send
    only this much of it, so that the handler's read of the body fails once the client goes."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
    if body_sent is not None:
        head += f"Content-Length: 10\r\n\r\n{body_sent}"
    else:
        head += "\r\n"
    writer.write(head.encode())
    await writer.drain()
    async with asyncio.timeout(10):
        await entered.wait()
    writer.close()
    await writer.wait_closed()
