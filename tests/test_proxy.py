"""The standalone gateway: a streaming reverse proxy with the plugin, real Redis + authority."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from yarl import URL

from admission import keys
from admission.policy import parse_policy
from creditservice.server import AuthorityServer
from gateway_plugin.config import GatewayConfig
from gateway_plugin.plugin import GATEWAY_KEY
from gateway_plugin.proxy import (
    AmbiguousPath,
    ProxyConfig,
    build_gateway_app,
    canonical_url,
    downstream_response_headers,
    upstream_request_headers,
    upstream_url,
)
from tests.fixtures_gateway import ProjectFactory, bearer, credits_in_flight, usage_sum
from tests.services import eventually, free_port

COST = 5
POLICY = f"""
[settings]
shards = 4
unmatched = "deny"

[quotas.concurrent]
kind = "concurrency"
limit = 50

[[routes]]
name = "api"
method = "*"
path = "/v1/**"
cost = {COST}
quotas = ["concurrent"]

[[routes]]
name = "open"
method = "GET"
path = "/open"
"""

CHUNK = 64 * 1024
CHUNKS = 64  # 4 MiB each way


# ---------------------------------------------------------------- pure header rules


def test_hop_by_hop_and_credentials_are_not_forwarded() -> None:
    headers = CIMultiDict(
        [
            ("Host", "gw.example"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic abc"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Sum"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Authorization", "Bearer cg_" + "a" * 43),
            ("X-Api-Key", "cg_" + "b" * 43),
            ("X-Creditgate-Project", "someone-else"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Accept", "application/json"),
            ("X-Custom", "1"),
            ("X-Custom", "2"),
        ]
    )
    out = upstream_request_headers(
        headers, peer="10.0.0.9", scheme="http", host="gw.example", project_id="p1"
    )
    for gone in (
        "Host",
        "Connection",
        "X-Hop",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Authorization",
        "X-Api-Key",
    ):
        assert gone not in out, gone
    assert out["X-Creditgate-Project"] == "p1"
    assert out["X-Forwarded-For"] == "10.0.0.9"  # the client's own claim is not trusted
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Forwarded-Host"] == "gw.example"
    assert out["Accept"] == "application/json"
    assert out.getall("X-Custom") == ["1", "2"]

    trusted = upstream_request_headers(
        headers, peer="10.0.0.9", scheme="http", host="gw", project_id=None, trust_forwarded=True
    )
    assert trusted["X-Forwarded-For"] == "6.6.6.6, 10.0.0.9"
    assert "X-Creditgate-Project" not in trusted


def test_other_authorization_schemes_pass_through() -> None:
    out = upstream_request_headers(
        {"Authorization": "Basic dXNlcjpwdw=="},
        peer=None,
        scheme="https",
        host=None,
        project_id=None,
    )
    assert out["Authorization"] == "Basic dXNlcjpwdw=="
    assert "X-Forwarded-For" not in out


def test_response_hop_by_hop_removed() -> None:
    out = downstream_response_headers(
        CIMultiDict(
            [
                ("Connection", "close, X-Private"),
                ("X-Private", "1"),
                ("Keep-Alive", "x"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Type", "text/plain"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ]
        )
    )
    assert list(out.items()) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def test_upstream_url_keeps_prefix_and_raw_target() -> None:
    assert str(upstream_url("http://u:1/base/", "/v1/a%2Fb?x=1&y=%20")) == (
        "http://u:1/base/v1/a%2Fb?x=1&y=%20"
    )


@pytest.mark.parametrize(
    ("target", "canonical"),
    [
        ("/v1/x?q=1", "/v1/x?q=1"),
        ("/", "/"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a%20b/%C3%A9?q=a%2Fb", "/a%20b/%C3%A9?q=a%2Fb"),  # only the path is looked at
        ("/open/%2E%2E/v1/x", "/v1/x"),
        ("/open/.%2e/v1/x?q=%2F", "/v1/x?q=%2F"),
        ("/v1//x", "/v1/x"),
        ("/v1/x/%2E/y/", "/v1/x/y/"),
        ("/v1/x/%2e%2E", "/v1/"),
        ("/v1/x/%2E", "/v1/x/"),
        ("/%2E%2E/%2E%2E/v1/x", "/v1/x"),
        ("/v1/x%252Fy", "/v1/x%252Fy"),  # an encoded "%": data, not a separator
    ],
)
def test_canonical_url_resolves_what_upstreams_resolve(target: str, canonical: str) -> None:
    url = URL(target, encoded=True)
    got = canonical_url(url)
    assert str(got) == canonical
    assert (got is url) == (target == canonical)
    assert canonical_url(url, "keep") == got


@pytest.mark.parametrize(
    "target", ["/v1/a%2Fb", "/v1/a%2fb", "/v1/a%5Cb", "/v1/a\\b", "/v1/..%2Fx"]
)
def test_canonical_url_refuses_an_encoded_separator_unless_kept(target: str) -> None:
    url = URL(target, encoded=True)
    with pytest.raises(AmbiguousPath, match="encoded '/' or a backslash"):
        canonical_url(url)
    assert canonical_url(url, "keep") is url  # one segment, forwarded as sent


@pytest.mark.parametrize("target", ["/open/..;/v1/x", "/open/%2e%2E;jsessionid=1/v1/x", "/a/.;x"])
def test_canonical_url_refuses_a_dot_segment_with_parameters(target: str) -> None:
    """Servlet containers drop ";params" and then resolve: "/open/..;/v1/x" is /v1/x there."""
    for mode in ("reject", "keep"):
        with pytest.raises(AmbiguousPath, match="dot segment with ';' parameters"):
            canonical_url(URL(target, encoded=True), mode)  # type: ignore[arg-type]
    assert canonical_url(URL("/a/b;v=1/c", encoded=True)) == URL("/a/b;v=1/c", encoded=True)


# ---------------------------------------------------------------- the proxy, end to end


class Upstream:
    """A real aiohttp upstream whose handlers record what reached them."""

    def __init__(self) -> None:
        self.seen_headers: list[CIMultiDict[str]] = []
        self.first_upload_chunk = asyncio.Event()
        self.client_got_first_chunk = asyncio.Event()
        self.never = asyncio.Event()
        self.hanging = asyncio.Event()
        self.targets: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/echo", self.echo)
        app.router.add_get("/open", self.echo)
        app.router.add_post("/v1/upload", self.upload)
        app.router.add_get("/v1/download", self.download)
        app.router.add_get("/v1/hang", self.hang)
        app.router.add_get("/v1/fail", self.fail)
        app.router.add_get("/v1/hop", self.hop)
        app.router.add_route("*", "/{tail:.*}", self.record)
        return app

    async def record(self, request: web.Request) -> web.Response:
        # The request target exactly as it arrived (aiohttp's raw_path is the target as sent).
        self.targets.append(request.raw_path)
        return web.Response(text="recorded")

    async def echo(self, request: web.Request) -> web.Response:
        self.seen_headers.append(CIMultiDict(request.headers))
        return web.json_response({"path": request.path_qs})

    async def upload(self, request: web.Request) -> web.Response:
        self.seen_headers.append(CIMultiDict(request.headers))
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            if not self.first_upload_chunk.is_set():
                self.first_upload_chunk.set()
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def download(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(b"\x01" * CHUNK)
        # The rest is written only once the client has the first chunk: a buffering proxy
        # would deadlock here, and the test's deadline would fail it.
        await asyncio.wait_for(self.client_got_first_chunk.wait(), 20)
        for _ in range(CHUNKS - 1):
            await response.write(b"\x01" * CHUNK)
        await response.write_eof()
        return response

    async def hang(self, request: web.Request) -> web.Response:
        self.hanging.set()
        await self.never.wait()
        return web.Response(text="never")

    async def fail(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "upstream broke"}, status=503)

    async def hop(self, request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={"Connection": "X-Private", "X-Private": "1", "X-Public": "2"},
        )


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[tuple[Upstream, TestServer]]:
    up = Upstream()
    server = await aiohttp_server(up.app())
    yield up, server
    up.never.set()


GatewayMaker = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_gateway(authority: AuthorityServer, redis_url: str, aiohttp_client: Any) -> GatewayMaker:
    # aiohttp_client after the authority: the gateway stops (draining its outbox) first.
    async def make(
        upstream_base: str, *, policy: str = POLICY, **proxy: Any
    ) -> TestClient[web.Request, web.Application]:
        cfg = GatewayConfig(
            policy=parse_policy(policy, "proxy-policy.toml"),
            redis_url=redis_url,
            authority_target=authority.grpc_target,
            authority_token=authority.config.admin_token,
            gateway_id=f"proxy-{uuid.uuid4().hex[:8]}",
            registry=CollectorRegistry(),
        )
        app = build_gateway_app(cfg, ProxyConfig(upstream=upstream_base, **proxy))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        return client

    return make


async def settle(client: TestClient[web.Request, web.Application]) -> None:
    state = client.app[GATEWAY_KEY]
    await state.wait_settled(10)
    assert state.flusher is not None
    await state.flusher.drain(10)


async def wait_usage(
    stub: Any, token: str, project: str, expected: tuple[int, int], deadline_s: float = 15.0
) -> None:
    """Poll the authority's ledger until it shows `expected` (sum, entries), with a deadline.

    The flusher's run loop may hold a batch in flight while drain() runs, so drain() alone is
    not proof that everything reached the authority.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        got = await usage_sum(stub, token, project)
        if got == expected or loop.time() > end:
            assert got == expected
            return
        await asyncio.sleep(0.02)  # polling the ledger with a deadline


