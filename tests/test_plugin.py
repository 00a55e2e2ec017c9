"""The plugin end to end: real Redis, real authority, real engine and flusher, real aiohttp.

Each status the plugin can answer, its headers parsed as Structured Fields, its problem+json
body; usage reporting, error/5xx release, shadow mode, sub-apps, the LOW warning, and that the
authority's ledger holds exactly what the gateway committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import secrets
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import http_sfv
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from yarl import URL

from admission.decision import Decision, Reason
from admission.policy import parse_policy
from admission.store import Store
from creditservice.clock import ManualClock
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2_grpc as pb_grpc
from gateway_plugin import GATEWAY_KEY, GatewayConfig, UsageError, problems, setup, usage
from gateway_plugin.dashboard import DashboardConfig, setup_dashboard
from gateway_plugin.metrics import ProjectDecisions
from gateway_plugin.plugin import _fixed_route
from gateway_plugin.problems import REDIS_UNAVAILABLE_DETAIL
from tests.fixtures_gateway import (
    GATEWAY_POLICY,
    GATEWAY_POLICY_HOLD,
    GatewayFactory,
    ProjectFactory,
    bearer,
    leave_mid_request,
    usage_sum,
)
from tests.services import RedisCluster, RedisProcess

PROBLEM = "application/problem+json"


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def sf_list(value: str) -> dict[str, dict[str, Any]]:
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return {str(item.value): dict(item.params) for item in parsed}


def sf_dict(value: str) -> dict[str, Any]:
    parsed = http_sfv.Dictionary()
    parsed.parse(value.encode())
    return {k: v.value for k, v in parsed.items()}


async def problem(resp: ClientResponse, status: int, reason: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == PROBLEM
    body: dict[str, Any] = await resp.json(content_type=PROBLEM)
    assert body["type"] == f"urn:creditgate:problem:{reason}"
    assert body["status"] == status
    assert body["instance"] == resp.url.raw_path
    assert body["title"]
    assert body["detail"]
    return body


BASIC_ROUTES = [
    ("GET", "/charged", ok),
    ("GET", "/free", ok),
    ("GET", "/plain", ok),
]

PLAIN_ROUTE = """
[[routes]]
name = "plain"
method = "GET"
path = "/plain"
"""


async def test_admitted_request_carries_ratelimit_headers_and_is_charged(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    gw = await gateway_factory(BASIC_ROUTES)
    project, secret = await project_factory(1000)
    resp = await gw.client.get("/charged", headers=bearer(secret))
    assert resp.status == 200, await resp.text()
    assert await resp.text() == "ok"
    # The project's first request asked the authority once: its key came with the snapshot.
    assert gw.state.authority is not None
    calls = gw.state.authority.calls
    assert (calls["ResolveApiKey"], calls["GetAdmissionSnapshot"]) == (1, 0)
    assert sf_list(resp.headers["RateLimit-Policy"]) == {
        "requests": {"q": 5, "w": 60},
        "concurrent": {"q": 2, "qu": "concurrent-requests"},
    }
    limits = sf_list(resp.headers["RateLimit"])
    assert limits["requests"]["r"] == 4
    # The unit just used leaves the 60 s window within 60 s (a lease's grant, stamped at
    # the lease's expiry, must not push the reset beyond the window).
    assert 0 <= limits["requests"]["t"] <= 60
    assert limits["concurrent"] == {"r": 1}
    assert "Retry-After" not in resp.headers
    assert "Creditgate-Warning" not in resp.headers
    assert (
        gw.metric("creditgate_decisions_total", {"outcome": "admitted", "reason": "admitted"}) == 1
    )
    assert gw.metric("creditgate_admission_duration_seconds_count") == 1
    # Sub-millisecond buckets: the first is 50 us.
    for le in ("5e-05", "0.0001", "0.00025", "0.0005", "0.001"):
        assert (
            gw.registry.get_sample_value("creditgate_admission_duration_seconds_bucket", {"le": le})
            is not None
        )
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (10, 1)
    assert gw.metric("creditgate_committed_credits_total", {"meter": "requests"}) == 10


async def test_rate_limit_429(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    gw = await gateway_factory(BASIC_ROUTES)
    _, secret = await project_factory(1000)
    for i in range(5):
        resp = await gw.client.get("/free", headers=bearer(secret))
        assert resp.status == 200
        limits = sf_list(resp.headers["RateLimit"])
        assert limits["requests"]["r"] == 4 - i
        assert 0 <= limits["requests"]["t"] <= 60
    resp = await gw.client.get("/free", headers=bearer(secret))
    await problem(resp, 429, "rate-limited")
    limits = sf_list(resp.headers["RateLimit"])
    assert limits["requests"]["r"] == 0
    assert sf_list(resp.headers["RateLimit-Policy"]) == {"requests": {"q": 5, "w": 60}}
    retry = int(resp.headers["Retry-After"])
    assert retry >= limits["requests"]["t"] >= 1
    assert (
        gw.metric("creditgate_decisions_total", {"outcome": "denied", "reason": "rate-limited"})
        == 1
    )
    # The first request resolved the key; the other five found it in the local cache, counted
    # as plain integers and folded into the counter by the scrape.
    local = {"source": "local", "result": "valid"}
    assert gw.metric("creditgate_key_resolutions_total", local) == 5


async def test_concurrency_limit_429(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    entered = asyncio.Semaphore(0)
    go = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.release()
        await go.wait()
        return web.Response(text="slow")

    gw = await gateway_factory([("GET", "/slow", slow)])
    project, secret = await project_factory(1000)
    first = asyncio.create_task(gw.client.get("/slow", headers=bearer(secret)))
    second = asyncio.create_task(gw.client.get("/slow", headers=bearer(secret)))
    async with asyncio.timeout(10):
        await entered.acquire()
        await entered.acquire()
    resp = await gw.client.get("/slow", headers=bearer(secret))
    await problem(resp, 429, "concurrency-limited")
    assert sf_list(resp.headers["RateLimit"]) == {"concurrent": {"r": 0}}
    assert sf_list(resp.headers["RateLimit-Policy"]) == {
        "concurrent": {"q": 2, "qu": "concurrent-requests"}
    }
    assert int(resp.headers["Retry-After"]) >= 1
    go.set()
    assert [(await first).status, (await second).status] == [200, 200]
    await gw.state.wait_settled(10)
    again = await gw.client.get("/slow", headers=bearer(secret))
    assert again.status == 200
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (30, 3)


async def test_insufficient_credits_402(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    gw = await gateway_factory(BASIC_ROUTES)
    _, secret = await project_factory(15)
    assert (await gw.client.get("/charged", headers=bearer(secret))).status == 200
    resp = await gw.client.get("/charged", headers=bearer(secret))
    await problem(resp, 402, "insufficient-credits")
    assert int(resp.headers["Retry-After"]) == 30
    # A denial takes nothing: the quotas stand as the first request left them.
    assert sf_list(resp.headers["RateLimit-Policy"]) == {
        "requests": {"q": 5, "w": 60},
        "concurrent": {"q": 2, "qu": "concurrent-requests"},
    }
    limits = sf_list(resp.headers["RateLimit"])
    assert limits["requests"]["r"] == 4 and 0 <= limits["requests"]["t"] <= 60
    assert limits["concurrent"] == {"r": 2}


async def test_grace_402_on_charged_route_free_route_admitted(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    gw = await gateway_factory(BASIC_ROUTES)
    _, secret = await project_factory(0, grace_period_seconds=3600)
    resp = await gw.client.get("/charged", headers=bearer(secret))
    body = await problem(resp, 402, "wallet-grace")
    assert body["grace_until_ms"] > 0
    assert body["grace_until"].endswith("+00:00")
    assert int(resp.headers["Retry-After"]) == 30
    assert (await gw.client.get("/free", headers=bearer(secret))).status == 200


async def test_expired_403_once_the_authority_expires_the_wallet(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_clock: ManualClock,
) -> None:
    gw = await gateway_factory(BASIC_ROUTES, policy_text=GATEWAY_POLICY + PLAIN_ROUTE)
    _, secret = await project_factory(0, grace_period_seconds=60)
    assert (await gw.client.get("/plain", headers=bearer(secret))).status == 200
    authority_clock.advance(seconds=61)
    await authority.run_jobs_once()
    # Watch pushes the change; poll for it with a deadline (invariant 6: within 1 s).
    async with asyncio.timeout(5):
        while True:
            resp = await gw.client.get("/plain", headers=bearer(secret))
            if resp.status != 200:
                break
            await asyncio.sleep(0.02)
    await problem(resp, 403, "wallet-expired")
    assert "Retry-After" not in resp.headers


async def test_settlement_backlog_503_while_commits_wait_for_the_authority(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    """No flusher runs: the first request's 10 credits stay unsettled, and with at most 15
    unsettled (invariant 7) the next 10 must wait: 503, whatever the balance."""
    policy = GATEWAY_POLICY.replace("[settings]", "[settings]\nunsettled_limit = 15", 1)
    gw = await gateway_factory(BASIC_ROUTES, policy_text=policy, run_flusher=False)
    _, secret = await project_factory(1000)
    assert (await gw.client.get("/charged", headers=bearer(secret))).status == 200
    resp = await gw.client.get("/charged", headers=bearer(secret))
    await problem(resp, 503, "settlement-backlog")
    assert int(resp.headers["Retry-After"]) == 5  # backlog_retry_after_seconds
    assert (await gw.client.get("/free", headers=bearer(secret))).status == 200  # no cost


async def test_unknown_project_403_from_a_trusted_proxy(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    """A trusted proxy names the project itself (X-Creditgate-Project); one the authority does
    not know is refused 403, and one it knows is admitted without an API key."""
    gw = await gateway_factory(BASIC_ROUTES, trusted_proxies=("127.0.0.1/32", "::1/128"))
    project, _ = await project_factory(1000)
    resp = await gw.client.get("/charged", headers={"X-Creditgate-Project": "ghost-project"})
    body = await problem(resp, 403, "unknown-project")
    assert body["project_id"] == "ghost-project"
    resp = await gw.client.get("/charged", headers={"X-Creditgate-Project": project})
    assert resp.status == 200, await resp.text()


async def test_bad_and_missing_credentials(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(BASIC_ROUTES)
    unknown = "cg_" + secrets.token_urlsafe(32)
    resp = await gw.client.get("/charged", headers=bearer(unknown))
    await problem(resp, 403, "invalid-credential")
    resp = await gw.client.get("/charged", headers=bearer("not-a-key"))
    await problem(resp, 403, "invalid-credential")
    resp = await gw.client.get("/charged")
    await problem(resp, 401, "missing-credential")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Retry-After" not in resp.headers


async def test_unmatched_route_denied_400_metrics_served(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory([*BASIC_ROUTES, ("GET", "/elsewhere", ok)])
    resp = await gw.client.get("/elsewhere")
    body = await problem(resp, 400, "invalid-request")
    assert "/elsewhere" in body["detail"]
    metrics = await gw.client.get("/metrics")
    assert metrics.status == 200
    assert "creditgate_decisions_total" in await metrics.text()


def diagnostics_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the 503s' diagnostics said in the server log (gateway_plugin.problems)."""
    return [r.getMessage() for r in caplog.records if r.name == "gateway_plugin.problems"]


