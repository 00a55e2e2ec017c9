"""The authority's REST/JSON mapping against a running authority: every route, problem+json
errors, strict integer input, NDJSON streams, the OpenAPI document, idempotency across transports.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from creditservice.openapi import ROUTES, document
from creditservice.rest import build_app, problem_middleware
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from tests.fixtures_authority import admin_md, authority_config, new_project_id

PROBLEM = "application/problem+json"


class Api:
    """A tiny JSON client of the REST mapping; every call returns (status, body, headers)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str | None) -> None:
        self.session = session
        self.base = base
        self.token = token

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        chosen = token if token is not None else self.token
        out = {"Authorization": f"Bearer {chosen}"} if chosen else {}
        return out | extra

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: str | None = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
    ) -> tuple[int, Any, Any]:
        hdrs = self.headers(token) | (headers or {})
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        async with self.session.request(
            method, self.base + path, data=data, headers=hdrs, params=params
        ) as resp:
            text = await resp.text()
            parsed = json.loads(text) if text else None
            return resp.status, parsed, resp.headers

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, parsed, _ = await self.call(method, path, body, **kw)
        assert status == 200, (status, parsed)
        return parsed

    async def problem(
        self, status: int, slug: str, method: str, path: str, body: Any = None, **kw: Any
    ) -> dict[str, Any]:
        got, parsed, headers = await self.call(method, path, body, **kw)
        assert got == status, (got, parsed)
        assert headers["Content-Type"].startswith(PROBLEM)
        assert parsed["type"] == f"urn:creditgate:problem:{slug}", parsed
        assert parsed["status"] == status
        assert parsed["title"] and parsed["detail"] is not None
        assert parsed["instance"] == path.split("?", maxsplit=1)[0]
        assert isinstance(parsed, dict)
        return parsed


@pytest.fixture
async def api(authority: AuthorityServer) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, authority.http_url, authority.config.admin_token)


async def new_wallet(api: Api, balance: int = 0, **policy: Any) -> str:
    pid = new_project_id("rest")
    body = {"request_id": f"c-{pid}", "project_id": pid, "organization_id": "org-rest"} | policy
    await api.ok("POST", "/v1/wallets", body)
    if balance:
        await api.ok(
            "POST", f"/v1/wallets/{pid}/topup", {"request_id": f"t-{pid}", "amount": balance}
        )
    return pid


async def issue_key(api: Api, pid: str) -> tuple[str, str]:
    issued = await api.ok("POST", f"/v1/projects/{pid}/keys", {"request_id": f"k-{pid}"})
    return issued["key"]["key_id"], issued["secret"]


# ---------------------------------------------------------------- document


async def test_openapi_lists_every_route_and_nothing_else(authority: AuthorityServer) -> None:
    app = build_app(authority.core)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    doc = document()
    described = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert served == described
    assert {r.rpc for r in ROUTES if r.rpc} == set(
        pb.DESCRIPTOR.services_by_name["CreditService"].methods_by_name
    )
    # every $ref resolves; schemas come from the descriptors
    text = json.dumps(doc)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in doc["components"]["schemas"], name
    wallet = doc["components"]["schemas"]["Wallet"]
    assert set(wallet["properties"]) == {f.name for f in pb.Wallet.DESCRIPTOR.fields}
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_openapi_and_health_are_served_without_credential(api: Api) -> None:
    doc = await api.ok("GET", "/openapi.json", token="")
    assert doc == json.loads(json.dumps(document()))
    assert await api.ok("GET", "/healthz", token="") == {"status": "ok"}


# ---------------------------------------------------------------- happy paths