def wallet_key(project: str) -> str:
    return keys.wallet(keys.shard_of(project, 4), project)


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


PROBLEM = "application/problem+json"


async def gateway_problem(
    resp: aiohttp.ClientResponse, status: int, slug: str, instance: str
) -> dict[str, Any]:
    """A problem the proxy answered itself: the members and media type of the plugin's denials
    (tests/test_plugin.py `problem`), `instance` the path as the client sent it."""
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == PROBLEM  # exactly: no charset parameter
    body: dict[str, Any] = await resp.json(content_type=PROBLEM)
    assert set(body) == {"type", "title", "status", "detail", "instance"}
    assert body["type"] == f"urn:creditgate:problem:{slug}"
    assert body["status"] == status
    assert body["instance"] == instance
    assert body["title"] and body["detail"]
    return body


async def test_streaming_both_ways_and_ledger(
    upstream: tuple[Upstream, TestServer],
    make_gateway: GatewayMaker,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: Any,
) -> None:
    up, server = upstream
    client = await make_gateway(base_url(server))
    project, secret = await project_factory(1000)

    # Upload: the second half is sent only after the upstream saw the first chunk.
    payload = [bytes([i % 251]) * CHUNK for i in range(CHUNKS)]

    async def body() -> AsyncIterator[bytes]:
        yield payload[0]
        await asyncio.wait_for(up.first_upload_chunk.wait(), 20)
        for part in payload[1:]:
            yield part

    async with client.post("/v1/upload", data=body(), headers=bearer(secret)) as r:
        assert r.status == 200, await r.text()
        got = await r.json()
    assert got == {"size": CHUNK * CHUNKS, "sha256": hashlib.sha256(b"".join(payload)).hexdigest()}
    assert up.seen_headers[-1]["Transfer-Encoding"] == "chunked"

    fixed = bytes(range(256)) * 1024
    async with client.post("/v1/upload", data=fixed, headers=bearer(secret)) as r:
        assert r.status == 200
        assert await r.json() == {"size": len(fixed), "sha256": hashlib.sha256(fixed).hexdigest()}
    assert up.seen_headers[-1]["Content-Length"] == str(len(fixed))

    async with client.get("/v1/download", headers=bearer(secret)) as r:
        assert r.status == 200
        assert r.headers.get("Transfer-Encoding") == "chunked"
        first = await r.content.readexactly(CHUNK)
        up.client_got_first_chunk.set()
        rest = await r.content.read()
    assert len(first) + len(rest) == CHUNK * CHUNKS

    async with client.get("/v1/fail", headers=bearer(secret)) as r:
        assert r.status == 503
        assert await r.json() == {"error": "upstream broke"}

    await settle(client)
    # The 503 released its hold: only the two uploads and the download are charged.
    await wait_usage(authority_stub, authority.config.admin_token, project, (3 * COST, 3))


