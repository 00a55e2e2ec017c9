"""The standalone gateway: a streaming reverse proxy to one upstream, with the plugin in front.

Header rules are pure functions (no I/O); the handler streams both bodies chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.multiprocess import MultiProcessCollector
from yarl import URL

from admission.policy import Policy, load_policy, resolve_segments
from gateway_plugin.config import DEFAULT_PROBLEM_TYPE_BASE, GatewayConfig
from gateway_plugin.handle import handle_of
from gateway_plugin.problems import SENT_PATH, gateway_problem

log = logging.getLogger(__name__)

# RFC 9110 7.6.1: connection-specific fields never cross a proxy; Proxy-Connection is the legacy
# spelling still sent by some clients, Expect is answered by aiohttp itself (100-continue).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PROJECT_HEADER = "X-Creditgate-Project"
# SECURITY: the gateway's own credentials stay at the gateway; the upstream learns the project
# from PROJECT_HEADER, which is always overwritten so a client cannot supply it.
CREDENTIAL_HEADERS = frozenset({"x-api-key"})

UPSTREAM_SESSION = web.AppKey("creditgate_upstream_session", aiohttp.ClientSession)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Where to forward and how long to wait. Timeouts are seconds."""

    upstream: str
    connect_timeout: float = 5.0
    # Silence from the upstream (before the headers or between body chunks) longer than this
    # ends the request with 504; a long stream that keeps sending is never cut.
    read_timeout: float = 60.0
    chunk_size: int = 64 * 1024
    max_connections: int = 1000
    # Peers whose X-Forwarded-* headers are extended rather than replaced (IPs or CIDRs).
    trusted_proxies: tuple[str, ...] = ()
    # RFC 9457 `type` of the proxy's own 400/502/504 answers = base + slug (as the plugin's).
    problem_type_base: str = DEFAULT_PROBLEM_TYPE_BASE
    # A path with an encoded "/" (%2F) or a backslash (%5C or bare): "reject" answers 400,
    # because upstreams differ on whether it separates segments; "keep" forwards it inside its
    # segment (for upstreams that route it so: IDs with slashes), and the policy matches so.
    encoded_slashes: Literal["reject", "keep"] = "reject"


PROXY_CONFIG = web.AppKey("creditgate_proxy_config", ProxyConfig)
# The path as the client sent it, before canonical_url: the `instance` of the proxy's problems.


def _connection_tokens(headers: Mapping[str, str] | CIMultiDict[str]) -> set[str]:
    getall = getattr(headers, "getall", None)
    values: Iterable[str] = getall("Connection", ()) if getall else [headers.get("Connection", "")]
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def _is_gateway_credential(name: str, value: str) -> bool:
    lname = name.lower()
    if lname in CREDENTIAL_HEADERS:
        return True
    if lname == "authorization":
        scheme, _, token = value.strip().partition(" ")
        return scheme.lower() == "bearer" and token.strip().startswith("cg_")
    return False


def is_trusted(peer: str | None, trusted: Iterable[str]) -> bool:
    if not peer:
        return False
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(net, strict=False) for net in trusted)


def upstream_request_headers(
    headers: CIMultiDict[str] | Mapping[str, str],
    *,
    peer: str | None,
    scheme: str,
    host: str | None,
    project_id: str | None,
    trust_forwarded: bool = False,
) -> CIMultiDict[str]:
    """The headers sent upstream: end-to-end fields only, credentials replaced by the project."""
    drop = HOP_BY_HOP | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    items = headers.items()
    for name, value in items:
        lname = name.lower()
        if lname in drop or lname == "host" or lname == PROJECT_HEADER.lower():
            continue
        if lname.startswith("x-forwarded-"):
            continue
        if _is_gateway_credential(name, value):
            continue
        out.add(name, value)
    prior_for = headers.get("X-Forwarded-For") if trust_forwarded else None
    if peer:
        out["X-Forwarded-For"] = f"{prior_for}, {peer}" if prior_for else peer
    elif prior_for:
        out["X-Forwarded-For"] = prior_for
    fwd_proto = headers.get("X-Forwarded-Proto") if trust_forwarded else None
    out["X-Forwarded-Proto"] = fwd_proto or scheme
    fwd_host = headers.get("X-Forwarded-Host") if trust_forwarded else None
    if fwd_host or host:
        out["X-Forwarded-Host"] = fwd_host or host or ""
    if project_id:
        out[PROJECT_HEADER] = project_id
    return out


