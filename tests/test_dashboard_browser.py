"""The operator dashboard in a real headless Chromium, against the real stack."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from playwright.async_api import async_playwright
from prometheus_client import CollectorRegistry

from admission.policy import parse_policy
from creditservice.server import AuthorityServer
from gateway_plugin.config import GatewayConfig
from gateway_plugin.dashboard import histogram_quantile, wallet_row
from gateway_plugin.proxy import ProxyConfig, build_gateway_app
from gateway_plugin.sample_upstream import make_sample_upstream
from tests.fixtures_gateway import ProjectFactory, bearer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
POLICY = """
[settings]
shards = 4
unmatched = "deny"

[quotas.requests]
kind = "rate"
limit = 3
window_seconds = 3600

[[routes]]
name = "hello"
method = "GET"
path = "/v1/hello"
cost = 2
quotas = ["requests"]

[[routes]]
name = "report"
method = "POST"
path = "/v1/report"
cost = 100000
"""


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.001, 50.0), (0.002, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == 0.001
    assert histogram_quantile(0.75, buckets) == 0.0015
    assert histogram_quantile(0.99, []) is None
    assert histogram_quantile(0.99, [(0.001, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.99, [(0.001, 1.0), (math.inf, 10.0)]) == 0.001


def test_wallet_row_arithmetic() -> None:
    row = wallet_row(
        "p", {"snap": "100", "held": "7", "uns": "3", "od": "10", "state": "2", "ver": "4"}
    )
    assert row == {
        "project": "p",
        "state": "LOW",
        "snapshot": 100,
        "held": 7,
        "unsettled": 3,
        "available": 100,
        "version": 4,
    }


async def test_dashboard_shows_live_decisions(
    tmp_path: Path,
    aiohttp_server: Any,
    redis_url: str,
    authority: AuthorityServer,
    project_factory: ProjectFactory,
) -> None:
    upstream = await aiohttp_server(make_sample_upstream())
    token = authority.config.admin_token
    cfg = GatewayConfig(
        policy=parse_policy(POLICY, "dashboard-policy.toml"),
        redis_url=redis_url,
        authority_target=authority.grpc_target,
        authority_token=token,
        gateway_id=f"dash-{uuid.uuid4().hex[:8]}",
        registry=CollectorRegistry(),
    )
    app = build_gateway_app(cfg, ProxyConfig(upstream=str(upstream.make_url("")).rstrip("/")))
    gateway: TestServer = await aiohttp_server(app)
    base = str(gateway.make_url("")).rstrip("/")
    project, secret = await project_factory(1000)

    statuses = []
    async with aiohttp.ClientSession(headers=bearer(secret)) as http:
        for _ in range(5):
            async with http.get(base + "/v1/hello") as r:
                statuses.append(r.status)
        async with http.post(base + "/v1/report") as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 200, 429, 429, 402]

    # The stats need the admin token; a project key is not enough.
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/_creditgate/stats") as r:
            assert r.status == 401
        async with http.get(base + "/_creditgate/stats", headers=bearer(secret)) as r:
            assert r.status == 401
        async with http.get(base + "/_creditgate/stats", headers=bearer(token)) as r:
            assert r.status == 200
            stats = await r.json()
    assert stats["decisions"]["by_reason"] == {
        "admitted": 3,
        "rate-limited": 2,
        "insufficient-credits": 1,
    }

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{base}/_creditgate/dashboard#token={token}")
            await page.wait_for_function(
                """() => {
                    const get = (id) => document.querySelector(`[data-testid="${id}"]`);
                    return get("count-admitted")?.textContent === "3"
                        && get("count-rate-limited")?.textContent === "2"
                        && get("count-insufficient-credits")?.textContent === "1";
                }""",
                timeout=15_000,
            )
            assert await page.text_content("#decisions-total") == "6"
            assert await page.text_content("#decisions-admitted") == "3"
            assert await page.text_content("#decisions-denied") == "3"
            assert "ms" in (await page.text_content("#latency-p99") or "") or "µs" in (
                await page.text_content("#latency-p99") or ""
            )
            await page.wait_for_selector(f'[data-testid="wallet-{project}"]', timeout=15_000)
            # Three admitted requests at cost 2 are held or committed: 6 off the 1000.
            await page.wait_for_function(
                f"""() => document.querySelector('[data-testid="available-{project}"]')
                        ?.textContent === "994" """,
                timeout=15_000,
            )
            # The token left the address bar once read.
            assert "#token" not in page.url
            assert await page.text_content("#status") == "live"
            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert errors == []

            # Without a token the page asks for one instead of showing data.
            fresh = await browser.new_page()
            await fresh.goto(f"{base}/_creditgate/dashboard")
            await fresh.wait_for_selector("#login:not([hidden])", timeout=15_000)
            assert await fresh.is_hidden("#main")
        finally:
            await browser.close()