PASS_POLICY = POLICY.replace('unmatched = "deny"', 'unmatched = "pass"')
ALTERED_TARGETS = [
    ("/open/%2E%2E/v1/echo", "/v1/echo"),
    ("/open/.%2e/v1/x?q=a%2Fb", "/v1/x?q=a%2Fb"),
    ("/v1//x", "/v1/x"),
    ("/v1/x/%2E/y", "/v1/x/y"),
]


async def test_what_is_forwarded_is_what_was_metered(
    upstream: tuple[Upstream, TestServer],
    make_gateway: GatewayMaker,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: Any,
) -> None:
    """A path an upstream would resolve to a metered route is metered as that route.

    Before, /open/%2E%2E/v1/echo matched no policy route (the policy saw "/open/../v1/echo")
    and, with `unmatched = "pass"`, reached the upstream unmetered, which resolves it to
    /v1/echo as most servers do. Now the gateway resolves it, meters it and forwards that.
    """
    up, server = upstream
    client = await make_gateway(base_url(server), policy=PASS_POLICY)
    project, secret = await project_factory(1000)
    for target, _ in ALTERED_TARGETS:
        resp = await client.get(URL(target, encoded=True))
        assert resp.status == 401, (target, await resp.text())
    # `method = "*"` is every method token, as the proxy's own "*" route takes them.
    assert (await client.request("M-SEARCH", "/v1/echo")).status == 401
    assert up.targets == [] and up.seen_headers == []
    for target, _ in ALTERED_TARGETS:
        resp = await client.get(URL(target, encoded=True), headers=bearer(secret))
        assert resp.status == 200, (target, await resp.text())
    assert up.targets == [f for t, f in ALTERED_TARGETS if f != "/v1/echo"]
    assert len(up.seen_headers) == 1  # /v1/echo
    await settle(client)
    await wait_usage(authority_stub, authority.config.admin_token, project, (4 * COST, 4))