async def test_wallet_routes(api: Api) -> None:
    pid = new_project_id("rest")
    created = await api.ok(
        "POST",
        "/v1/wallets",
        {"project_id": pid, "organization_id": "org-w", "low_balance_threshold": "100"},
        headers={"Idempotency-Key": f"create-{pid}"},
    )
    assert created["wallet"]["project_id"] == pid
    assert created["wallet"]["balance"] == "0"  # int64 as a string in output

    topped = await api.ok(
        "POST", f"/v1/wallets/{pid}/topup", {"request_id": f"t1-{pid}", "amount": 500}
    )
    assert topped["wallet"]["balance"] == "500"
    assert topped["entry"]["kind"] == "TOPUP"
    topped = await api.ok(
        "POST", f"/v1/wallets/{pid}/topup", {"request_id": f"t2-{pid}", "amount": "250"}
    )
    assert topped["wallet"]["balance"] == "750"
    assert topped["wallet"]["state"] == "HEALTHY"

    adjusted = await api.ok(
        "POST",
        f"/v1/wallets/{pid}/adjustments",
        {"request_id": f"a-{pid}", "kind": "SLA_CREDIT", "amount": 25, "reason": "outage"},
    )
    assert adjusted["entry"]["kind"] == "SLA_CREDIT"
    assert adjusted["wallet"]["balance"] == "775"

    shown = await api.ok("GET", f"/v1/wallets/{pid}")
    assert shown["wallet"]["balance"] == "775"
    listed = await api.ok("GET", "/v1/wallets", params={"organization_id": "org-w"})
    assert [w["project_id"] for w in listed["wallets"]] == [pid]

    page = await api.ok("GET", f"/v1/wallets/{pid}/transactions", params={"page_size": "2"})
    assert [e["kind"] for e in page["entries"]] == ["SLA_CREDIT", "TOPUP"]
    assert page["next_page_token"]
    rest = await api.ok(
        "GET",
        f"/v1/wallets/{pid}/transactions",
        params={"page_size": "2", "page_token": page["next_page_token"]},
    )
    assert [e["amount"] for e in rest["entries"]] == ["500"]

    policy = await api.ok(
        "PUT",
        f"/v1/wallets/{pid}/policy",
        {
            "request_id": f"p-{pid}",
            "low_balance_threshold": 1000,
            "grace_period_seconds": 3600,
            "overdraft_limit": 0,
        },
    )
    assert policy["wallet"]["state"] == "LOW"
    assert policy["wallet"]["grace_period_seconds"] == "3600"

    await api.ok(
        "POST",
        "/v1/usage",
        {
            "request_id": f"u-{pid}",
            "project_id": pid,
            "meter": "machine_hours",
            "amount": 75,
            "quantity": 3,
        },
    )
    usage = await api.ok("GET", f"/v1/wallets/{pid}/usage", params={"since_ms": "0"})
    assert usage["total_amount"] == "75"
    assert [(m["meter"], m["amount"]) for m in usage["meters"]] == [("machine_hours", "75")]


async def test_quota_routes(api: Api) -> None:
    pid = await new_wallet(api)
    path = f"/v1/projects/{pid}/quotas/requests"
    quota = await api.ok(
        "PUT",
        path,
        {
            "request_id": f"q-{pid}",
            "quota": {"algorithm": "SLIDING_WINDOW", "limit": 100, "window_seconds": 60},
        },
    )
    assert quota["quota"] | {"version": "", "updated_at_ms": ""} == {
        "project_id": pid,
        "name": "requests",
        "algorithm": "SLIDING_WINDOW",
        "limit": "100",
        "window_seconds": "60",
        "version": "",
        "updated_at_ms": "",
    }
    await api.ok(
        "PUT",
        f"/v1/projects/{pid}/quotas/inflight",
        {"quota": {"algorithm": "CONCURRENCY", "limit": 5}},
        headers={"Idempotency-Key": f"q2-{pid}"},
    )
    got = await api.ok("GET", path)
    assert got["quota"]["limit"] == "100"
    listed = await api.ok("GET", f"/v1/projects/{pid}/quotas")
    assert sorted(q["name"] for q in listed["quotas"]) == ["inflight", "requests"]
    deleted = await api.ok("DELETE", path, headers={"Idempotency-Key": f"d-{pid}"})
    assert deleted["quota"]["name"] == "requests"
    await api.problem(404, "not-found", "GET", path)
    # the path names the quota; a body naming another one is refused
    body = {
        "request_id": f"q3-{pid}",
        "quota": {"name": "other", "algorithm": "SLIDING_WINDOW", "limit": 1, "window_seconds": 1},
    }
    problem = await api.problem(400, "invalid-argument", "PUT", path, body)
    assert "quota.name" in problem["detail"]