def downstream_response_headers(headers: CIMultiDict[str] | Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream's response headers minus the hop-by-hop ones."""
    drop = HOP_BY_HOP | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


# SECURITY: what the gateway meters must be what the upstream serves. A path an upstream could
# read as another one is made canonical before the policy sees it, and forwarded so.
_ENCODED_SEPARATOR = re.compile(r"%(?:2[fF]|5[cC])|\\")


class AmbiguousPath(ValueError):
    """A request path the gateway refuses to forward (see ProxyConfig.encoded_slashes)."""


def canonical_url(url: URL, encoded_slashes: Literal["reject", "keep"] = "reject") -> URL:
    """The request URL the gateway meters and forwards: `url` itself when it is canonical.

    Dot segments, including encoded ones (%2E%2E), are resolved (RFC 3986 5.2.4) and empty
    segments ("//") merged, as most upstream servers do before routing. Every other byte of
    the path stays as the client encoded it; the query is kept. Raises AmbiguousPath for an
    encoded "/" or a backslash when `encoded_slashes` is "reject", and for a dot segment with
    ";" parameters ("..;x"), which servlet containers read as "..".
    """
    raw = url.raw_path
    if "%" not in raw and "//" not in raw and "/." not in raw and "\\" not in raw:
        return url
    # The path goes into the message as sent, not repr()'d: the problem body's JSON escapes it
    # once, and a repr would escape a backslash a second time ("a\\b" once decoded).
    if encoded_slashes == "reject" and _ENCODED_SEPARATOR.search(raw):
        raise AmbiguousPath(
            f"the path {raw} has an encoded '/' or a backslash, which servers read differently"
        )
    segments = raw.split("/")[1:]
    for seg in segments:
        # Servlet containers drop ";params" before resolving: "..;x" is ".." to them.
        if ";" in seg and unquote(seg).partition(";")[0] in (".", ".."):
            raise AmbiguousPath(f"the path {raw} has a dot segment with ';' parameters")
    out = resolve_segments(segments, unquote)
    path = "/" + "/".join(out)
    if path == raw:
        return url
    return url.with_path(path, encoded=True, keep_query=True)


def canonical_paths_middleware(cfg: ProxyConfig) -> Middleware:
    """Outermost middleware of the standalone gateway: the plugin and the proxy handler both
    see the canonical URL (canonical_url); an ambiguous path is answered 400."""

    @web.middleware
    async def canonical_paths(request: web.Request, handler: Handler) -> web.StreamResponse:
        url = request.rel_url
        request[SENT_PATH] = url.raw_path
        try:
            target = canonical_url(url, cfg.encoded_slashes)
        except AmbiguousPath as exc:
            return gateway_problem(
                400,
                "invalid-request",
                "Invalid request",
                str(exc),
                url.raw_path,
                type_base=cfg.problem_type_base,
            )
        if target is url:
            return await handler(request)
        # A response the handler returns unprepared is prepared with the original request:
        # the plugin finds the clone's usage handle from it (gateway_plugin.handle.handle_of).
        return await handler(request.clone(rel_url=target))

    return canonical_paths


def upstream_url(base: str, raw_path: str) -> URL:
    """Join the upstream base (which may carry a path prefix) and an origin-form target."""
    return URL(base.rstrip("/") + raw_path, encoded=True)


def project_of(request: web.Request) -> str | None:
    """The project of an admitted request on a route the plugin protects, else None."""
    handle = handle_of(request)
    return handle.project_id if handle is not None else None


async def _body(request: web.Request, chunk_size: int) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(chunk_size):
        yield chunk


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Forward one request upstream and stream the answer back."""
    cfg = request.app[PROXY_CONFIG]
    session = request.app[UPSTREAM_SESSION]
    headers = upstream_request_headers(
        request.headers,
        peer=request.remote,
        scheme=request.scheme,
        host=request.host,
        project_id=project_of(request),
        trust_forwarded=is_trusted(request.remote, cfg.trusted_proxies),
    )
    data = _body(request, cfg.chunk_size) if request.body_exists else None
    # The path and query of the URL the plugin metered: never the raw request target, which
    # may be absolute-form ("GET http://host/path") and is not canonical.
    url = upstream_url(cfg.upstream, request.rel_url.raw_path_qs)
    instance = request.get(SENT_PATH, request.rel_url.raw_path)
    try:
        upstream = await session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        )
    except TimeoutError:
        return gateway_problem(
            504,
            "upstream-timeout",
            "Upstream timeout",
            f"the upstream did not answer within {cfg.read_timeout:g}s",
            instance,
            type_base=cfg.problem_type_base,
        )
    except aiohttp.ClientError as exc:
        log.warning("upstream %s unreachable: %s", cfg.upstream, exc)
        return gateway_problem(
            502,
            "upstream-unreachable",
            "Bad gateway",
            "the upstream is unreachable",
            instance,
            type_base=cfg.problem_type_base,
        )
    async with upstream:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=downstream_response_headers(upstream.headers),
        )
        await response.prepare(request)
        # Past prepare() the status is on the wire: an upstream failure now can only abort the
        # connection, which the exception below does (and the plugin sees it as an error).
        async for chunk in upstream.content.iter_chunked(cfg.chunk_size):
            await response.write(chunk)
        await response.write_eof()
        return response


def _session_ctx(cfg: ProxyConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout
        )
        session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=cfg.max_connections),
            auto_decompress=False,  # bytes pass through untouched, Content-Encoding with them
            cookie_jar=aiohttp.DummyCookieJar(),  # SECURITY: one jar would mix clients' cookies
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        app[UPSTREAM_SESSION] = session
        yield
        await session.close()

    return ctx


def add_proxy(app: web.Application, cfg: ProxyConfig) -> None:
    """Route every request not matched earlier to the upstream. Call after other routes."""
    app[PROXY_CONFIG] = cfg
    app.cleanup_ctx.append(_session_ctx(cfg))
    app.router.add_route("*", "/{tail:.*}", proxy_handler)


def build_gateway_app(
    config: GatewayConfig, proxy: ProxyConfig, *, dashboard: bool = True
) -> web.Application:
    """The standalone gateway: plugin, optional operator dashboard, then the catch-all proxy."""
    from gateway_plugin.dashboard import DashboardConfig, bypass_admission, setup_dashboard
    from gateway_plugin.plugin import setup

    if config.policy is not None and not isinstance(config.policy, Policy):
        config = dataclasses.replace(config, policy=load_policy(config.policy))
    multiprocess_path = ""
    if os.environ.get(MULTIPROC_ENV) and config.metrics_path and config.registry is None:
        # Several workers: /metrics must merge every worker's files, not show this one's.
        multiprocess_path = config.metrics_path
        config = dataclasses.replace(config, metrics_path="")
    app = web.Application()
    setup(app, config)
    if multiprocess_path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        route = app.router.add_get(multiprocess_path, make_aiohttp_handler(registry))
        bypass_admission(app, [route])
    if dashboard:
        setup_dashboard(app, DashboardConfig.from_gateway(config))
    if not proxy.trusted_proxies and config.trusted_proxies:
        proxy = dataclasses.replace(proxy, trusted_proxies=config.trusted_proxies)
    if proxy.problem_type_base == DEFAULT_PROBLEM_TYPE_BASE:
        proxy = dataclasses.replace(proxy, problem_type_base=config.problem_type_base)
    # Outermost, so that the plugin's policy matches the URL that is forwarded.
    app.middlewares.insert(0, canonical_paths_middleware(proxy))
    add_proxy(app, proxy)
    return app


def app_runner(app: web.Application, shutdown_timeout: float) -> web.AppRunner:
    """An AppRunner that gives a running request `shutdown_timeout` seconds in all at shutdown.

    aiohttp waits shutdown_timeout for a running handler, then cancels only the request's body
    and waits as long again before it cancels the handler: half each, not twice the total.
    """
    return web.AppRunner(app, shutdown_timeout=shutdown_timeout / 2, access_log=None)