async def test_an_encoded_slash_is_refused_or_kept_as_configured(
    upstream: tuple[Upstream, TestServer],
    make_gateway: GatewayMaker,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: Any,
) -> None:
    up, server = upstream
    _, secret = await project_factory(1000)
    strict = await make_gateway(base_url(server), policy=PASS_POLICY)
    for target in ("/v1/a%2Fb", "/open%2F..%2Fv1%2Fx", "/v1/a%5Cb", "/v1/chat/a\\b"):
        resp = await strict.get(URL(target, encoded=True), headers=bearer(secret))
        body = await gateway_problem(resp, 400, "invalid-request", target)
        assert "encoded '/'" in body["detail"]
        # The path reads as sent once the JSON is decoded: one backslash, not a repr's two.
        assert f"the path {target} has" in body["detail"]
    resp = await strict.get(URL("/open/..;x/v1/x", encoded=True), headers=bearer(secret))
    body = await gateway_problem(resp, 400, "invalid-request", "/open/..;x/v1/x")
    assert body["detail"] == "the path /open/..;x/v1/x has a dot segment with ';' parameters"
    assert up.targets == []
    # The plugin's own denial on the same gateway: the same members, the same media type.
    resp = await strict.get("/v1/x")
    denial = await gateway_problem(resp, 401, "missing-credential", "/v1/x")
    assert set(denial) == set(body)
    # A path the gateway made canonical: the denial names the path as the client sent it.
    resp = await strict.get(URL("/v1//x", encoded=True))
    await gateway_problem(resp, 401, "missing-credential", "/v1//x")

    project, secret = await project_factory(1000)
    keeping = await make_gateway(base_url(server), policy=PASS_POLICY, encoded_slashes="keep")
    resp = await keeping.get(URL("/v1/a%2Fb", encoded=True), headers=bearer(secret))
    assert resp.status == 200
    assert up.targets == ["/v1/a%2Fb"]
    await settle(keeping)
    await wait_usage(authority_stub, authority.config.admin_token, project, (COST, 1))