async def test_reservation_settlement_admission_snapshot_routes(api: Api) -> None:
    pid = await new_wallet(api, balance=1000)
    reserved = await api.ok(
        "POST", "/v1/reservations", {"request_id": f"r1-{pid}", "project_id": pid, "amount": 300}
    )
    rid = reserved["reservation"]["reservation_id"]
    assert reserved["reservation"]["state"] == "ACTIVE"
    assert reserved["wallet"]["available"] == "700"
    got = await api.ok("GET", f"/v1/reservations/{rid}")
    assert got["reservation"]["amount"] == "300"
    committed = await api.ok(
        "POST", f"/v1/reservations/{rid}/commit", {"request_id": f"c1-{pid}", "amount": 120}
    )
    assert committed["reservation"]["state"] == "COMMITTED"
    assert committed["wallet"]["balance"] == "880"

    second = await api.ok(
        "POST", "/v1/reservations", {"request_id": f"r2-{pid}", "project_id": pid, "amount": 50}
    )
    rid2 = second["reservation"]["reservation_id"]
    released = await api.ok(
        "POST", f"/v1/reservations/{rid2}/release", headers={"Idempotency-Key": f"x-{pid}"}
    )
    assert released["reservation"]["state"] == "RELEASED"

    settled = await api.ok(
        "POST",
        "/v1/settle",
        {
            "events": [
                {
                    "event_id": f"e1-{pid}",
                    "kind": "COMMIT",
                    "project_id": pid,
                    "hold_id": f"h1-{pid}",
                    "held_amount": 10,
                    "amount": 10,
                    "occurred_at_ms": "1767225600000",
                }
            ]
        },
    )
    assert settled["results"][0]["status"] == "APPLIED"
    assert settled["wallets"][0]["balance"] == "870"

    check = await api.ok("POST", "/v1/admission/check", {"project_id": pid, "cost": 10})
    assert check["allowed"] is True
    assert check["reason"] == "ADMISSION_REASON_ADMITTED"
    check = await api.ok("POST", "/v1/admission/check", {"project_id": pid, "cost": 10**6})
    assert check["allowed"] is False

    snap = await api.ok("GET", f"/v1/projects/{pid}/snapshot")
    assert snap["snapshot"]["wallet"]["balance"] == "870"
    assert int(snap["snapshot"]["cursor"]) > 0


async def test_key_routes_and_project_credentials(api: Api) -> None:
    pid = await new_wallet(api, balance=10)
    key_id, secret = await issue_key(api, pid)
    assert secret.startswith("cg_") and len(secret) == 46
    digest = hashlib.sha256(secret.encode()).hexdigest()
    resolved = await api.ok("GET", f"/v1/keys/by-hash/{digest}")
    assert resolved["key"]["key_id"] == key_id
    assert "secret" not in resolved

    # a project key reads its own project
    own = await api.ok("GET", f"/v1/wallets/{pid}", token=secret)
    assert own["wallet"]["project_id"] == pid
    # ... but never another project, nor an admin route
    other = await new_wallet(api)
    await api.problem(403, "permission-denied", "GET", f"/v1/wallets/{other}", token=secret)
    await api.problem(
        403,
        "permission-denied",
        "POST",
        f"/v1/wallets/{pid}/topup",
        {"request_id": "self-funding", "amount": 5},
        token=secret,
    )
    await api.problem(403, "permission-denied", "GET", "/v1/export", token=secret)

    revoked = await api.ok("POST", f"/v1/keys/{key_id}/revoke", {"request_id": f"rv-{pid}"})
    assert int(revoked["key"]["revoked_at_ms"]) > 0
    await api.problem(401, "unauthenticated", "GET", f"/v1/wallets/{pid}", token=secret)


# ---------------------------------------------------------------- errors


