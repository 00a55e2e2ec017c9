"""The live operator dashboard: a static page (package data) and the JSON it polls.

Access rule: the page itself holds nothing and is served to anyone; `/_creditgate/stats` answers
only to `Authorization: Bearer <admin token>`. The page reads the token from its URL fragment
(`/_creditgate/dashboard#token=...`, never sent to the server nor logged) or asks for it.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from admission import keys
from admission.decision import WalletState
from gateway_plugin.config import GatewayConfig
from gateway_plugin.problems import problem_http, problem_members

PREFIX = "/_creditgate"
_STATIC = ("dashboard.html", "dashboard.js", "dashboard.css")
_CONTENT_TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css"}

# Metric families read from the registry (names without the _total/_bucket suffixes).
DECISIONS = "creditgate_decisions"
ADMISSION_LATENCY = "creditgate_admission_duration_seconds"
SETTLED_EVENTS = "creditgate_settle_events"
SETTLE_ERRORS = "creditgate_settle_errors"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """What the dashboard reads and who may read it."""

    admin_token: str
    redis_url: str
    redis_cluster: bool = False
    shards: int = keys.DEFAULT_SHARDS
    gateway_id: str = ""
    # None: prometheus_client's global REGISTRY, or every worker's files in multiprocess mode.
    registry: CollectorRegistry | None = None
    recent_projects: int = 20

    @classmethod
    def from_gateway(cls, config: GatewayConfig, *, shards: int | None = None) -> DashboardConfig:
        return cls(
            admin_token=config.authority_token,
            redis_url=config.redis_url,
            redis_cluster=config.redis_cluster,
            shards=shards if shards is not None else _policy_shards(config),
            gateway_id=config.gateway_id,
            registry=config.registry,
        )


def _policy_shards(config: GatewayConfig) -> int:
    settings = getattr(config.policy, "settings", None)
    return int(getattr(settings, "shards", keys.DEFAULT_SHARDS))


@dataclass
class _State:
    config: DashboardConfig
    recent: OrderedDict[str, None]
    redis: Any = None  # redis.asyncio.Redis | RedisCluster, created on startup


DASHBOARD = web.AppKey("creditgate_dashboard", _State)


# ---------------------------------------------------------------- pure metric arithmetic


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # the highest finite bound: all we know
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def metric_figures(registry: CollectorRegistry) -> dict[str, Any]:
    """Decisions per reason, admission latency quantiles and settle totals from a registry."""
    by_reason: dict[str, float] = {}
    admitted = denied = 0.0
    buckets: dict[float, float] = {}
    settled = errors = 0.0
    for family in registry.collect():
        for s in family.samples:
            if s.name == DECISIONS + "_total":
                reason = s.labels.get("reason", "")
                by_reason[reason] = by_reason.get(reason, 0.0) + s.value
                if s.labels.get("outcome") == "admitted":
                    admitted += s.value
                else:
                    denied += s.value
            elif s.name == ADMISSION_LATENCY + "_bucket":
                bound = float(s.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + s.value
            elif s.name == SETTLED_EVENTS + "_total":
                settled += s.value
            elif s.name == SETTLE_ERRORS + "_total":
                errors += s.value
    pairs = list(buckets.items())
    return {
        "decisions": {
            "total": int(admitted + denied),
            "admitted": int(admitted),
            "denied": int(denied),
            "by_reason": {k: int(v) for k, v in sorted(by_reason.items()) if v},
        },
        "latency_seconds": {
            "p50": histogram_quantile(0.5, pairs),
            "p99": histogram_quantile(0.99, pairs),
            "count": int(max((c for _, c in pairs), default=0)),
        },
        "settle": {"events_total": int(settled), "errors_total": int(errors)},
    }


def _state_name(state: int) -> str:
    try:
        return WalletState(state).name
    except ValueError:
        return str(state)


def wallet_row(project_id: str, fields: dict[str, str]) -> dict[str, Any]:
    def num(name: str) -> int:
        return int(fields.get(name) or 0)

    state = num(keys.W_STATE)
    snapshot, held, unsettled = num(keys.W_SNAPSHOT), num(keys.W_HELD), num(keys.W_UNSETTLED)
    return {
        "project": project_id,
        "state": _state_name(state),
        "snapshot": snapshot,
        "held": held,
        "unsettled": unsettled,
        "available": snapshot + num(keys.W_OVERDRAFT) - held - unsettled,
        "version": num(keys.W_VERSION),
    }


# ---------------------------------------------------------------- Redis reads


async def _outbox_row(r: Any, shard: int, now_ms: int) -> dict[str, Any]:
    stream = keys.outbox(shard)
    length = int(await r.xlen(stream))
    pending, oldest = 0, None
    if length:
        try:
            summary = await r.xpending(stream, keys.OUTBOX_GROUP)
        except aioredis.ResponseError:  # the group does not exist yet: nothing delivered
            summary = None
        if summary:
            pending = int(summary.get("pending") or 0)
            min_id = summary.get("min")
            if pending and min_id:
                text = min_id.decode() if isinstance(min_id, bytes) else str(min_id)
                oldest = max(0.0, (now_ms - int(text.split("-")[0])) / 1000)
    return {
        "shard": shard,
        "length": length,
        "pending": pending,
        "oldest_pending_age_seconds": oldest,
    }


async def _wallets(r: Any, projects: list[str], shards: int) -> list[dict[str, Any]]:
    rows = []
    for p in projects:
        fields = await r.hgetall(keys.wallet(keys.shard_of(p, shards), p))
        decoded = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        if decoded:
            rows.append(wallet_row(p, decoded))
    return rows


def _registry(state: _State) -> CollectorRegistry:
    if state.config.registry is not None:
        return state.config.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        reg = CollectorRegistry()
        MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
        return reg
    return REGISTRY


async def collect_stats(state: _State) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    stats = metric_figures(_registry(state))
    r = state.redis
    outbox = await asyncio.gather(
        *(_outbox_row(r, shard, now_ms) for shard in range(state.config.shards))
    )
    stats["outbox"] = list(outbox)
    stats["wallets"] = await _wallets(r, list(reversed(state.recent)), state.config.shards)
    stats["time_ms"] = now_ms
    stats["gateway_id"] = state.config.gateway_id
    return stats


# ---------------------------------------------------------------- aiohttp


def _authorized(request: web.Request, token: str) -> bool:
    # SECURITY: an empty configured token opens nothing; comparison in constant time.
    if not token:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


async def stats_handler(request: web.Request) -> web.Response:
    state = request.app[DASHBOARD]
    if not _authorized(request, state.config.admin_token):
        doc = problem_members(
            "urn:creditgate:problem:dashboard-unauthorized",
            "Admin token needed",
            401,
            "send Authorization: Bearer <admin token>",
            request.rel_url.raw_path,
        )
        challenge = CIMultiDict({"WWW-Authenticate": 'Bearer realm="creditgate-dashboard"'})
        return problem_http(doc, challenge)
    stats = await collect_stats(state)
    return web.json_response(stats, headers={"Cache-Control": "no-store"})


def _static_handler(name: str) -> Handler:
    body = importlib.resources.files("gateway_plugin").joinpath("static", name).read_bytes()
    content_type = _CONTENT_TYPES[name.rsplit(".", 1)[1]]

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    return handler


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(PREFIX + "/dashboard/")


def _recorder(state: _State) -> Middleware:
    from gateway_plugin.proxy import project_of

    @web.middleware
    async def record_project(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            project = project_of(request)
            if project is not None:
                state.recent[project] = None
                state.recent.move_to_end(project)
                while len(state.recent) > state.config.recent_projects:
                    state.recent.popitem(last=False)

    return record_project


def _bypass(routes: frozenset[web.AbstractRoute]) -> Middleware:
    @web.middleware
    async def dashboard_bypass(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Operator endpoints are not API traffic: admission (and every later middleware) is
        # skipped for them, whatever the policy says about unmatched paths. The stats endpoint
        # checks the admin token itself.
        if request.match_info.route in routes:
            return await request.match_info.handler(request)
        return await handler(request)

    return dashboard_bypass


def _redis_ctx(state: _State) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        cfg = state.config
        if cfg.redis_cluster:
            state.redis = aioredis.RedisCluster.from_url(
                cfg.redis_url, socket_timeout=2, socket_connect_timeout=2
            )
        else:
            state.redis = aioredis.Redis.from_url(
                cfg.redis_url, socket_timeout=2, socket_connect_timeout=2
            )
        yield
        await state.redis.aclose()

    return ctx


def setup_dashboard(app: web.Application, config: DashboardConfig) -> None:
    """Serve the dashboard under /_creditgate/ on `app`. Call after `setup()`, before start."""
    state = _State(config, OrderedDict())
    app[DASHBOARD] = state
    app.middlewares.append(_recorder(state))
    app.cleanup_ctx.append(_redis_ctx(state))
    routes = [
        app.router.add_get(PREFIX + "/dashboard", _redirect),
        app.router.add_get(PREFIX + "/dashboard/", _static_handler("dashboard.html")),
        app.router.add_get(PREFIX + "/dashboard/stats", stats_handler),
        app.router.add_get(PREFIX + "/stats", stats_handler),
    ]
    routes += [app.router.add_get(f"{PREFIX}/dashboard/{n}", _static_handler(n)) for n in _STATIC]
    # add_get also registers HEAD routes; both are operator routes.
    bypass_admission(app, routes)


def bypass_admission(app: web.Application, routes: Iterable[web.AbstractRoute]) -> None:
    """Serve `routes` (and the HEAD routes of their resources) without admission.

    Inserted first, so it runs before setup()'s middleware whatever the order of the calls.
    """
    from gateway_plugin.plugin import BYPASS_ROUTES

    owned = frozenset(r for route in routes for r in route.resource or ())
    # setup() leaves their handlers unwrapped; this middleware skips the ones after it too.
    app.setdefault(BYPASS_ROUTES, set()).update(owned)
    app.middlewares.insert(0, _bypass(owned))