async def test_an_absolute_form_target_is_forwarded_as_its_path(
    upstream: tuple[Upstream, TestServer],
    make_gateway: GatewayMaker,
    project_factory: ProjectFactory,
) -> None:
    """ "GET http://x/v1/echo" is metered as /v1/echo, and /v1/echo is what goes upstream.

    The raw target used to be appended to the upstream base: "http://u:1" + "http://x/..."
    failed (500), a base with a path prefix sent "/apihttp://x/v1/echo", and one without a
    port let the client choose the rest of the upstream's host name.
    """
    up, server = upstream
    client = await make_gateway(base_url(server) + "/api", policy=PASS_POLICY)
    _, secret = await project_factory(1000)
    assert client.server.port is not None
    for target, forwarded in (
        ("http://x/v1/echo?a=1", "/api/v1/echo?a=1"),
        ("http://x/v1//echo", "/api/v1/echo"),
        ("evil://x/v1/other", "/api/v1/other"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        reply = await reader.read()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
        assert up.targets[-1] == forwarded


async def test_headers_forwarded_and_credential_kept_at_the_gateway(
    upstream: tuple[Upstream, TestServer],
    make_gateway: GatewayMaker,
    project_factory: ProjectFactory,
) -> None:
    up, server = upstream
    client = await make_gateway(base_url(server))
    project, secret = await project_factory(1000)
    headers = {
        **bearer(secret),
        "X-Creditgate-Project": "not-me",
        "Connection": "X-Drop-Me",
        "X-Drop-Me": "1",
        "X-Keep": "yes",
    }
    async with client.get("/v1/echo?q=a%20b", headers=headers) as r:
        assert r.status == 200
        assert await r.json() == {"path": "/v1/echo?q=a%20b"}
        assert "RateLimit-Policy" in r.headers  # the plugin's headers reach the client
    seen = up.seen_headers[-1]
    assert seen["X-Creditgate-Project"] == project
    assert "Authorization" not in seen
    assert "X-Api-Key" not in seen
    assert "X-Drop-Me" not in seen
    assert seen["X-Keep"] == "yes"
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"].startswith("127.0.0.1:")

    async with client.get("/v1/echo", headers={"X-Api-Key": secret}) as r:
        assert r.status == 200
    seen = up.seen_headers[-1]
    assert "X-Api-Key" not in seen
    assert seen["X-Creditgate-Project"] == project

    async with client.get("/v1/hop", headers=bearer(secret)) as r:
        assert r.status == 200
        assert r.headers["X-Public"] == "2"
        assert "X-Private" not in r.headers

    # A free route: the project named upstream is still the resolved one, never the client's.
    async with client.get("/open", headers={**bearer(secret), "X-Creditgate-Project": "x"}) as r:
        assert r.status == 200
    assert up.seen_headers[-1].getall("X-Creditgate-Project") == [project]


async def test_upstream_down_is_502_and_released(
    make_gateway: GatewayMaker,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: Any,
) -> None:
    client = await make_gateway(f"http://127.0.0.1:{free_port()}", connect_timeout=2)
    project, secret = await project_factory(1000)
    async with client.get("/v1/echo", headers=bearer(secret)) as r:
        problem = await gateway_problem(r, 502, "upstream-unreachable", "/v1/echo")
    assert problem["detail"] == "the upstream is unreachable"
    assert "RateLimit" in r.headers and "RateLimit-Policy" in r.headers
    async with client.get("/v1/open-but-unreachable", headers=bearer(secret)) as r:
        assert r.status == 502
    # A path made canonical: the plugin admitted a clone of the request, and aiohttp prepares
    # the unprepared 502 with the original one, which must carry the admission too.
    async with client.get(URL("/v1//echo", encoded=True), headers=bearer(secret)) as r:
        await gateway_problem(r, 502, "upstream-unreachable", "/v1//echo")  # as sent
        assert "RateLimit" in r.headers and "RateLimit-Policy" in r.headers
    await settle(client)
    wallet = await credits_in_flight(client.app[GATEWAY_KEY], project)
    assert wallet == {"held": 0, "uns": 0}  # both holds released
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (0, 0)


async def test_upstream_timeout_is_504_and_released(
    upstream: tuple[Upstream, TestServer],
    make_gateway: GatewayMaker,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: Any,
) -> None:
    up, server = upstream
    client = await make_gateway(base_url(server), read_timeout=0.3)
    project, secret = await project_factory(1000)
    async with client.get("/v1/hang?q=1", headers=bearer(secret)) as r:
        problem = await gateway_problem(r, 504, "upstream-timeout", "/v1/hang")
    assert up.hanging.is_set()
    assert problem["detail"] == "the upstream did not answer within 0.3s"
    async with client.get("/v1/echo", headers=bearer(secret)) as r:
        assert r.status == 200
    await settle(client)
    # Only the request that got an answer is charged; the timed-out one was released.
    await wait_usage(authority_stub, authority.config.admin_token, project, (COST, 1))


# ---------------------------------------------------------------- creditgate gateway serve


class ServeProcess:
    """`creditgate gateway serve` as a child process, its output in files."""

    def __init__(self, proc: asyncio.subprocess.Process, out: Path, err: Path) -> None:
        self.proc, self.out, self.err = proc, out, err

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    async def worker_pids(self, workers: int) -> set[int]:
        """Each worker prints its banner (with its pid) once it listens."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            assert self.proc.returncode is None, self.output()
            found = re.findall(rb"creditgate gateway pid (\d+) on ", self.out.read_bytes())
            if len(found) >= workers:
                return {int(pid) for pid in found}
            assert loop.time() < deadline, self.output()
            await asyncio.sleep(0.02)  # polling the banner file with a deadline


@contextlib.asynccontextmanager
async def serve_process(
    tmp_path: Path,
    workers: int,
    upstream_url_: str,
    redis_url: str,
    authority: AuthorityServer,
    port: int,
    stderr: int | None = None,
    shutdown_timeout: float = 5,
) -> AsyncIterator[ServeProcess]:
    """`stderr`: a descriptor for the processes' stderr instead of a file (then not read). The
    supervisor makes its metrics directory in tmp_path / "tmp" (TMPDIR)."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY, encoding="utf-8")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # Files, not pipes: workers inherit the descriptors, and a pipe would outlive the parent.
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("wb") as out_file, err_path.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway_plugin.cli",
            "gateway",
            "serve",
            "--workers",
            str(workers),
            "--policy",
            str(policy),
            "--upstream",
            upstream_url_,
            "--listen",
            f"127.0.0.1:{port}",
            "--redis",
            redis_url,
            "--authority",
            authority.grpc_target,
            "--token",
            authority.config.admin_token,
            "--shutdown-timeout",
            str(shutdown_timeout),
            stdout=out_file,
            stderr=err_file if stderr is None else stderr,
            env=env,
        )
        try:
            yield ServeProcess(proc, out_path, err_path)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _running(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_serve_options_carry_the_encoded_slashes_choice(tmp_path: Path) -> None:
    from gateway_plugin.cli import build_parser
    from gateway_plugin.commands import ServeOptions, _build_app
    from gateway_plugin.proxy import PROXY_CONFIG

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    base = ["gateway", "serve", "--policy", str(policy), "--upstream", "http://127.0.0.1:9"]
    parser = build_parser()
    assert parser.parse_args(base).encoded_slashes == "reject"
    assert parser.parse_args([*base, "--encoded-slashes", "keep"]).encoded_slashes == "keep"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--encoded-slashes", "decode"])
    app = _build_app(
        ServeOptions(policy=str(policy), upstream="http://127.0.0.1:9", encoded_slashes="keep")
    )
    assert app[PROXY_CONFIG].encoded_slashes == "keep"


def _admitted_by(metrics_root: Path, pid: int) -> float:
    """The admissions one gateway worker counted, from its own prometheus multiprocess files
    (`<kind>_<pid>.db`, in the directory the supervisor made under TMPDIR)."""
    import shutil
    import tempfile

    from prometheus_client.multiprocess import MultiProcessCollector

    files = list(metrics_root.rglob(f"*_{pid}.db"))
    assert files, f"no metrics files of worker {pid} under {metrics_root}"
    with tempfile.TemporaryDirectory() as one:
        for f in files:
            shutil.copy(f, one)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=one)
        labels = {"outcome": "admitted", "reason": "admitted"}
        return registry.get_sample_value("creditgate_decisions_total", labels) or 0.0


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_command_smoke(
    workers: int,
    tmp_path: Path,
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    authority: AuthorityServer,
    authority_stub: Any,
    project_factory: ProjectFactory,
) -> None:
    _, server = upstream
    project, secret = await project_factory(1000)
    port = free_port()
    loop = asyncio.get_running_loop()
    async with serve_process(
        tmp_path, workers, base_url(server), redis_url, authority, port
    ) as serving:
        proc = serving.proc
        pids = await serving.worker_pids(workers)
        requests = 12 * workers  # all of them on one of two workers: 1 in 8 million
        # A fresh connection per request lets the kernel spread them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for i in range(requests):
                async with http.get(
                    f"http://127.0.0.1:{port}/v1/echo?i={i}", headers=bearer(secret)
                ) as r:
                    assert r.status == 200, await r.text()
            # The served gateway makes paths canonical before admission (default: reject %2F).
            async with http.get(
                URL(f"http://127.0.0.1:{port}/v1/a%2Fb", encoded=True), headers=bearer(secret)
            ) as r:
                assert r.status == 400, await r.text()
            # /metrics merges every worker's counts; a worker that is not the one scraped
            # folds its per-request counts into the shared files once a second.
            deadline = loop.time() + 10
            while True:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.status == 200
                    metrics = await r.text()
                admitted = [
                    line
                    for line in metrics.splitlines()
                    if line.startswith("creditgate_decisions_total{")
                    and 'outcome="admitted"' in line
                ]
                total = sum(float(line.rsplit(" ", 1)[1]) for line in admitted)
                assert total <= requests, admitted
                if total == requests or loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)  # polling the other worker's fold, with a deadline
        assert total == requests, admitted
        if workers > 1:
            # Every worker served some: each one's own counts (its multiprocess files).
            served = {pid: _admitted_by(tmp_path / "tmp", pid) for pid in pids}
            assert sum(served.values()) == requests and all(served.values()), served
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 45)
        except TimeoutError:
            raise AssertionError(f"no clean exit on SIGTERM: {serving.output()}") from None
        assert proc.returncode == 0, serving.output()
    # The workers' cleanups drained their outboxes into the authority before exiting.
    token = authority.config.admin_token
    await wait_usage(authority_stub, token, project, (requests * COST, requests), 5)