async def test_credentials_are_required(api: Api) -> None:
    pid = await new_wallet(api)
    await api.problem(401, "unauthenticated", "GET", f"/v1/wallets/{pid}", token="")
    _, _, headers = await api.call("GET", f"/v1/wallets/{pid}", token="")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    await api.problem(401, "unauthenticated", "GET", f"/v1/wallets/{pid}", token="not-a-token")
    await api.problem(
        401,
        "unauthenticated",
        "GET",
        f"/v1/wallets/{pid}",
        token="",
        headers={"Authorization": "Basic dXNlcjpwdw=="},
    )


@pytest.mark.parametrize(
    ("raw_amount", "words"),
    [
        ("1.5", ["amount", "integer"]),
        ("1e3", ["amount", "integer"]),
        ("1.0", ["amount", "integer"]),
        ('"1.0"', ["amount", "integer"]),
        ('"abc"', ["amount", "integer"]),
        ("true", ["amount", "integer"]),
        ("[1]", ["amount", "integer"]),
        ("-5", ["amount"]),
        ("0", ["amount"]),
        ("1000000000000001", ["amount", "maximum"]),
        ("9223372036854775808", ["amount", "range"]),
    ],
)
async def test_bad_amounts_are_refused_naming_the_field(
    api: Api, authority: AuthorityServer, raw_amount: str, words: list[str]
) -> None:
    pid = await new_wallet(api)
    raw = f'{{"request_id": "bad-amount", "amount": {raw_amount}}}'
    problem = await api.problem(
        400, "invalid-argument", "POST", f"/v1/wallets/{pid}/topup", raw=raw
    )
    for word in words:
        assert word in problem["detail"], problem
    shown = await api.ok("GET", f"/v1/wallets/{pid}")
    assert shown["wallet"]["balance"] == "0"


async def test_malformed_input_is_a_problem(api: Api) -> None:
    pid = await new_wallet(api)
    path = f"/v1/wallets/{pid}/topup"
    problem = await api.problem(400, "invalid-argument", "POST", path, raw='{"amount": ')
    assert "malformed JSON" in problem["detail"]
    problem = await api.problem(400, "invalid-argument", "POST", path, raw="[1, 2]")
    assert "JSON object" in problem["detail"]
    problem = await api.problem(
        400, "invalid-argument", "POST", path, {"request_id": "x", "amount": 5, "amont": 5}
    )
    assert "amont" in problem["detail"] and "unknown field" in problem["detail"]
    problem = await api.problem(
        400, "invalid-argument", "POST", path, {"request_id": 7, "amount": 5}
    )
    assert "request_id" in problem["detail"]
    problem = await api.problem(
        400,
        "invalid-argument",
        "POST",
        "/v1/settle",
        {
            "events": [
                {
                    "event_id": "e",
                    "kind": "COMMIT",
                    "project_id": pid,
                    "hold_id": "h",
                    "held_amount": 1,
                    "amount": 1.5,
                }
            ]
        },
    )
    assert "events[0].amount" in problem["detail"]
    problem = await api.problem(
        400,
        "invalid-argument",
        "GET",
        f"/v1/wallets/{pid}/transactions",
        params={"page_size": "1.5"},
    )
    assert "page_size" in problem["detail"]
    problem = await api.problem(
        400, "invalid-argument", "GET", "/v1/wallets", params={"colour": "blue"}
    )
    assert "colour" in problem["detail"]
    problem = await api.problem(
        400,
        "invalid-argument",
        "POST",
        f"/v1/wallets/{pid}/adjustments",
        {"request_id": "k", "kind": "BONUS", "amount": 5, "reason": "r"},
    )
    assert "kind" in problem["detail"]
    # the path names the project; a body naming another one is refused
    problem = await api.problem(
        400,
        "invalid-argument",
        "POST",
        path,
        {"request_id": "p", "project_id": "someone-else", "amount": 5},
    )
    assert "project_id" in problem["detail"]


