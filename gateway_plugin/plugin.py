"""setup(app, config): puts admission in front of an app's route handlers and installs the
plugin's lifecycle on the app.

Clients and background tasks are created inside the running loop (cleanup_ctx) and closed in
reverse order: in-flight settlements first, then sweeper, flusher (drained), watch, engine,
identity, cache filler, authority client, Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from admission.decision import Reason
from admission.policy import Policy, Route, ambiguous_route, load_policy
from gateway_plugin.config import GatewayConfig
from gateway_plugin.headers import ratelimit_templates
from gateway_plugin.metrics import GatewayMetrics, metrics_handler
from gateway_plugin.middleware import Admit, make_admit, on_response_prepare
from gateway_plugin.statics import static_routes

if TYPE_CHECKING:
    from admission.authority import AuthorityClient
    from admission.cache import CacheFiller, WatchSubscriber
    from admission.engine import AdmissionEngine
    from admission.flusher import Flusher
    from admission.identity import IdentityResolver
    from admission.lease import LeaseAdmitter

log = logging.getLogger("gateway_plugin")

_SHUTDOWN_STEP_S = 5.0
_METRICS_FOLD_S = 1.0  # how stale /metrics may be in a process that is not the one scraped


@dataclass(eq=False)
class GatewayState:
    """Everything one setup() owns. Built by setup(); the live parts are filled at startup.

    Reachable as `app[GATEWAY_KEY]` (or `request.config_dict[GATEWAY_KEY]` from sub-apps).
    """

    config: GatewayConfig
    policy: Policy
    metrics: GatewayMetrics
    retry_after_defaults: dict[Reason, int]
    redis: Any = None
    authority: AuthorityClient | None = None
    filler: CacheFiller | None = None
    identity: IdentityResolver | None = None
    engine: AdmissionEngine | None = None
    leases: LeaseAdmitter | None = None  # lease mode only
    watch: WatchSubscriber | None = None
    flusher: Flusher | None = None
    # Commits/releases in flight (engine futures; tasks for ones retrying after a Redis
    # outage); awaited on shutdown before the flusher drains.
    settling: set[asyncio.Future[Any]] = field(default_factory=set)
    background: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    settle_retry_seconds: float = 30.0
    closing: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)
    # Route handlers that bypass admission (the metrics endpoint); fixed once the app starts.
    exempt_handlers: set[Callable[..., Any]] = field(default_factory=set)
    # The handlers of the app's static routes (sub-apps included), found when it starts: their
    # requests are matched by the file they serve (gateway_plugin.statics).
    static_resources: dict[Callable[..., Any], web.StaticResource] = field(default_factory=dict)

    async def wait_settled(self, within_s: float | None = None) -> None:
        """Waits (at most within_s) until every commit/release started so far is done
        (lease mode: reached Redis with its lease's sync)."""
        if self.leases is not None:
            await self.leases.flush(5.0 if within_s is None else within_s)
        # A commit that met a Redis outage hands over to a retry task: wait for that too.
        pending = set(self.settling)
        seen: set[asyncio.Future[Any]] = set()
        end = None if within_s is None else time.monotonic() + within_s
        while pending:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return
            await asyncio.wait(pending, timeout=left)
            seen |= pending
            pending = {f for f in pending if not f.done()} | {
                f for f in self.settling if isinstance(f, asyncio.Task) and f not in seen
            }


_FLUSHER_LINGER_MS = 50
# Lease mode writes one event per route+meter per sync: a longer linger still keeps the outbox
# lag far below a second and wakes the flusher four times less often.
_FLUSHER_LINGER_LEASE_MS = 200
# An idle flusher blocks this long per read (on a client of its own): new entries still end
# the wait at once, and an idle gateway wakes once a second instead of ten times.
_FLUSHER_IDLE_BLOCK_MS = 1000

GATEWAY_KEY = web.AppKey("creditgate_gateway", GatewayState)
# Routes served without admission whatever the order of the calls (the dashboard's operator
# routes, gateway_plugin.dashboard.bypass_admission): their handlers are left unwrapped.
BYPASS_ROUTES = web.AppKey("creditgate_bypass_routes", set[web.AbstractRoute])


def setup(app: web.Application, config: GatewayConfig) -> GatewayState:
    """Protects the routes of `app` (and its sub-apps) with creditgate admission.

    Call before the app starts. On a sub-app, only that sub-app's routes are protected.
    Returns the state (also at app[GATEWAY_KEY]); its live parts exist once the app started.
    """
    if app.frozen:
        raise RuntimeError(
            "gateway_plugin.setup() must be called before the application starts "
            "(aiohttp freezes middlewares and cleanup contexts at startup)"
        )
    if GATEWAY_KEY in app:
        raise RuntimeError("gateway_plugin.setup() was already called on this application")
    policy = _policy(config)
    if not policy.routes:
        # An empty or truncated file would otherwise meter nothing, silently.
        where = "" if isinstance(config.policy, Policy) else f" {config.policy}"
        log.warning(
            "creditgate: the policy%s names no routes: every request %s",
            where,
            "passes unmetered" if policy.settings.unmatched == "pass" else "is denied (400)",
        )
    metrics = GatewayMetrics.for_registry(
        config.registry, config.metrics_projects, config.metrics_top_projects
    )
    s = policy.settings
    state = GatewayState(
        config=config,
        policy=policy,
        metrics=metrics,
        retry_after_defaults={
            Reason.RATE_LIMITED: 1,
            Reason.CONCURRENCY_LIMITED: 1,
            Reason.INSUFFICIENT_CREDITS: s.credit_retry_after_seconds,
            Reason.WALLET_GRACE: s.credit_retry_after_seconds,
            Reason.SETTLEMENT_BACKLOG: s.backlog_retry_after_seconds,
            Reason.UNAVAILABLE: s.unavailable_retry_after_seconds,
        },
        settle_retry_seconds=min(30.0, s.hold_ttl_seconds / 2),
    )
    app[GATEWAY_KEY] = state
    # Admission wraps each route's handler when the app starts (_protect), rather than being a
    # middleware: aiohttp's middleware layer alone cost 10-13% of a trivial request's
    # throughput (bench/gateway_bench.py, null-mw against null-wrap).
    app.on_response_prepare.append(on_response_prepare)
    app.cleanup_ctx.append(_lifecycle(state, make_admit(state)))
    if config.metrics_path:
        serve_metrics = metrics_handler(config.registry)
        # Scrapes are never admission-controlled, whatever routes the policy names.
        state.exempt_handlers.add(serve_metrics)
        app.router.add_get(config.metrics_path, serve_metrics)
    return state


def _policy(config: GatewayConfig) -> Policy:
    if config.policy is None:
        raise ValueError("GatewayConfig.policy is required (a Policy or the path of a policy file)")
    if isinstance(config.policy, Policy):
        return config.policy
    return load_policy(Path(config.policy))


def _protect(
    app: web.Application,
    state: GatewayState,
    admit: Admit,
    bypassed: frozenset[web.AbstractRoute] = frozenset(),
) -> None:
    """Puts admission in front of the handler of every route of `app` and of its sub-apps
    (those without a setup() of their own), except exempt handlers and bypassed routes.

    A request aiohttp routes nowhere (404, 405) meets no admission: it is neither charged
    nor counted against a quota.
    """
    own: set[web.AbstractRoute] = app.get(BYPASS_ROUTES, set())
    bypass = bypassed.union(own)  # an app's bypassed routes stay so in its sub-apps
    for resource in app.router.resources():
        sub = resource.get_info().get("app")
        if isinstance(sub, web.Application):
            if GATEWAY_KEY not in sub:
                _protect(sub, state, admit, bypass)
            continue
        for route in resource:
            handler = route.handler
            if handler in state.exempt_handlers or route in bypass or hasattr(handler, _WRAPS):
                continue  # an app started again keeps the wrappers of its first start
            # AbstractRoute keeps its handler in `_handler` (aiohttp 3.x, pinned <4); the
            # router is frozen, the routes are not. tests/test_plugin.py checks that every
            # kind of route (function, view, static, sub-app) is admitted, once.
            route._handler = _admitted(handler, admit, _fixed_route(state.policy, resource, route))


def _fixed_route(
    policy: Policy, resource: web.AbstractResource, route: web.AbstractRoute
) -> Route | None:
    """The policy route of every request an aiohttp route can receive, when that is one: a
    plain resource matches one path exactly (the router compares `rel_url.path_safe` with it)
    and a route other than `*` one method (a class-based view added with add_view is a `*`
    route). None for the rest (dynamic and static resources, `*` routes, a subclass of
    PlainResource, which may match otherwise), a path the policy does not name, and a path
    with dot or empty segments: their requests are matched one by one."""
    if type(resource) is not web.PlainResource or route.method == hdrs.METH_ANY:
        return None
    path = resource.canonical
    matched = policy.match(route.method, path)
    if ambiguous_route(policy, route.method, path, matched):
        return None
    return matched


# Marks (and names the original of) a handler _protect wrapped.
_WRAPS = "__creditgate_admits__"


def _admitted(handler: Any, admit: Admit, fixed: Route | None = None) -> Any:
    """`handler` with admission in front, looking like `handler` to middlewares and to
    request.match_info.handler: a function keeps its name, docstring and attributes (a
    decorator's marks), a class-based view stays a subclass of its class. `fixed`: the
    policy route of all its requests, if known (_fixed_route)."""
    if isinstance(handler, type) and issubclass(handler, web.View):
        view: type[web.View] = handler

        async def _iter(self: web.View) -> web.StreamResponse:
            return await admit(fixed, lambda _request: view._iter(self), self.request)

        namespace = {"_iter": _iter, "__doc__": view.__doc__, "__module__": view.__module__}
        wrapped: Any = type(view.__name__, (view,), namespace)
        wrapped.__qualname__ = view.__qualname__
    else:
        wrapped = functools.update_wrapper(functools.partial(admit, fixed, handler), handler)
    setattr(wrapped, _WRAPS, handler)
    return wrapped


def _lifecycle(
    state: GatewayState, admit: Admit
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def creditgate_lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # The routers are frozen now: every route is known.
            _protect(app, state, admit)
            # Keyed by the handlers as requests will name them: wrapped.
            state.static_resources.update(static_routes(app))
            await _start(state, stack)
            state.started.set()
            try:
                yield
            finally:
                state.closing = True

    return creditgate_lifecycle


async def _start(state: GatewayState, stack: contextlib.AsyncExitStack) -> None:
    """Starts every part in order; the exit stack unwinds them in reverse."""
    from admission.authority import AuthorityClient, AuthorityClientConfig
    from admission.cache import CacheFiller, Reconciler, WatchSubscriber
    from admission.engine import AdmissionEngine
    from admission.flusher import Flusher
    from admission.identity import IdentityConfig, IdentityResolver
    from admission.lease import LeaseAdmitter
    from admission.redis_client import RedisSettings, build_client, build_waiting_client

    config = state.config
    settings = state.policy.settings
    registry = config.registry

    # Per-request counts are folded into the Prometheus metrics on this (the loop's) thread:
    # every second, on each collect here, and last at shutdown (after the settlements).
    state.metrics.bind()
    stack.callback(state.metrics.fold)
    _spawn(state, stack, "metrics-fold", functools.partial(_fold_metrics, state.metrics))

    redis_settings = RedisSettings(url=config.redis_url, cluster=config.redis_cluster)
    redis = build_client(redis_settings)
    stack.push_async_callback(_close_redis, redis)
    state.redis = redis

    if not config.authority_token:
        log.warning(
            "creditgate: authority_token is empty: the authority will refuse key lookups, "
            "snapshots, settlements and the Watch stream: set --token / CREDITGATE_ADMIN_TOKEN "
            "(creditgate gateway serve), or GatewayConfig.authority_token (from_env() reads "
            "CREDITGATE_AUTHORITY_TOKEN, else CREDITGATE_ADMIN_TOKEN)"
        )
    authority = AuthorityClient(
        AuthorityClientConfig(target=config.authority_target, token=config.authority_token)
    )
    await authority.start()
    stack.push_async_callback(_bounded, authority.aclose, "authority client")
    state.authority = authority

    filler = CacheFiller(
        redis,
        authority,
        unsettled_limit=settings.unsettled_limit,
        shards=settings.shards,
        registry=registry,
    )
    stack.push_async_callback(_bounded, filler.aclose, "cache filler")
    state.filler = filler

    identity = IdentityResolver(
        redis,
        authority,
        IdentityConfig(trusted_proxies=config.trusted_proxies),
        registry=registry,
        snapshots=filler,  # a key resolved at the authority fills its project's cache at once
    )
    state.identity = identity
    state.metrics.add_fold(identity.fold_metrics)
    stack.callback(state.metrics.remove_fold, identity.fold_metrics)

    engine = AdmissionEngine(redis, state.policy, filler, gateway_id=config.gateway_id)
    stack.push_async_callback(_bounded, engine.drain, "engine drain")
    state.engine = engine

    leases = None
    if settings.admission == "lease":
        leases = LeaseAdmitter(
            engine.store,
            state.policy,
            filler,
            route_problem=engine.route_problem,
            registry=registry,
            templates=ratelimit_templates,
        )
        leases.start()
        state.leases = leases
        filler.project_listeners = (leases.invalidate,)

    def settle_in_flight() -> None:
        n = len(state.settling)
        if state.leases is not None:
            n += state.leases.unsynced_commits()
        state.metrics.settle_in_flight.set(n)

    state.metrics.add_fold(settle_in_flight)
    stack.callback(state.metrics.remove_fold, settle_in_flight)

    if config.run_watch:
        watch = WatchSubscriber(
            filler,
            key_caches=(identity,),
            project_listeners=(leases.invalidate,) if leases is not None else (),
            registry=registry,
        )
        await watch.start()
        stack.push_async_callback(_bounded, watch.aclose, "watch")
        state.watch = watch
        if config.reconcile_interval_seconds > 0:
            reconciler = Reconciler(
                filler, interval_s=config.reconcile_interval_seconds, registry=registry
            )
            _spawn(state, stack, "reconcile", reconciler.run)

    if config.run_flusher:
        from admission.flusher import Flusher

        waiter = None
        if not config.redis_cluster:
            waiter = build_waiting_client(redis_settings, _FLUSHER_IDLE_BLOCK_MS / 1000)
            stack.push_async_callback(_close_redis, waiter)
        flusher = Flusher(
            redis,
            authority,
            block_ms=_FLUSHER_IDLE_BLOCK_MS,
            waiter=waiter,
            shards=settings.shards,
            gateway_id=config.gateway_id,
            sweeper=engine if config.run_sweeper else None,
            sweep_interval_ms=max(1, int(config.sweep_interval_seconds * 1000)),
            # Sharing the gateway's CPU: fewer, bigger Settle batches (lag stays << 1 s).
            linger_ms=_FLUSHER_LINGER_LEASE_MS if leases is not None else _FLUSHER_LINGER_MS,
            registry=registry,
        )
        state.flusher = flusher
        task = _spawn(state, stack, "flusher", flusher.run, stop=False)
        stack.push_async_callback(
            _drain_flusher, flusher, task, config.flusher_drain_timeout_seconds
        )
    elif config.run_sweeper:
        # No flusher here to host the sweep: run it on its own.
        _spawn(state, stack, "sweeper", lambda: _sweep(state))

    if leases is not None:
        # Before the flusher drains: the leases' last commits reach the outbox first.
        # Redis away at shutdown: closing syncs are retried for settle_drain_timeout_seconds
        # (within the shutdown step's bound), then what could not be sent is logged as lost.
        close_s = min(config.settle_drain_timeout_seconds, _SHUTDOWN_STEP_S - 1.0)
        stack.push_async_callback(
            _bounded, functools.partial(leases.aclose, max(close_s, 0.0)), "leases"
        )

    # Last in, first out: holds still ending reach Redis before the flusher drains.
    stack.push_async_callback(_drain_settlements, state)


async def _close_redis(redis: Any) -> None:
    import redis.asyncio as aioredis

    if isinstance(redis, aioredis.Redis):
        # The pool is the client's own (build_client): its connections close with it.
        await redis.aclose(close_connection_pool=True)
    else:
        await redis.aclose()


def _spawn(
    state: GatewayState,
    stack: contextlib.AsyncExitStack,
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    stop: bool = True,
) -> asyncio.Task[None]:
    async def guarded() -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("creditgate background task %s failed", name)
            raise

    task = asyncio.get_running_loop().create_task(guarded(), name=f"creditgate-{name}")
    state.background[name] = task
    if stop:
        stack.push_async_callback(_cancel, task)
    return task


async def _fold_metrics(metrics: GatewayMetrics) -> None:
    while True:
        await asyncio.sleep(_METRICS_FOLD_S)
        metrics.fold()


async def _bounded(close: Callable[[], Awaitable[None]], what: str) -> None:
    """Runs one shutdown step with a deadline, so one stuck part cannot hang the shutdown."""
    try:
        async with asyncio.timeout(_SHUTDOWN_STEP_S):
            await close()
    except TimeoutError:
        log.warning("creditgate: closing the %s took over %.0fs; moving on", what, _SHUTDOWN_STEP_S)
    except Exception:
        log.exception("creditgate: closing the %s failed", what)


async def _cancel(task: asyncio.Task[None]) -> None:
    # One cancel() is not always enough: on Python 3.11 a cancellation that races with an
    # asyncio.timeout inside redis-py surfaces as a timeout error, which retry loops swallow.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled() and task.exception() is not None:
        log.warning("creditgate task %s ended with %r", task.get_name(), task.exception())


async def _drain_flusher(flusher: Flusher, task: asyncio.Task[None], within_s: float) -> None:
    # The loop stops first: a batch it had in flight is re-read from the pending list by the
    # drain (the authority deduplicates by event id), never settled by two readers at once.
    await _cancel(task)
    try:
        await flusher.drain(within_s)
    except Exception:
        log.exception("creditgate flusher drain failed; the outbox keeps the rest")


async def _sweep(state: GatewayState) -> None:
    interval = state.config.sweep_interval_seconds
    while True:
        engine = state.engine
        if engine is not None:
            try:
                await engine.sweep_expired()
            except Exception as exc:
                # Redis away: the next round retries; expiry is not time critical.
                log.warning("creditgate hold sweep failed: %s", exc)
        await asyncio.sleep(interval)


async def _drain_settlements(state: GatewayState) -> None:
    timeout = state.config.settle_drain_timeout_seconds
    await state.wait_settled(timeout)
    late = set(state.settling)
    if not late:
        return
    for fut in late:
        fut.cancel()
    if late:
        log.warning("creditgate: %d commits/releases did not finish before shutdown", len(late))
        await asyncio.wait(late)