@pytest.mark.parametrize("stderr", ["file", "dead-pipe"])
async def test_workers_stop_when_the_supervisor_is_killed(
    stderr: str,
    tmp_path: Path,
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    authority: AuthorityServer,
    authority_stub: Any,
    project_factory: ProjectFactory,
) -> None:
    """SIGKILL leaves the supervisor no chance to forward anything: the workers notice on their
    own, drain and flush as on SIGTERM, and exit instead of serving (or retrying) forever. Also
    when their stderr is a pipe whose reader died too (`serve ... 2>&1 | logger`, all killed):
    writing to it fails, and that must not keep a worker from stopping."""
    _, server = upstream
    project, secret = await project_factory(1000)
    port = free_port()
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe() if stderr == "dead-pipe" else (-1, -1)
    try:
        async with serve_process(
            tmp_path,
            2,
            base_url(server),
            redis_url,
            authority,
            port,
            stderr=write_end if write_end >= 0 else None,
        ) as serving:
            pids = await serving.worker_pids(2)
            url = f"http://127.0.0.1:{port}/v1/echo"
            async with aiohttp.ClientSession() as http, http.get(url, headers=bearer(secret)) as r:
                assert r.status == 200, await r.text()
            if read_end >= 0:
                os.close(read_end)
                read_end = -1
            serving.proc.kill()
            await serving.proc.wait()
            deadline = loop.time() + 30
            while any(_running(pid) for pid in pids):
                if loop.time() > deadline:
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    raise AssertionError(f"workers outlived their supervisor: {serving.output()}")
                await asyncio.sleep(0.05)  # polling the workers' exit, with a deadline
            if stderr == "file":
                assert "supervisor gone, stopping" in serving.output()
            # The supervisor could not remove its metrics directory: the last worker did.
            assert not list((tmp_path / "tmp").glob("creditgate-prom-*"))
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    # The committed request reached the ledger: the workers' cleanup flushed their outboxes.
    await wait_usage(authority_stub, authority.config.admin_token, project, (COST, 1), 5)