async def test_not_found_conflict_and_unknown_routes(api: Api) -> None:
    await api.problem(404, "not-found", "GET", "/v1/wallets/no-such-project")
    await api.problem(
        404,
        "not-found",
        "POST",
        "/v1/wallets/no-such-project/topup",
        {"request_id": "nf", "amount": 5},
    )
    pid = await new_wallet(api)
    path = f"/v1/wallets/{pid}/topup"
    await api.ok("POST", path, {"request_id": f"same-{pid}", "amount": 5})
    problem = await api.problem(
        409, "failed-precondition", "POST", path, {"request_id": f"same-{pid}", "amount": 6}
    )
    assert problem["detail"]
    await api.problem(
        409,
        "already-exists",
        "POST",
        "/v1/wallets",
        {"request_id": f"again-{pid}", "project_id": pid, "organization_id": "org-rest"},
    )
    await api.problem(404, "not-found", "GET", "/v1/nothing-here")
    _, _, headers = await api.call("DELETE", f"/v1/wallets/{pid}")
    assert headers["Content-Type"].startswith(PROBLEM)
    await api.problem(405, "method-not-allowed", "DELETE", f"/v1/wallets/{pid}")


# ---------------------------------------------------------------- idempotency across transports


async def test_rest_and_grpc_twins_give_the_same_result(
    api: Api, authority: AuthorityServer, authority_stub: Any
) -> None:
    pid = await new_wallet(api)
    rid = f"twin-{pid}"
    via_rest = await api.ok(
        "POST",
        f"/v1/wallets/{pid}/topup",
        {"amount": 40, "reference": "pay-1"},
        headers={"Idempotency-Key": rid},
    )
    via_grpc = await authority_stub.TopUp(
        pb.TopUpRequest(request_id=rid, project_id=pid, amount=40, reference="pay-1"),
        metadata=admin_md(authority.config.admin_token),
        timeout=10,
    )
    assert via_rest["entry"]["seq"] == str(via_grpc.entry.seq)
    assert via_rest["wallet"]["balance"] == str(via_grpc.wallet.balance) == "40"
    again = await api.ok(
        "POST",
        f"/v1/wallets/{pid}/topup",
        {"request_id": rid, "amount": "40", "reference": "pay-1"},
    )
    assert again == via_rest
    problem = await api.problem(
        400,
        "invalid-argument",
        "POST",
        f"/v1/wallets/{pid}/topup",
        {"request_id": rid, "amount": 40},
        headers={"Idempotency-Key": "other-id"},
    )
    assert "Idempotency-Key" in problem["detail"]


# ---------------------------------------------------------------- streams


async def read_line(resp: aiohttp.ClientResponse, timeout_s: float = 5.0) -> dict[str, Any]:
    line = await asyncio.wait_for(resp.content.readline(), timeout_s)
    assert line, "stream ended"
    parsed: dict[str, Any] = json.loads(line)
    return parsed