async def test_redis_down_503_on_credit_route_degraded_allow_on_rate_only(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    own_redis: RedisProcess,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hold mode: every request needs Redis, so the outage shows on the next request.

    The client reads a sentence; what failed (the redis-py exception) is in the server log."""
    # Each diagnostic is logged once a minute per process: forget those of earlier tests.
    monkeypatch.setattr(problems, "_logged_at", {})
    gw = await gateway_factory(
        BASIC_ROUTES,
        policy_text=GATEWAY_POLICY_HOLD,
        redis_url=own_redis.url,
        flusher_drain_timeout_seconds=0.5,
        settle_drain_timeout_seconds=0.5,
    )
    _, secret = await project_factory(1000)
    assert (await gw.client.get("/charged", headers=bearer(secret))).status == 200
    await gw.state.wait_settled(10)
    own_redis.stop()
    with caplog.at_level(logging.WARNING):
        resp = await gw.client.get("/charged", headers=bearer(secret))
    body = await problem(resp, 503, "admission-unavailable")
    assert body["detail"] == REDIS_UNAVAILABLE_DETAIL
    assert int(resp.headers["Retry-After"]) == 2
    logged = diagnostics_logged(caplog)
    assert any("redis unavailable" in m and "ConnectionError" in m for m in logged), logged
    resp = await gw.client.get("/free", headers=bearer(secret))
    assert resp.status == 200
    assert gw.metric("creditgate_degraded_admits_total", {"route": "free"}) == 1
    assert (
        gw.metric(
            "creditgate_decisions_total", {"outcome": "denied", "reason": "admission-unavailable"}
        )
        == 1
    )


def test_a_503_diagnostic_is_logged_once_a_minute_and_never_sent(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engines keep what failed in an UNAVAILABLE decision's detail, for operators; the
    client gets the sentence of its cause. The first case is what a reviewer received."""
    monkeypatch.setattr(problems, "_logged_at", {})
    cases = [
        ("redis unavailable: StoreUnavailable('redis: network:ConnectionError')", "(Redis)"),
        (
            "project not cached and the authority is unreachable: GetAdmissionSnapshot: "
            "UNAVAILABLE failed to connect to all addresses; last error: ipv4:10.0.0.5:50051",
            "credit authority is unreachable",
        ),
        ("the project snapshot is still missing after a cache fill", "cannot decide right now"),
    ]
    with caplog.at_level(logging.WARNING, logger="gateway_plugin.problems"):
        for diagnostic, public in cases:
            for _ in range(3):
                decision = Decision(False, Reason.UNAVAILABLE, "p-1", detail=diagnostic)
                resp = problems.problem_response(decision, "/v1/x")
                assert resp.body is not None
                body = json.loads(bytes(resp.body))  # type: ignore[arg-type]
                assert public in body["detail"]
                assert diagnostic not in body["detail"] and ":" not in body["detail"]
    assert diagnostics_logged(caplog) == [
        f"creditgate: answered 503 admission-unavailable: {d}" for d, _ in cases
    ]
    # Other reasons' details are written for clients: sent as they are.
    bad = Decision(False, Reason.INVALID_REQUEST, detail="cost 0 is out of range")
    body = json.loads(bytes(problems.problem_response(bad, "/").body))  # type: ignore[arg-type]
    assert body["detail"] == "cost 0 is out of range"


async def test_redis_down_lease_mode_admits_only_what_it_leased(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    own_redis: RedisProcess,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lease mode: credits and units already leased were reserved in Redis before the outage;
    the gateway spends them (never more), then the route's on_redis_down policy applies.

    The lease admitter's diagnostic (it may be an exception repr) is logged, not sent."""
    # Each diagnostic is logged once a minute per process: forget those of earlier tests.
    monkeypatch.setattr(problems, "_logged_at", {})
    gw = await gateway_factory(
        BASIC_ROUTES,
        redis_url=own_redis.url,
        flusher_drain_timeout_seconds=0.5,
        settle_drain_timeout_seconds=0.5,
    )
    project, secret = await project_factory(1000)
    assert (await gw.client.get("/charged", headers=bearer(secret))).status == 200
    await gw.state.wait_settled(10)
    leases = gw.state.leases
    assert leases is not None
    (lease,) = [x for x in leases.leases if x.project_id == project]
    leased_requests = lease.free // 10
    own_redis.stop()
    statuses, details = [], []
    with caplog.at_level(logging.WARNING):
        for _ in range(leased_requests + 2):
            resp = await gw.client.get("/charged", headers=bearer(secret))
            statuses.append(resp.status)
            if resp.status == 503:
                details.append((await problem(resp, 503, "admission-unavailable"))["detail"])
                assert int(resp.headers["Retry-After"]) == 2
    assert statuses.count(200) <= leased_requests
    assert statuses[-2:] == [503, 503]
    # The client reads a sentence, never the exception; the exception is in the server log.
    assert set(details) == {REDIS_UNAVAILABLE_DETAIL}
    logged = diagnostics_logged(caplog)
    assert any("admission-unavailable: redis unavailable: " in m for m in logged), logged


async def test_reported_usage_and_overage(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    errors: list[str] = []

    async def reported(request: web.Request) -> web.Response:
        handle = usage(request)
        assert handle.hold_amount == 100
        assert handle.project_id is not None
        for bad in (101, -1, "5", 2.0, True):
            try:
                handle.report(bad)  # type: ignore[arg-type]
            except UsageError as exc:
                errors.append(str(exc))
        handle.report(37)
        return web.Response(text="reported")

    async def overage(request: web.Request) -> web.Response:
        usage(request).report(25)
        return web.Response(text="overage")

    gw = await gateway_factory([("POST", "/reported", reported), ("POST", "/overage", overage)])
    project, secret = await project_factory(1000)
    assert (await gw.client.post("/reported", headers=bearer(secret))).status == 200
    assert (await gw.client.post("/overage", headers=bearer(secret))).status == 200
    assert len(errors) == 5
    assert "does not allow overage" in errors[0]
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (62, 2)


async def test_reported_route_without_a_report_charges_the_hold_and_is_counted(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    async def forgets(request: web.Request) -> web.Response:
        return web.Response(text="no report")

    gw = await gateway_factory(
        [("POST", "/reported", forgets), ("POST", "/overage", forgets), ("GET", "/charged", ok)]
    )
    project, secret = await project_factory(1000)
    for path in ("/reported", "/overage"):
        assert (await gw.client.post(path, headers=bearer(secret))).status == 200
    gw.state.metrics.fold()
    # Only the route whose commit mode expects a report counts the missing one.
    assert gw.metric("creditgate_usage_unreported_total", {"route": "reported"}) == 1
    assert gw.metric("creditgate_usage_unreported_total", {"route": "overage"}) == 0
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (110, 2)


async def test_a_handler_that_releases_is_charged_nothing(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    """usage(request).release() ends the hold with no charge, even after a report; the
    response goes out as the handler made it, and only the request that did not release is
    in the ledger."""

    async def releases(request: web.Request) -> web.Response:
        usage(request).release()
        return web.Response(text="released")

    async def reports_then_releases(request: web.Request) -> web.Response:
        usage(request).report(37)
        usage(request).release()
        return web.Response(text="released after a report")

    gw = await gateway_factory(
        [("GET", "/charged", releases), ("POST", "/reported", reports_then_releases)]
    )
    project, secret = await project_factory(1000)
    resp = await gw.client.get("/charged", headers=bearer(secret))
    assert (resp.status, await resp.text()) == (200, "released")
    assert sf_list(resp.headers["RateLimit"])["requests"]["r"] == 4  # the quota unit is used
    resp = await gw.client.post("/reported", headers=bearer(secret))
    assert (resp.status, await resp.text()) == (200, "released after a report")
    assert gw.state.leases is not None
    assert await gw.state.leases.flush()
    gw.state.metrics.fold()
    assert gw.metric("creditgate_settlements_total", {"action": "release", "result": "ok"}) == 2
    assert gw.metric("creditgate_settlements_total", {"action": "commit", "result": "ok"}) == 0
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (0, 0)


async def test_settle_in_flight_counts_commits_not_yet_in_redis(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    # Lease syncs far apart: commits wait in the lease until the test flushes them.
    policy = GATEWAY_POLICY.replace(
        "[settings]", "[settings]\nlease_sync_ms = 10000\nlease_ttl_ms = 60000", 1
    )
    gw = await gateway_factory([("GET", "/charged", ok)], policy_text=policy)
    _, secret = await project_factory(1000)
    # The first request's sync comes before its admission: its commit waits for the next one.
    assert (await gw.client.get("/charged", headers=bearer(secret))).status == 200
    gw.state.metrics.fold()
    assert gw.metric("creditgate_settle_in_flight") == 1
    assert gw.state.leases is not None
    assert await gw.state.leases.flush()
    gw.state.metrics.fold()
    assert gw.metric("creditgate_settle_in_flight") == 0


async def test_usage_outside_a_protected_route_is_a_clear_error(
    gateway_factory: GatewayFactory,
) -> None:
    seen: list[str] = []

    async def unprotected(request: web.Request) -> web.Response:
        try:
            usage(request)
        except UsageError as exc:
            seen.append(str(exc))
        return web.Response(text="x")

    policy = GATEWAY_POLICY.replace('unmatched = "deny"', 'unmatched = "pass"')
    gw = await gateway_factory([("GET", "/open", unprotected)], policy_text=policy)
    assert (await gw.client.get("/open")).status == 200
    assert seen and "not protected" in seen[0]


async def test_exceptions_and_5xx_release_unless_configured(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("handler bug")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def raise_status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code == 502:
            raise web.HTTPBadGateway()
        if code == 404:
            raise web.HTTPNotFound()
        return web.Response(status=code)

    gw = await gateway_factory(
        [
            ("GET", "/boom", boom),
            ("GET", "/status/{code}", status),
            ("GET", "/sticky/{code}", raise_status),
        ]
    )
    project, secret = await project_factory(1000)
    h = bearer(secret)
    assert (await gw.client.get("/boom", headers=h)).status == 500  # released
    assert (await gw.client.get("/status/503", headers=h)).status == 503  # released
    assert (await gw.client.get("/status/404", headers=h)).status == 404  # committed: 10
    resp = await gw.client.get("/status/500", headers=h)  # released
    assert resp.status == 500
    assert "RateLimit-Policy" not in resp.headers  # route has no quotas
    assert (await gw.client.get("/sticky/500", headers=h)).status == 500  # committed: 10
    assert (await gw.client.get("/sticky/502", headers=h)).status == 502  # committed: 10
    assert (await gw.client.get("/sticky/404", headers=h)).status == 404  # committed: 10
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (40, 4)
    assert gw.metric("creditgate_settlements_total", {"action": "release", "result": "ok"}) == 3
    assert gw.metric("creditgate_settlements_total", {"action": "commit", "result": "ok"}) == 4


async def test_shadow_route_never_denies_but_says_so(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    async def reporting(request: web.Request) -> web.Response:
        usage(request).report(5)  # must not fail even when the rules would have denied
        return web.Response(text="shadow")

    gw = await gateway_factory([("GET", "/shadow", reporting)])
    project, secret = await project_factory(1000)
    statuses, shadows = [], []
    for _ in range(3):
        resp = await gw.client.get("/shadow", headers=bearer(secret))
        statuses.append(resp.status)
        shadows.append(resp.headers.get("Creditgate-Shadow"))
    assert statuses == [200, 200, 200]
    assert shadows[0] is None
    assert [sf_dict(s) for s in shadows[1:] if s] == [{"would-deny": "rate-limited"}] * 2
    assert gw.metric("creditgate_shadow_would_deny_total", {"reason": "rate-limited"}) == 2
    assert (
        gw.metric("creditgate_decisions_total", {"outcome": "admitted", "reason": "admitted"}) == 3
    )
    await gw.settle_everything()
    # Only the first request held credits (the rules admitted it); the others hold nothing.
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (5, 1)


async def test_low_balance_warning(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    gw = await gateway_factory([*BASIC_ROUTES, ("POST", "/reported", ok)])
    _, secret = await project_factory(50, low_balance_threshold=100)
    resp = await gw.client.get("/charged", headers=bearer(secret))
    assert resp.status == 200
    assert sf_list(resp.headers["Creditgate-Warning"]) == {"low-balance": {}}
    # A denial says it too: the client learns why it may soon be refused for credits.
    denied = await gw.client.post("/reported", headers=bearer(secret))  # costs 100 > 40 left
    await problem(denied, 402, "insufficient-credits")
    assert sf_list(denied.headers["Creditgate-Warning"]) == {"low-balance": {}}


async def test_sub_app_protects_only_its_routes(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    async def thing(request: web.Request) -> web.Response:
        return web.Response(text=f"thing of {usage(request).project_id}")

    gw = await gateway_factory([("GET", "/thing", thing)], sub_app="/api")
    project, secret = await project_factory(1000)
    assert (await gw.client.get("/api/thing")).status == 401
    resp = await gw.client.get("/api/thing", headers=bearer(secret))
    assert resp.status == 200
    assert await resp.text() == f"thing of {project}"
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (10, 1)


class ChargedView(web.View):
    async def get(self) -> web.Response:
        return web.Response(text=f"view of {usage(self.request).project_id}")


async def test_every_kind_of_route_is_admitted_without_a_middleware(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    """Admission wraps each route's handler when the app starts (aiohttp's middleware layer
    alone cost 10-13% of a trivial request): a class-based view is admitted like a function,
    and the plugin adds no middleware."""
    gw = await gateway_factory([("GET", "/charged", ChargedView)])
    project, secret = await project_factory(1000)
    await problem(await gw.client.get("/charged"), 401, "missing-credential")
    resp = await gw.client.get("/charged", headers=bearer(secret))
    assert (resp.status, await resp.text()) == (200, f"view of {project}")
    assert "RateLimit" in resp.headers
    assert list(gw.client.app.middlewares) == []


def admin_only(handler: Handler) -> Handler:
    handler.admin_only = True  # type: ignore[attr-defined]
    return handler


@admin_only
async def wipe(request: web.Request) -> web.Response:
    """Deletes everything."""
    return web.Response(text="deleted")


def _no_flusher_config(redis_url: str, authority: AuthorityServer) -> GatewayConfig:
    """GATEWAY_POLICY against the test's Redis and authority, no flusher, a registry of its own."""
    return GatewayConfig(
        policy=parse_policy(GATEWAY_POLICY, "test-policy.toml"),
        redis_url=redis_url,
        authority_target=authority.grpc_target,
        authority_token=authority.config.admin_token,
        run_flusher=False,
        registry=CollectorRegistry(),
    )


def _where(task: asyncio.Task[Any]) -> str:
    """The file (Python) or module (compiled) of the code a task runs."""
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None)
    return code.co_filename if code is not None else type(coro).__module__


def _plugins(name: str, where: str) -> bool:
    return name.startswith("creditgate-") or any(
        part in where for part in ("admission", "gateway_plugin")
    )


async def test_shutdown_closes_the_clients_and_leaves_no_task_running(
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
) -> None:
    """Everything setup() started while the app ran (flusher, sweeper, Watch stream, lease
    syncs, metrics fold, fills) is stopped when the app stops, and the authority's channel
    is closed: no task of the plugin outlives its app."""
    config = dataclasses.replace(_no_flusher_config(redis_url, authority), run_flusher=True)
    app = web.Application()
    app.router.add_get("/charged", ok)
    state = setup(app, config)
    _, secret = await project_factory(1000)
    before = asyncio.all_tasks()
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/charged", headers=bearer(secret))).status == 200
        running = {t.get_name() for t in asyncio.all_tasks() - before}
        assert {"creditgate-flusher", "creditgate-watch", "creditgate-metrics-fold"} <= running
        assert state.authority is not None
        assert state.authority.stub is not None
    # The authority under test serves in this same loop, and gRPC ends its own calls' tasks a
    # few iterations later: the tasks checked are those running the plugin's code.
    left = {t.get_name(): _where(t) for t in asyncio.all_tasks() - before if not t.done()}
    assert {n: w for n, w in left.items() if _plugins(n, w)} == {}
    assert all(task.done() for task in state.background.values())
    with pytest.raises(RuntimeError, match="after aclose"):
        state.authority.stub  # noqa: B018


async def test_a_wrapped_handler_looks_like_itself_and_an_app_started_again_admits_once(
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
) -> None:
    """Middlewares and request.match_info.handler see the handler's own name, docstring and
    attributes (an authorization decorator's mark), and a view stays a subclass of its class.
    An app started a second time keeps its wrappers: one admission, one charge, per request."""
    seen: list[tuple[str, bool, bool]] = []

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        target = request.match_info.handler
        is_view = isinstance(target, type) and issubclass(target, ChargedView)
        seen.append((target.__name__, getattr(target, "admin_only", False), is_view))
        if getattr(handler, "admin_only", False):
            raise web.HTTPForbidden()
        return await handler(request)

    app = web.Application(middlewares=[authorize])
    app.router.add_post("/admin/wipe", wipe)
    app.router.add_view("/charged", ChargedView)
    state = setup(app, _no_flusher_config(redis_url, authority))
    _, secret = await project_factory(1000)
    for _ in range(2):  # the same app, started twice
        async with TestClient(TestServer(app)) as client:
            assert (await client.post("/admin/wipe", headers=bearer(secret))).status == 403
            resp = await client.get("/charged", headers=bearer(secret))
            assert resp.status == 200
            assert sf_list(resp.headers["RateLimit"])["concurrent"] == {"r": 1}
    assert seen == [("wipe", True, False), ("ChargedView", False, True)] * 2
    assert wipe.__doc__ == "Deletes everything."
    state.metrics.fold()
    admitted = {"outcome": "admitted", "reason": "admitted"}
    assert state.metrics.registry.get_sample_value("creditgate_decisions_total", admitted) == 2


async def test_a_cloned_request_keeps_its_handle_and_headers_stay_with_their_request(
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
) -> None:
    """A middleware that hands the handler a clone of the request (request.clone() copies its
    state) does not lose the usage handle: the handler reports through the clone, the report
    is what is committed, and the response aiohttp prepares with the original request still
    carries the RateLimit headers. The next request on the same connection, to a route
    served without admission, carries none."""
    reported: list[int] = []

    @web.middleware
    async def rewrite(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(request.clone(headers={**request.headers, "X-Rewritten": "1"}))

    async def report(request: web.Request) -> web.Response:
        assert request.headers["X-Rewritten"] == "1"
        usage(request).report(7)  # of the 10 held
        reported.append(usage(request).commit_amount())
        return web.Response(text="reported")

    app = web.Application(middlewares=[rewrite])
    app.router.add_get("/charged", report)
    state = setup(app, _no_flusher_config(redis_url, authority))
    _, secret = await project_factory(1000)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/charged", headers=bearer(secret))
        assert resp.status == 200, await resp.text()
        assert sf_list(resp.headers["RateLimit"])["requests"]["r"] == 4
        after = await client.get("/metrics")  # exempt: no admission, no admission headers
        assert after.status == 200
        assert "RateLimit" not in after.headers and "RateLimit-Policy" not in after.headers
    assert reported == [7]
    state.metrics.fold()
    committed = state.metrics.registry.get_sample_value(
        "creditgate_committed_credits_total", {"meter": "requests"}
    )
    assert committed == 7


async def test_a_rewritten_url_moves_no_fixed_route_and_is_what_a_dynamic_route_meters(
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
) -> None:
    """A middleware hands the handler a request for /free (no cost, the `requests` quota only).

    /charged is a route with one path and one method: its policy route was fixed when the app
    started, and its handler runs, so it is metered as `charged` (10 held, both quotas).
    /v1/{model} is dynamic: matched by the path its handler gets, it is metered as `free`.
    """
    seen: list[tuple[str, int]] = []

    @web.middleware
    async def rewrite(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(request.clone(rel_url=URL("/free")))

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.path, usage(request).hold_amount))
        return web.Response(text="ok")

    app = web.Application(middlewares=[rewrite])
    app.router.add_get("/charged", handle)
    app.router.add_get("/v1/{model}", handle)
    setup(app, _no_flusher_config(redis_url, authority))
    _, secret = await project_factory(1000)
    async with TestClient(TestServer(app)) as client:
        fixed = await client.get("/charged", headers=bearer(secret))
        assert fixed.status == 200, await fixed.text()
        assert set(sf_list(fixed.headers["RateLimit-Policy"])) == {"requests", "concurrent"}
        dynamic = await client.get("/v1/gpt", headers=bearer(secret))
        assert dynamic.status == 200, await dynamic.text()
        assert set(sf_list(dynamic.headers["RateLimit-Policy"])) == {"requests"}
    assert seen == [("/free", 10), ("/free", 0)]


FIXED_ROUTES_POLICY = """
[settings]
unmatched = "pass"

[[routes]]
name = "post-p"
method = "POST"
path = "/p"
cost = 100

[[routes]]
name = "any-p"
method = "*"
path = "/p"

[[routes]]
name = "status"
method = "GET"
path = "/status/{code}"

[[routes]]
name = "api"
method = "GET"
path = "/api/**"

[[routes]]
name = "charged"
method = "GET"
path = "/charged"
cost = 10

[[routes]]
name = "files"
method = "GET"
path = "/static"

[[routes]]
name = "stream-commit"
method = "GET"
path = "/stream/commit"
"""


def test_the_routes_whose_policy_route_is_fixed_when_the_app_starts(tmp_path: Path) -> None:
    """Only a plain path with one method: aiohttp's router then hands the route exactly the
    requests whose `rel_url.path_safe` is that path and whose method is that method. A
    sub-app's routes carry its prefix (/stream + /commit is the policy's /stream/commit).

    Every other route here would get a wrong route if fixed, so each check is needed: the `*`
    route on /p would be `any-p` for a POST that is `post-p`; the dynamic /status/{code} and
    the static /static would be their literal paths' routes; /api/../charged would be `api`,
    a path that resolves to /charged."""
    policy = parse_policy(FIXED_ROUTES_POLICY, "test-policy.toml")
    app = web.Application()
    app.router.add_route("POST", "/p", ChargedView)  # a view for one method: fixed
    app.router.add_route("*", "/p", ok)
    app.router.add_get("/status/{code}", ok)
    app.router.add_get("/api/../charged", ok)
    app.router.add_get("/charged", ok)
    app.router.add_get("/nowhere", ok)
    app.router.add_view("/api/view", ChargedView)
    app.router.add_static("/static", tmp_path)
    sub = web.Application()
    sub.router.add_get("/commit", ok)
    app.add_subapp("/stream", sub)
    app.freeze()

    def fixed(resource: web.AbstractResource) -> dict[str, str | None]:
        return {
            route.method: getattr(_fixed_route(policy, resource, route), "name", None)
            for route in resource
        }

    found = {r.canonical: fixed(r) for r in app.router.resources() if r.canonical != "/stream"}
    assert found == {
        "/p": {"POST": "post-p", "*": None},  # any method: matched per request
        "/status/{code}": {"GET": None, "HEAD": None},  # dynamic
        "/api/../charged": {"GET": None, "HEAD": None},  # read two ways: refused per request
        "/charged": {"GET": "charged", "HEAD": "charged"},
        "/nowhere": {"GET": None, "HEAD": None},  # the policy names no such route
        "/api/view": {"*": None},  # add_view: every method
        "/static": {"GET": None, "HEAD": None},  # files: matched as the file they serve
    }
    (subresource,) = sub.router.resources()
    assert fixed(subresource) == {"GET": "stream-commit", "HEAD": "stream-commit"}

    class Exact(web.PlainResource):  # a subclass may match more than its one path
        pass

    custom = Exact("/charged")
    custom.add_route("GET", ok)
    assert fixed(custom) == {"GET": None}


@pytest.mark.parametrize(
    ("path", "action", "committed"),
    [("/stream/commit", "commit", 7), ("/stream/release", "release", 0)],
)
async def test_a_client_gone_before_a_plain_response_follows_the_routes_on_disconnect(
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
    path: str,
    action: str,
    committed: int,
) -> None:
    """aiohttp's own server (web.AppRunner; its test server cancels handlers instead) lets a
    handler run on when its client leaves. The handler reports 7, finds the connection gone
    while reading the body, and returns a plain response that can reach no one: the route's
    on_disconnect decides."""
    entered = asyncio.Event()
    finished = asyncio.Event()
    returned: list[bool] = []

    async def outlives_its_client(request: web.Request) -> web.Response:
        try:
            usage(request).report(7)
            entered.set()
            with pytest.raises(ConnectionResetError):
                await request.read()  # the client sent 2 of the 10 bytes it announced, then left
            assert request.transport is None
            returned.append(True)
            return web.Response(text="too late")
        finally:
            finished.set()

    app = web.Application()
    app.router.add_get(path, outlives_its_client)
    state = setup(app, _no_flusher_config(redis_url, authority))
    _, secret = await project_factory(1000)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        await leave_mid_request(port, path, secret, entered, body_sent="ab")
        # The wrapper ends the hold in the same step of the request's task as the handler
        # returns, before this task wakes up to `finished`.
        async with asyncio.timeout(10):
            await finished.wait()
        assert returned == [True]  # the handler ran to its end: nothing was cancelled
        state.metrics.fold()
        registry = state.metrics.registry
        ended = {"action": action, "result": "ok"}
        assert registry.get_sample_value("creditgate_settlements_total", ended) == 1
        credits = registry.get_sample_value(
            "creditgate_committed_credits_total", {"meter": "requests"}
        )
        assert (credits or 0) == committed
    finally:
        await runner.cleanup()


async def test_a_response_prepared_in_another_requests_task_gets_its_own_headers(
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
) -> None:
    """A handler that streams to other clients (a publisher preparing its subscribers'
    responses) must not put its admission on them: an unadmitted subscriber gets no RateLimit,
    an admitted one its own project's figures."""
    waiting: list[tuple[web.Request, web.StreamResponse, asyncio.Event]] = []
    two_waiting = asyncio.Event()

    async def subscribe(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        done = asyncio.Event()
        waiting.append((request, response, done))
        if len(waiting) == 2:
            two_waiting.set()
        await done.wait()
        return response

    async def publish(request: web.Request) -> web.Response:
        for subscriber, response, done in waiting:
            await response.prepare(subscriber)
            await response.write_eof()
            done.set()
        return web.Response(text="published")

    app = web.Application()
    app.router.add_get("/open", subscribe)  # no policy route: passes, nothing admitted
    app.router.add_get("/free", subscribe)
    app.router.add_get("/charged", publish)
    config = _no_flusher_config(redis_url, authority)
    config.policy = parse_policy(GATEWAY_POLICY.replace('unmatched = "deny"', 'unmatched = "pass"'))
    setup(app, config)
    _, publisher = await project_factory(1000)
    _, subscriber = await project_factory(1000)
    async with TestClient(TestServer(app)) as client:
        # The subscriber's project has used 3 of its 5 requests when the publisher sends.
        for _ in range(2):
            assert (await client.get("/charged", headers=bearer(subscriber))).status == 200
        unadmitted = asyncio.ensure_future(client.get("/open"))
        admitted = asyncio.ensure_future(client.get("/free", headers=bearer(subscriber)))
        await two_waiting.wait()
        published = await client.get("/charged", headers=bearer(publisher))
        assert published.status == 200
        assert sf_list(published.headers["RateLimit"])["requests"]["r"] == 4
        unadmitted_resp, admitted_resp = await unadmitted, await admitted
    assert unadmitted_resp.status == 200 and admitted_resp.status == 200
    assert "RateLimit" not in unadmitted_resp.headers
    assert "RateLimit-Policy" not in unadmitted_resp.headers
    assert sf_list(admitted_resp.headers["RateLimit"])["requests"]["r"] == 2


async def test_the_handle_is_found_from_other_tasks_threads_and_clones(
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
) -> None:
    """usage(request) answers wherever the request object is: in a middleware that ran the
    handler in a task of its own (asyncio.wait_for), in an executor thread, in a worker task
    started before the request, for a clone made in the handler; and the response a
    middleware ran that way still carries the RateLimit headers."""
    seen: dict[str, str | None] = {}
    jobs: asyncio.Queue[tuple[web.Request, asyncio.Future[str | None]]] = asyncio.Queue()

    def project(request: web.Request) -> str | None:
        return usage(request).project_id

    @web.middleware
    async def in_a_task(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await asyncio.wait_for(handler(request), 30)  # a task of its own (3.11)
        seen["middleware"] = project(request)
        return response

    async def worker(app: web.Application) -> AsyncIterator[None]:
        async def run() -> None:
            while True:
                request, answer = await jobs.get()
                answer.set_result(project(request))

        task = asyncio.create_task(run())
        yield
        task.cancel()

    async def charged(request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        seen["executor"] = await loop.run_in_executor(None, project, request)
        answer: asyncio.Future[str | None] = loop.create_future()
        await jobs.put((request, answer))
        seen["worker"] = await answer
        seen["clone"] = project(request.clone())
        return web.Response(text="ok")

    app = web.Application(middlewares=[in_a_task])
    app.cleanup_ctx.append(worker)
    app.router.add_get("/charged", charged)
    setup(app, _no_flusher_config(redis_url, authority))
    project_id, secret = await project_factory(1000)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/charged", headers=bearer(secret))
        assert resp.status == 200, await resp.text()
        assert sf_list(resp.headers["RateLimit"])["requests"]["r"] == 4
    assert seen == dict.fromkeys(("executor", "worker", "clone", "middleware"), project_id)


async def test_a_task_the_handler_started_does_not_keep_its_request_alive(
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
) -> None:
    """A long-lived task started by an admitted handler inherits the handle with the
    request's context; the handle must not keep the request (and its connection) alive."""
    started: list[asyncio.Task[None]] = []
    requests: list[weakref.ref[web.Request]] = []
    forever = asyncio.Event()

    async def start_job(request: web.Request) -> web.Response:
        started.append(asyncio.create_task(forever.wait()))
        requests.append(weakref.ref(request))
        return web.Response(text="started")

    app = web.Application()
    app.router.add_get("/free", start_job)
    setup(app, _no_flusher_config(redis_url, authority))
    _, secret = await project_factory(1000)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/free", headers=bearer(secret))).status == 200
    gc.collect()
    assert not started[0].done()
    assert requests[0]() is None
    forever.set()
    await started[0]


async def test_sub_app_leaves_parent_routes_alone(
    aiohttp_client: Any, redis_url: str, authority: AuthorityServer
) -> None:
    from admission.policy import parse_policy

    parent = web.Application()
    parent.router.add_get("/health", ok)
    child = web.Application()
    child.router.add_get("/thing", ok)
    state = setup(
        child,
        GatewayConfig(
            policy=parse_policy(GATEWAY_POLICY),
            redis_url=redis_url,
            authority_target=authority.grpc_target,
            authority_token=authority.config.admin_token,
            run_flusher=False,
            metrics_path="",
            registry=CollectorRegistry(),
        ),
    )
    parent.add_subapp("/api", child)
    client = await aiohttp_client(parent)
    assert (await client.get("/health")).status == 200
    assert (await client.get("/api/thing")).status == 401
    assert state.engine is not None
    assert child[GATEWAY_KEY] is state
    assert GATEWAY_KEY not in parent


ENCODED_SLASH_POLICY = """
[settings]
unmatched = "pass"

[[routes]]
name = "model"
method = "GET"
path = "/v1/{model}"
cost = 10

[[routes]]
name = "cheap"
method = "GET"
path = "/v1/cheap/**"
cost = 1
"""


async def test_the_policy_matches_the_path_the_router_matched(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    """An encoded "/" stays inside its segment for the policy, as it does for aiohttp's router.

    Matched against the decoded path, /v1/a%2Fb read as /v1/a/b: no policy route, so with
    `unmatched = "pass"` the /v1/{model} handler ran unmetered; and /v1/cheap%2Fx, which the
    router also gives to /v1/{model}, was charged as the cheap route.
    """

    async def model(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.match_info['model']} {usage(request).hold_amount}")

    gw = await gateway_factory([("GET", "/v1/{model}", model)], policy_text=ENCODED_SLASH_POLICY)
    project, secret = await project_factory(1000)
    for raw in ("/v1/a%2Fb", "/v1/cheap%2Fx"):
        resp = await gw.client.get(URL(raw, encoded=True))
        body = await problem(resp, 401, "missing-credential")
        assert body["instance"] == raw
    resp = await gw.client.get(URL("/v1/a%2Fb", encoded=True), headers=bearer(secret))
    assert (resp.status, await resp.text()) == (200, "a/b 10")
    resp = await gw.client.get(URL("/v1/cheap%2Fx", encoded=True), headers=bearer(secret))
    assert (resp.status, await resp.text()) == (200, "cheap/x 10")
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (20, 2)


PATH_READINGS_POLICY = """
[settings]
unmatched = "pass"

[[routes]]
name = "dataset"
method = "GET"
path = "{prefix}/files/dataset.bin"
cost = 100

[[routes]]
name = "deep"
method = "GET"
path = "{prefix}/files/deep/**"
cost = 100

[[routes]]
name = "chat"
method = "*"
path = "{prefix}/v1/chat/**"
cost = 10
"""


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_no_reading_of_the_path_reaches_a_handler_unmetered(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    tmp_path: Path,
    prefix: str,
) -> None:
    """Each of these reached its handler without a credential before (two reviews found them):

    - aiohttp's static files decode %2F, drop a trailing "/" or ".", and resolve ".." on
      disk after following symlinks: they are metered as the file they serve;
    - a decoded newline (%0A) stopped "**" (a regex "." without DOTALL);
    - `method = "*"` meant [A-Z]+, and aiohttp's "*" routes take M-SEARCH.
    """

    async def chat(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.match_info['id']!r} {usage(request).hold_amount}")

    (tmp_path / "sub").mkdir()
    (tmp_path / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "dataset.bin").write_text("EXPENSIVE")
    (tmp_path / "deep" / "secret.bin").write_text("SECRET")
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "inner")
    gw = await gateway_factory(
        [("*", "/v1/chat/{id}", chat)],
        policy_text=PATH_READINGS_POLICY.format(prefix=prefix),
        sub_app=prefix or None,
        static={"prefix": "/files", "path": tmp_path},
    )
    project, secret = await project_factory(1000)
    dataset = [
        "/files/dataset.bin",
        "/files/sub/%2e%2e/dataset.bin",
        "/files/%2E/dataset.bin",
        "/files/x%2F..%2Fdataset.bin",
        "/files/.%2Fdataset.bin",
        "/files/dataset.bin/",
        "/files/dataset.bin//",
        "/files/dataset.bin/%2e",
    ]
    deep = [
        "/files/deep%2Fsecret.bin",
        "/files/link/%2e%2e/secret.bin",
    ]
    for raw in [*dataset, *deep, "/v1/chat/a%0Ab"]:
        resp = await gw.client.get(URL(prefix + raw, encoded=True))
        await problem(resp, 401, "missing-credential")
    resp = await gw.client.request("M-SEARCH", prefix + "/v1/chat/x")
    await problem(resp, 401, "missing-credential")

    for raw in dataset[3:5]:
        resp = await gw.client.get(URL(prefix + raw, encoded=True), headers=bearer(secret))
        assert (resp.status, await resp.text()) == (200, "EXPENSIVE")
    resp = await gw.client.get(URL(prefix + deep[1], encoded=True), headers=bearer(secret))
    assert (resp.status, await resp.text()) == (200, "SECRET")
    resp = await gw.client.get(URL(prefix + "/v1/chat/a%0Ab", encoded=True), headers=bearer(secret))
    assert (resp.status, await resp.text()) == (200, "'a\\nb' 10")
    resp = await gw.client.request("M-SEARCH", prefix + "/v1/chat/x", headers=bearer(secret))
    assert (resp.status, await resp.text()) == (200, "'x' 10")
    # A file outside the policy's routes, and a path that leaves the directory: as before.
    assert (await gw.client.get(prefix + "/files/sub/")).status == 403
    resp = await gw.client.get(URL(prefix + "/files/%2e%2e/etc/passwd", encoded=True))
    assert resp.status in (403, 404)
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (320, 5)


async def test_a_dynamic_route_read_two_ways_is_refused(gateway_factory: GatewayFactory) -> None:
    """aiohttp gives /v1/%2E to /v1/{model} as it stands; resolved, it would be /v1/: when
    the policy names different routes for the two readings, the request is refused."""

    async def model(request: web.Request) -> web.Response:
        return web.Response(text=request.match_info["model"])

    policy = ENCODED_SLASH_POLICY.replace('path = "/v1/cheap/**"', 'path = "/v1/"')
    gw = await gateway_factory([("GET", "/v1/{model}", model)], policy_text=policy)
    body = await problem(await gw.client.get(URL("/v1/%2E", encoded=True)), 400, "invalid-request")
    assert "once its '.', '..' and empty segments are resolved" in body["detail"]
    await problem(await gw.client.get("/v1/gpt"), 401, "missing-credential")


async def test_setup_after_start_is_refused(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(BASIC_ROUTES)
    with pytest.raises(RuntimeError, match="before the application starts"):
        setup(gw.client.app, gw.state.config)


async def test_ledger_equals_what_the_gateway_committed(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    async def reported(request: web.Request) -> web.Response:
        usage(request).report(int(request.query.get("n", "0")))
        return web.Response(text="r")

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("no")

    gw = await gateway_factory(
        [("GET", "/charged", ok), ("POST", "/reported", reported), ("GET", "/boom", boom)]
    )
    projects = [await project_factory(10_000) for _ in range(3)]
    expected = dict.fromkeys([p for p, _ in projects], 0)

    async def one(i: int) -> None:
        project, secret = projects[i % 3]
        h = bearer(secret)
        kind = i % 4
        if kind == 0:
            resp = await gw.client.get("/charged", headers=h)
            if resp.status == 200:
                expected[project] += 10
            else:
                assert resp.status == 429
        elif kind in (1, 2):
            n = (i * 7) % 100
            resp = await gw.client.post(f"/reported?n={n}", headers=h)
            assert resp.status == 200
            expected[project] += n
        else:
            assert (await gw.client.get("/boom", headers=h)).status == 500

    await asyncio.gather(*(one(i) for i in range(60)))
    await gw.settle_everything()
    total = 0
    for project, _ in projects:
        charged, _entries = await usage_sum(authority_stub, authority.config.admin_token, project)
        assert charged == expected[project]
        total += charged
    assert gw.metric("creditgate_committed_credits_total", {"meter": "requests"}) == total


async def test_per_project_series_only_for_allow_listed_projects(
    gateway_factory: GatewayFactory, project_factory: ProjectFactory
) -> None:
    listed, listed_secret = await project_factory(1000)
    other, other_secret = await project_factory(1000)
    gw = await gateway_factory(BASIC_ROUTES, metrics_projects=(listed,))
    for secret in (listed_secret, other_secret):
        assert (await gw.client.get("/charged", headers=bearer(secret))).status == 200
    series = {"project": listed, "outcome": "admitted"}
    assert gw.metric("creditgate_project_decisions_total", series) == 1
    assert (
        gw.registry.get_sample_value(
            "creditgate_project_decisions_total", {"project": other, "outcome": "admitted"}
        )
        is None
    )


def test_top_n_projects_bound_the_series() -> None:
    tracker = ProjectDecisions(allow=["vip"], top_n=2)
    tracker.record("vip", True)
    for i in range(200):
        for _ in range(1 + (i % 7 == 0) * 50):
            tracker.record(f"p{i}", i % 2 == 0)
    exported = {s.labels["project"] for m in tracker.collect() for s in m.samples}
    assert "vip" in exported
    assert len(exported) == 3
    assert exported - {"vip"} <= {f"p{i}" for i in range(0, 200, 7)}


def test_a_policy_without_routes_is_said_at_setup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty or truncated policy file meters nothing: setup() says so, naming the file."""
    empty = tmp_path / "empty.toml"
    empty.write_text("# routes go here\n")
    with caplog.at_level(logging.WARNING, logger="gateway_plugin"):
        setup(web.Application(), GatewayConfig(policy=empty, registry=CollectorRegistry()))
        setup(
            web.Application(),
            GatewayConfig(
                policy=parse_policy('[settings]\nunmatched = "deny"\n', "deny.toml"),
                registry=CollectorRegistry(),
            ),
        )
        routes = parse_policy(GATEWAY_POLICY, "routes.toml")
        setup(web.Application(), GatewayConfig(policy=routes, registry=CollectorRegistry()))
    assert [r.getMessage() for r in caplog.records] == [
        f"creditgate: the policy {empty} names no routes: every request passes unmetered",
        "creditgate: the policy names no routes: every request is denied (400)",
    ]


def test_config_from_env_and_toml(tmp_path: Path) -> None:
    cfg = GatewayConfig.from_env(
        {
            "CREDITGATE_REDIS_URL": "redis://example:6380/1",
            "CREDITGATE_REDIS_CLUSTER": "yes",
            "CREDITGATE_ADMIN_TOKEN": "admin-secret",
            "CREDITGATE_TRUSTED_PROXIES": "10.0.0.0/8, ::1/128",
            "CREDITGATE_METRICS_TOP_PROJECTS": "20",
            "CREDITGATE_POLICY": "/etc/creditgate/policy.toml",
        }
    )
    assert cfg.redis_url == "redis://example:6380/1"
    assert cfg.redis_cluster is True
    assert cfg.authority_token == "admin-secret"
    assert cfg.trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert cfg.metrics_top_projects == 20
    assert cfg.policy == Path("/etc/creditgate/policy.toml")
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        '[gateway]\npolicy = "policy.toml"\nrun_flusher = false\nmetrics_path = ""\n'
        "sweep_interval_seconds = 0.5\n"
    )
    cfg = GatewayConfig.from_toml(toml)
    assert cfg.policy == tmp_path / "policy.toml"
    assert cfg.run_flusher is False
    assert cfg.metrics_path == ""
    assert cfg.sweep_interval_seconds == 0.5
    with pytest.raises(ValueError, match="unknown gateway setting"):
        GatewayConfig.from_mapping({"redis": "x"})
    with pytest.raises(ValueError, match=r"^CREDITGATE_RUN_FLUSHER: run_flusher: .*boolean"):
        GatewayConfig.from_env({"CREDITGATE_RUN_FLUSHER": "perhaps"})
    # A file's errors name the file and the line of the setting (as policy errors do).
    for body, message in (
        (
            '[other]\nx = 1\n\n[gateway]\npolicy = "p.toml"\nrun_wach = true\n',
            ":6: gateway.run_wach: unknown",
        ),
        ("[gateway]\nsweep_interval_seconds = 0\n", ":2: gateway.sweep_interval_seconds: "),
        ('[gateway]\nmetrics_top_projects = "many"\n', ":2: gateway.metrics_top_projects: "),
        ("[gateway]\nrun_flusher = \n", ": Invalid value (at line 2"),
    ):
        toml.write_text(body)
        with pytest.raises(ValueError) as refused:
            GatewayConfig.from_toml(toml)
        assert str(refused.value).startswith(f"{toml}{message}"), str(refused.value)
    with pytest.raises(ValueError, match="policy is required"):
        setup(web.Application(), GatewayConfig())
    # The id travels in every settlement event, and the authority takes at most 128
    # characters: a longer one would leave every commit of the gateway uncharged.
    assert GatewayConfig(gateway_id="g" * 128).gateway_id == "g" * 128
    for bad, why in (("", "must not be empty"), ("g" * 129, "129 characters long")):
        with pytest.raises(ValueError, match=why):
            GatewayConfig(gateway_id=bad)
        with pytest.raises(ValueError, match=why):
            Store(aioredis.Redis(), gateway_id=bad)  # every other way to an engine


class _Refusals(logging.Handler):
    """Sets `repeated` once the Watch subscriber has been refused four times more (DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.repeated = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Watch still refused"):
            self.count += 1
            if self.count >= 4:
                self.repeated.set()


async def test_an_empty_authority_token_says_how_to_set_it_and_watch_backs_off(
    authority: AuthorityServer,
    gateway_redis: RedisProcess,
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`creditgate gateway serve` without --token: the warning names --token, and the Watch
    subscriber, refused by the authority, says so once instead of every second."""
    registry = CollectorRegistry()
    config = GatewayConfig(
        policy=parse_policy(GATEWAY_POLICY, "test-policy.toml"),
        redis_url=gateway_redis.url,
        authority_target=authority.grpc_target,
        authority_token="",
        registry=registry,
    )
    app = web.Application()
    app.router.add_get("/charged", ok)
    setup(app, config)
    refusals = _Refusals()
    watch_log = logging.getLogger("admission.cache")
    watch_log.addHandler(refusals)
    level = watch_log.level
    watch_log.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.INFO):
            await aiohttp_client(app)
            # Refusals 1-5 come 0.05 + 0.1 + 0.2 + 0.4 s apart (the backoff); the 2nd to 5th
            # are logged at DEBUG only.
            async with asyncio.timeout(10):
                await refusals.repeated.wait()
    finally:
        watch_log.removeHandler(refusals)
        watch_log.setLevel(level)
    messages = [r.getMessage() for r in caplog.records]
    (empty,) = [m for m in messages if "authority_token is empty" in m]
    assert "--token / CREDITGATE_ADMIN_TOKEN" in empty
    watch = [
        r.getMessage()
        for r in caplog.records
        if r.name == "admission.cache" and r.levelno >= logging.INFO
    ]
    assert len(watch) == 1, watch
    assert "the authority refused the gateway's token: set --token" in watch[0]


async def test_metrics_endpoint_bypasses_a_catch_all_route(gateway_factory: GatewayFactory) -> None:
    catch_all = '\n[[routes]]\nname = "everything"\npath = "/**"\ncost = 1\n'
    gw = await gateway_factory(BASIC_ROUTES, policy_text=GATEWAY_POLICY + catch_all)
    assert (await gw.client.get("/metrics")).status == 200
    await problem(await gw.client.get("/plain"), 401, "missing-credential")
    # A path the app does not route meets no admission (nothing to charge or count): 404.
    assert (await gw.client.get("/free-for-all")).status == 404
    assert (
        gw.metric(
            "creditgate_decisions_total", {"outcome": "denied", "reason": "missing-credential"}
        )
        == 1
    )


async def test_dashboard_on_a_plugin_app(
    authority: AuthorityServer,
    gateway_redis: RedisProcess,
    project_factory: ProjectFactory,
    aiohttp_client: Any,
) -> None:
    """The live dashboard is not only the standalone gateway's: setup_dashboard() adds it to
    any app protected by setup(), and its routes bypass admission (unmatched = "deny")."""
    token = authority.config.admin_token
    config = GatewayConfig(
        policy=parse_policy(GATEWAY_POLICY, "test-policy.toml"),
        redis_url=gateway_redis.url,
        authority_target=authority.grpc_target,
        authority_token=token,
        gateway_id=f"dash-{secrets.token_hex(4)}",
        registry=CollectorRegistry(),
    )
    app = web.Application()
    app.router.add_get("/charged", ok)
    setup(app, config)
    setup_dashboard(app, DashboardConfig.from_gateway(config))
    client = await aiohttp_client(app)
    project, secret = await project_factory(1000)
    assert (await client.get("/charged", headers=bearer(secret))).status == 200

    page = await client.get("/_creditgate/dashboard/")
    assert page.status == 200 and page.content_type == "text/html"
    refused = await client.get("/_creditgate/stats", headers=bearer(secret))
    assert (refused.status, refused.headers["Content-Type"]) == (401, "application/problem+json")
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="creditgate-dashboard"'
    body = await refused.json(content_type=None)
    assert (body["type"], body["instance"]) == (
        "urn:creditgate:problem:dashboard-unauthorized",
        "/_creditgate/stats",
    )
    resp = await client.get("/_creditgate/stats", headers=bearer(token))
    assert resp.status == 200
    stats = await resp.json()
    assert stats["decisions"]["by_reason"] == {"admitted": 1}
    assert [w["project"] for w in stats["wallets"]] == [project]


async def test_plugin_on_redis_cluster(
    gateway_factory: GatewayFactory,
    project_factory: ProjectFactory,
    redis_cluster_proc: RedisCluster,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
) -> None:
    """The whole plugin (leases, flusher polling each shard's node, sweeper) on a 3-master
    Redis Cluster: admitted, denied at the quota, and the ledger matches the commits."""
    gw = await gateway_factory(BASIC_ROUTES, redis_url=redis_cluster_proc.url, redis_cluster=True)
    project, secret = await project_factory(1000)
    statuses = []
    for _ in range(6):
        resp = await gw.client.get("/charged", headers=bearer(secret))
        statuses.append(resp.status)
    assert statuses == [200] * 5 + [429]  # the "requests" quota: 5 per 60 s
    await gw.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (50, 5)