async def test_shutdown_timeout_bounds_a_hung_request(
    tmp_path: Path,
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    authority: AuthorityServer,
    authority_stub: Any,
    project_factory: ProjectFactory,
) -> None:
    """`--shutdown-timeout T`: a request still running at SIGTERM gets T in all, then it is
    cut off (aiohttp's own two waits of T each would give it 2T) and its hold released."""
    up, server = upstream
    project, secret = await project_factory(1000)
    port = free_port()
    timeout = 1.0
    loop = asyncio.get_running_loop()
    async with (
        serve_process(
            tmp_path, 1, base_url(server), redis_url, authority, port, shutdown_timeout=timeout
        ) as serving,
        aiohttp.ClientSession() as http,
    ):
        await serving.worker_pids(1)

        async def hung_request() -> float:
            with pytest.raises(aiohttp.ClientError):
                url = f"http://127.0.0.1:{port}/v1/hang"
                async with http.get(url, headers=bearer(secret)) as r:
                    await r.read()
            return loop.time()

        request = asyncio.create_task(hung_request())
        async with asyncio.timeout(10):
            await up.hanging.wait()
        signalled = loop.time()
        serving.proc.send_signal(signal.SIGTERM)
        cut_off = await asyncio.wait_for(request, 10) - signalled
        # Generous bounds on both sides: the point is T, not 2T.
        assert timeout * 0.9 <= cut_off < timeout * 1.9, cut_off
        assert await asyncio.wait_for(serving.proc.wait(), 30) == 0, serving.output()
    # Cut off mid-request: the route's on_disconnect policy (release) applies, nothing charged.
    await wait_usage(authority_stub, authority.config.admin_token, project, (0, 0), 5)