async def test_watch_stream_delivers_a_topup(api: Api) -> None:
    pid = await new_wallet(api)
    snap = await api.ok("GET", f"/v1/projects/{pid}/snapshot")
    cursor = snap["snapshot"]["cursor"]
    url = f"{api.base}/v1/watch"
    params = {"after_cursor": cursor, "project_ids": pid}
    async with api.session.get(url, params=params, headers=api.headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        await api.ok("POST", f"/v1/wallets/{pid}/topup", {"request_id": f"w-{pid}", "amount": 321})
        while True:
            event = await read_line(resp)
            if "wallet" in event:
                break
        assert event["project_id"] == pid
        assert event["wallet"]["balance"] == "321"
        assert int(event["cursor"]) > int(cursor)


async def test_watch_errors_before_the_stream_are_problems(api: Api) -> None:
    pid = await new_wallet(api)
    _, secret = await issue_key(api, pid)
    other = await new_wallet(api)
    await api.problem(401, "unauthenticated", "GET", "/v1/watch", token="")
    await api.problem(
        403,
        "permission-denied",
        "GET",
        "/v1/watch",
        token=secret,
        params={"project_ids": other},
    )
    await api.problem(400, "invalid-argument", "GET", "/v1/watch", params={"after_cursor": "soon"})


async def test_export_import_round_trip_into_a_fresh_authority(api: Api, tmp_path: Path) -> None:
    pid = await new_wallet(api, balance=900, low_balance_threshold=100)
    await api.ok(
        "PUT",
        f"/v1/projects/{pid}/quotas/rpm",
        {
            "request_id": f"q-{pid}",
            "quota": {"algorithm": "SLIDING_WINDOW", "limit": 60, "window_seconds": 60},
        },
    )
    await issue_key(api, pid)
    await api.ok(
        "POST",
        "/v1/usage",
        {
            "request_id": f"u-{pid}",
            "project_id": pid,
            "meter": "requests",
            "amount": 33,
            "quantity": 33,
        },
    )
    async with api.session.get(f"{api.base}/v1/export", headers=api.headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        body = await resp.text()
    lines = [json.loads(line) for line in body.splitlines()]
    assert "header" in lines[0] and "trailer" in lines[-1]

    async with AuthorityServer(authority_config(f"sqlite:///{tmp_path / 'b.db'}")) as fresh:
        fresh_api = Api(api.session, fresh.http_url, fresh.config.admin_token)
        imported = await fresh_api.ok(
            "POST",
            "/v1/import",
            token=fresh.config.admin_token,
            raw=body,
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert imported["digest"] == lines[-1]["trailer"]["digest"]
        assert imported["ledger_entries"] == lines[-1]["trailer"]["ledger_entries"]
        before = await api.ok("GET", f"/v1/wallets/{pid}")
        after = await fresh_api.ok("GET", f"/v1/wallets/{pid}")
        assert after == before
        assert after["wallet"]["balance"] == "867"
        quotas = await fresh_api.ok("GET", f"/v1/projects/{pid}/quotas")
        assert [q["name"] for q in quotas["quotas"]] == ["rpm"]
        # a second export of the copy is the same stream, header (and so digest) aside
        async with api.session.get(
            f"{fresh.http_url}/v1/export", headers=fresh_api.headers()
        ) as resp:
            copy = [json.loads(line) for line in (await resp.text()).splitlines()]
        assert copy[1:-1] == lines[1:-1]
        for trailer in (copy[-1]["trailer"], lines[-1]["trailer"]):
            del trailer["digest"]
        assert copy[-1] == lines[-1]


async def test_import_refuses_a_bad_line_naming_it(api: Api, tmp_path: Path) -> None:
    async with AuthorityServer(authority_config(f"sqlite:///{tmp_path / 'c.db'}")) as fresh:
        fresh_api = Api(api.session, fresh.http_url, fresh.config.admin_token)
        raw = '{"header": {"format_version": 1}}\n{"wallet": {"balance": 1.5}}\n'
        problem = await fresh_api.problem(400, "invalid-argument", "POST", "/v1/import", raw=raw)
        assert "line 2" in problem["detail"] and "wallet.balance" in problem["detail"]
        listed = await fresh_api.ok("GET", "/v1/wallets")
        assert listed["wallets"] == []


async def test_watch_ends_with_a_problem_line_when_the_key_is_revoked(api: Api) -> None:
    pid = await new_wallet(api)
    key_id, secret = await issue_key(api, pid)
    snap = await api.ok("GET", f"/v1/projects/{pid}/snapshot", token=secret)
    params = {"after_cursor": snap["snapshot"]["cursor"], "project_ids": pid}
    async with api.session.get(
        f"{api.base}/v1/watch", params=params, headers=api.headers(secret)
    ) as resp:
        assert resp.status == 200
        await api.ok("POST", f"/v1/keys/{key_id}/revoke", {"request_id": f"rv-{pid}"})
        while True:
            line = await read_line(resp)
            if "error" in line:
                break
        assert line["error"]["type"] == "urn:creditgate:problem:unauthenticated"
        assert line["error"]["status"] == 401
        assert await asyncio.wait_for(resp.content.readline(), 5) == b""


async def test_unexpected_errors_leak_nothing(aiohttp_client: Any) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("password=hunter2 at /srv/db")

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/boom", broken)
    client = await aiohttp_client(app)
    resp = await client.get("/boom")
    assert resp.status == 500
    assert resp.headers["Content-Type"].startswith(PROBLEM)
    body = await resp.json(content_type=None)
    assert body == {
        "type": "urn:creditgate:problem:internal",
        "title": "Internal error",
        "status": 500,
        "detail": "internal error",
        "instance": "/boom",
    }
