"""Streaming responses and disconnects: when a hold ends, and that it always ends.

Disconnects are made with raw sockets so the test controls exactly when the client goes away;
every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import http_sfv
import pytest
from aiohttp import web

from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2_grpc as pb_grpc
from gateway_plugin import usage
from tests.fixtures_gateway import (
    GATEWAY_POLICY,
    GATEWAY_POLICY_HOLD,
    Gateway,
    GatewayFactory,
    ProjectFactory,
    credits_in_flight,
    leave_mid_request,
    usage_sum,
)


async def until(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    async with asyncio.timeout(deadline_s):
        # The conditions are states of aiohttp's transport: there is no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def wallet(gw: Gateway, project: str) -> dict[str, int]:
    return await credits_in_flight(gw.state, project)


@pytest.fixture(params=["lease", "hold"])
def gateway_factory(
    request: pytest.FixtureRequest, gateway_factory: GatewayFactory
) -> GatewayFactory:
    """Every test here runs in both admission modes: the HTTP semantics are the same."""
    text = GATEWAY_POLICY if request.param == "lease" else GATEWAY_POLICY_HOLD
    return functools.partial(gateway_factory, policy_text=text)  # type: ignore[return-value]


class Stream:
    """A handler that streams a first chunk, waits for the test, then streams the end."""

    def __init__(self, chunks: int = 3) -> None:
        self.chunks = chunks
        self.started = asyncio.Event()
        self.go_on = asyncio.Event()
        self.request: web.Request | None = None
        self.outcome: str | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.request = request
        resp = web.StreamResponse()
        resp.content_type = "text/plain"
        await resp.prepare(request)
        await resp.write(b"first\n")
        self.started.set()
        await self.go_on.wait()
        try:
            for _ in range(self.chunks):
                await resp.write(b"more\n")
                # Lets the loop see the peer's reset between writes.
                await asyncio.sleep(0)
            await resp.write_eof()
        except ConnectionResetError:
            self.outcome = "reset"
            raise
        self.outcome = "complete"
        return resp


async def raw_request(port: int, path: str, secret: str) -> tuple[Any, Any, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def test_streaming_response_commits_when_the_stream_ends(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    handler = Stream()
    gw = await gateway_factory([("GET", "/stream/commit", handler.handle)])
    project, secret = await project_factory(1000)
    resp = await gw.client.get("/stream/commit", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 200
    # The headers went out with the first byte, before the handler finished.
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert await resp.content.readline() == b"first\n"
    assert await wallet(gw, project) == {"held": 10, "uns": 0}
    assert gw.metric("creditgate_settlements_total", {"action": "commit", "result": "ok"}) == 0
    handler.go_on.set()
    assert await resp.read() == b"more\n" * 3
    await gw.settle_everything()
    assert handler.outcome == "complete"
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (10, 1)
    assert (await wallet(gw, project))["held"] == 0


async def test_streaming_headers_include_ratelimit(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"x")
        return resp

    gw = await gateway_factory([("GET", "/charged", stream)])
    _, secret = await project_factory(1000)
    resp = await gw.client.get("/charged", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 200
    parsed = http_sfv.List()
    parsed.parse(resp.headers["RateLimit"].encode())
    assert {str(i.value) for i in parsed} == {"requests", "concurrent"}
    assert await resp.read() == b"x"


async def _disconnect_mid_stream(gw: Gateway, handler: Stream, path: str, secret: str) -> None:
    assert gw.client.port is not None
    reader, writer, head = await raw_request(gw.client.port, path, secret)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"first" in await reader.readuntil(b"first\n")
    writer.close()
    await writer.wait_closed()
    # Writing is how the server learns the client is gone (a half-closed socket stays open).
    handler.go_on.set()
    await until(lambda: handler.outcome is not None)


async def test_disconnect_mid_stream_releases_when_route_says_release(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    handler = Stream(chunks=1_000_000)
    gw = await gateway_factory([("GET", "/stream/release", handler.handle)])
    project, secret = await project_factory(1000)
    await _disconnect_mid_stream(gw, handler, "/stream/release", secret)
    assert handler.outcome == "reset"
    await gw.settle_everything()
    assert gw.metric("creditgate_settlements_total", {"action": "release", "result": "ok"}) == 1
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (0, 0)
    assert await wallet(gw, project) == {"held": 0, "uns": 0}


async def test_disconnect_mid_stream_commits_when_route_says_commit(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    handler = Stream(chunks=1_000_000)
    gw = await gateway_factory([("GET", "/stream/commit", handler.handle)])
    project, secret = await project_factory(1000)
    await _disconnect_mid_stream(gw, handler, "/stream/commit", secret)
    assert handler.outcome == "reset"
    await gw.settle_everything()
    assert gw.metric("creditgate_settlements_total", {"action": "commit", "result": "ok"}) == 1
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (10, 1)


async def _cancelled_request(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory, path: str, report: int | None
) -> tuple[Gateway, str, asyncio.Event]:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def never_ends(request: web.Request) -> web.Response:
        if report is not None:
            usage(request).report(report)
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    gw = await gateway_factory(
        [("GET", path, never_ends)], server_kwargs={"handler_cancellation": True}
    )
    project, secret = await project_factory(1000)
    assert gw.client.port is not None
    await leave_mid_request(gw.client.port, path, secret, entered)
    async with asyncio.timeout(10):
        await cancelled.wait()
    return gw, project, cancelled


async def test_cancelled_request_task_still_commits(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    # on_disconnect = "commit" and the handler reported 7 before the client vanished: the
    # request task is cancelled, the commit runs in the plugin's own task and is not lost.
    gw, project, _ = await _cancelled_request(gateway_factory, project_factory, "/stream/commit", 7)
    await gw.settle_everything()
    assert gw.metric("creditgate_settlements_total", {"action": "commit", "result": "ok"}) == 1
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (7, 1)
    assert await wallet(gw, project) == {"held": 0, "uns": 0}


async def test_cancelled_request_task_releases_when_route_says_release(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    gw, project, _ = await _cancelled_request(
        gateway_factory, project_factory, "/stream/release", None
    )
    await gw.settle_everything()
    assert gw.metric("creditgate_settlements_total", {"action": "release", "result": "ok"}) == 1
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (0, 0)
    assert await wallet(gw, project) == {"held": 0, "uns": 0}