async def _refused(port: int) -> bool:
    """True once nothing accepts connections on `port` (refused, or reset as it closes)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_sigterm_drains_a_request_in_flight_and_settles_it(
    tmp_path: Path,
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    authority: AuthorityServer,
    authority_stub: Any,
    project_factory: ProjectFactory,
) -> None:
    """SIGTERM while a request waits on the upstream: the gateway stops taking connections,
    lets the request finish (within --shutdown-timeout), answers it, settles its commit with
    the authority, and exits 0."""
    up, server = upstream
    project, secret = await project_factory(1000)
    port = free_port()
    async with (
        serve_process(
            tmp_path, 1, base_url(server), redis_url, authority, port, shutdown_timeout=20
        ) as serving,
        aiohttp.ClientSession() as http,
    ):
        await serving.worker_pids(1)

        async def in_flight() -> tuple[int, str]:
            url = f"http://127.0.0.1:{port}/v1/hang"
            async with http.get(url, headers=bearer(secret)) as r:
                return r.status, await r.text()

        request = asyncio.create_task(in_flight())
        async with asyncio.timeout(10):
            await up.hanging.wait()
        serving.proc.send_signal(signal.SIGTERM)
        # Shutdown has begun once the gateway refuses new connections.
        await eventually(functools.partial(_refused, port), within_s=10, every_s=0.02)
        assert not request.done(), (request, serving.output())
        up.never.set()  # the upstream answers now
        assert await asyncio.wait_for(request, 10) == (200, "never")
        assert await asyncio.wait_for(serving.proc.wait(), 30) == 0, serving.output()
    await wait_usage(authority_stub, authority.config.admin_token, project, (COST, 1), 5)


async def test_a_worker_stopping_on_its_own_stops_the_gateway_with_a_failure(
    tmp_path: Path,
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    authority: AuthorityServer,
) -> None:
    """One worker ends (here: cleanly, on its own SIGTERM) while the gateway was not asked to
    stop: the supervisor stops the other one and exits 1, so a process manager restarts the
    whole gateway instead of leaving half of it serving."""
    _, server = upstream
    port = free_port()
    async with serve_process(tmp_path, 2, base_url(server), redis_url, authority, port) as serving:
        first, *_ = sorted(await serving.worker_pids(2))
        os.kill(first, signal.SIGTERM)
        assert await asyncio.wait_for(serving.proc.wait(), 45) == 1, serving.output()
        assert f"creditgate worker {first} exited with 0" in serving.output()
