"""Admission around a route handler: route -> identity -> admit -> handler -> commit or release.

setup() puts it in front of each route's handler when the app starts, as
functools.partial(admit, fixed, handler) (gateway_plugin.plugin._protect), instead of
installing it as a middleware, whose layer alone cost 10-13% of a trivial request's
throughput. The request comes last: a partial with positional arguments is called through
vectorcall, one with a keyword argument builds a tuple and a dict per request. `fixed` is the
policy route when the aiohttp route decides it (one path, one method, named by the policy):
such a request skips reading its path and method and matching them.

Theory of operation. A request whose route the policy does not name passes (or is denied when
`settings.unmatched = "deny"`). Otherwise the caller is identified and the engine decides; a
denial is answered here as problem+json. An admitted request gets a UsageHandle, the handler
runs, and its outcome picks how the hold ends:

    handler returned, status < 500, client still there   -> commit (reported amount or hold)
    handler returned 5xx / raised (HTTPException >= 500)  -> release if route.release_on_error
    ConnectionResetError / CancelledError / client gone   -> route.on_disconnect
    handler called usage(request).release()               -> release

In lease mode (the default, settings.admission = "lease") admission and ending are local to
the process (admission.lease.LeaseAdmitter); a request waits only when its project's lease does
not cover it. In hold mode, ending a hold is queued into the engine's batch synchronously
(engine.end_hold), never awaited
in the request task: a cancelled request (client gone with handler cancellation on, or
shutdown) cannot lose or half-send a commit. Its future is tracked in GatewayState.settling;
only a commit/release that met a Redis outage gets a task (retries with backoff). Headers of
admitted responses are added in on_response_prepare, so streaming responses get them before
their first byte.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

from admission.decision import Decision, Hold, Reason, SettleOutcome
from admission.policy import Route, ambiguous_route
from gateway_plugin import headers as hdr
from gateway_plugin.handle import CURRENT, USAGE_KEY, UsageHandle, handle_of
from gateway_plugin.hot import HotCounts
from gateway_plugin.problems import SENT_PATH, problem_response
from gateway_plugin.statics import served_path_async

if TYPE_CHECKING:
    from admission.lease import LeaseAdmitter
    from gateway_plugin.plugin import GatewayState

log = logging.getLogger("gateway_plugin")

_COMMIT = True
_RELEASE = False
_REPORTED = "reported"  # Route.commit: the handler is expected to report its usage
# Retrying a commit/release while Redis is away: the hold TTL bounds how long it can matter.
_SETTLE_BACKOFF_START_S = 0.05
_SETTLE_BACKOFF_MAX_S = 2.0
_UNAVAILABLE = "UNAVAILABLE"  # SettleOutcome.state when Redis did not answer
_NOT_STARTED = Decision(
    admitted=False, reason=Reason.UNAVAILABLE, detail="the gateway is not started yet"
)
# Identity denials carry nothing request-specific: one immutable Decision per reason.
_identity_denials = {r: Decision(admitted=False, reason=r) for r in Reason}


# admit(fixed, handler, request): the request admitted, handled by `handler`, its hold ended;
# `fixed` is the policy route of every request of an aiohttp route with one path and one
# method (found once when the app starts: gateway_plugin.plugin._fixed_route), None to match
# each request's path and method.
Admit = Callable[[Route | None, Handler, web.Request], Awaitable[web.StreamResponse]]


def make_admit(state: GatewayState) -> Admit:
    """Admission bound to one setup() call's state.

    The state is captured rather than looked up in request.config_dict on every request: the
    lookup walks the app chain, and each setup() (app or sub-app) has exactly one state.
    """
    policy = state.policy  # a compiled class: policy.match() below is a direct C call
    unmatched_pass = policy.settings.unmatched == "pass"
    statics = state.static_resources  # filled when the app starts
    metrics = state.metrics
    hot = metrics.hot  # plain counts, folded into Prometheus (gateway_plugin.metrics)
    project_decisions = metrics.project_decisions  # fixed for the metrics' life
    record_project = project_decisions.record if project_decisions.enabled else None
    perf = time.perf_counter
    set_current = CURRENT.set

    async def creditgate_admit(
        fixed: Route | None, handler: Handler, request: web.Request
    ) -> web.StreamResponse:
        if fixed is not None:
            # An aiohttp route with one path and one method: its policy route was found when
            # the app started (gateway_plugin.plugin._protect), the path being the one the
            # router matched.
            route = fixed
        else:
            # SECURITY: the policy matches the path the router matched, `path_safe` (decoded
            # except %2F and %25). The fully decoded `request.path` would turn /v1/a%2Fb,
            # which the router gives to /v1/{model}, into /v1/a/b: a different policy route,
            # or none (unmetered).
            path = request.rel_url.path_safe
            if statics:
                static = statics.get(request.match_info.handler)
                if static is not None:
                    # A static file is metered as the file it serves, however the URL spells it.
                    served = await served_path_async(static, request.match_info["filename"])
                    if served is not None:
                        path = served
            matched = policy.match(request.method, path)
            if ("/." in path or "//" in path) and ambiguous_route(
                policy, request.method, path, matched
            ):
                return _deny(state, _ambiguous_path(path), request)
            if matched is None:
                if unmatched_pass:
                    return await handler(request)
                return _deny(
                    state,
                    Decision(
                        admitted=False,
                        reason=Reason.INVALID_REQUEST,
                        detail=f"no admission route matches {request.method} {path}",
                    ),
                    request,
                )
            route = matched
        # Exempt handlers (metrics, the dashboard) are never wrapped: nothing to check here.
        started = perf()
        # The engine never raises for Redis or authority failures: it applies the route's
        # on_redis_down policy itself and answers UNAVAILABLE when it cannot decide.
        identity = state.identity
        engine = state.engine
        leases = state.leases
        if identity is None or engine is None:
            decision = _NOT_STARTED
        else:
            headers = request.headers
            who = identity.identify_cached(headers) or await identity.identify(
                headers, request.remote
            )
            if isinstance(who, Reason):
                decision = _identity_denials[who]
            elif leases is not None:
                # Lease mode: most requests are decided here without I/O.
                decision = leases.try_admit(route, who.project_id) or await leases.admit(
                    route, who.project_id
                )
            else:
                decision = await engine.admit_route(route, who.project_id)
        hot.observe(perf() - started)
        if record_project is not None and decision.project_id is not None:
            record_project(decision.project_id, decision.admitted)
        hot.decided(decision.admitted, decision.reason)
        if not decision.admitted:
            return _deny(state, decision, request)
        if decision.would_deny is not None:
            metrics.shadow_would_deny.labels(decision.would_deny.value).inc()
        if decision.degraded:
            metrics.degraded_admits.labels(route.name).inc()

        handle = UsageHandle(decision, request)
        request[USAGE_KEY] = handle  # for usage(request) from anywhere
        set_current(handle)  # the quick way to it in this task (gateway_plugin.handle)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 500:
                _end(state, handle, not route.release_on_error, leases, hot)
            else:
                _end(state, handle, _COMMIT, leases, hot)
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            _end(state, handle, route.on_disconnect == "commit", leases, hot)
            raise
        except BaseException:
            _end(state, handle, not route.release_on_error, leases, hot)
            raise
        if response.status >= 500:
            _end(state, handle, not route.release_on_error, leases, hot)
        elif request.transport is None and not response.prepared:
            # The client left while the handler ran: nothing of the response can reach it.
            _end(state, handle, route.on_disconnect == "commit", leases, hot)
        else:
            if route.commit == _REPORTED and handle.reported is None and not handle.released:
                # The route expects its handler to report usage: the hold is charged instead.
                metrics.unreported.labels(route.name).inc()
            _end(state, handle, _COMMIT, leases, hot)
        return response

    return creditgate_admit


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Adds the RateLimit / warning headers to an admitted request's response (signal): the
    handler's, streamed or returned, one an outer middleware put in its place, or aiohttp's
    500 for an exception."""
    handle = handle_of(request)
    if handle is not None:
        hdr.apply_admitted(response.headers, handle.decision)
        handle.prepared()


def _ambiguous_path(path: str) -> Decision:
    detail = (
        f"the path {path} names another admission route once its '.', '..' and empty "
        "segments are resolved"
    )
    return Decision(admitted=False, reason=Reason.INVALID_REQUEST, detail=detail)


def _deny(state: GatewayState, decision: Decision, request: web.Request) -> web.Response:
    return problem_response(
        decision,
        # `instance`: a URI reference, as the client sent it (before a rewrite in front of us)
        request.get(SENT_PATH) or request.rel_url.raw_path,
        type_base=state.config.problem_type_base,
        default_retry_after=state.retry_after_defaults.get(decision.reason, 1),
    )


def _end(
    state: GatewayState,
    handle: UsageHandle,
    commit: bool,
    leases: LeaseAdmitter | None,
    hot: HotCounts,
) -> None:
    """Starts ending the hold (queued in this tick's batch); safe from a cancelled task.

    `leases` and `hot` are state.leases and state.metrics.hot, which the caller holds."""
    handle.close()
    hold = handle.decision.hold
    if hold is None:
        return
    if handle.released:
        commit = _RELEASE
    amount = handle.commit_amount() if commit else 0
    if leases is not None:  # lease mode: ended locally, synced to Redis with the lease
        outcome = leases.end_local(hold, commit, amount)
        if outcome is None:  # ended as asked: count it (the common case, kept short)
            hot.ended(commit, hold.meter, amount)
        else:
            _record(state, hold, commit, outcome)
        return
    engine = state.engine
    if engine is None:
        return
    fut = engine.end_hold(hold, commit, amount)
    state.settling.add(fut)
    fut.add_done_callback(functools.partial(_ended, state, hold, commit, amount))


def _ended(
    state: GatewayState,
    hold: Hold,
    commit: bool,
    amount: int,
    fut: asyncio.Future[SettleOutcome],
) -> None:
    try:
        if fut.cancelled():  # shutdown gave up on it; the batch itself still ran
            return
        exc = fut.exception()
        if exc is not None:
            (state.metrics.commit_failed if commit else state.metrics.release_failed).inc()
            log.error("ending hold %s of %s failed", hold.hold_id, hold.project_id, exc_info=exc)
            return
        outcome = fut.result()
        if outcome.state == _UNAVAILABLE and not state.closing and state.settle_retry_seconds > 0:
            # Added before `fut` leaves the set, so waiting for settling sees no gap.
            task = asyncio.get_running_loop().create_task(_settle(state, hold, commit, amount))
            state.settling.add(task)
            task.add_done_callback(state.settling.discard)
            return
        _record(state, hold, commit, outcome)
    finally:
        state.settling.discard(fut)


async def _settle(state: GatewayState, hold: Hold, commit: bool, amount: int) -> None:
    """Retries a commit/release whose first attempt found Redis unavailable."""
    engine = state.engine
    metrics = state.metrics
    if engine is None:
        return
    backoff = _SETTLE_BACKOFF_START_S
    deadline = time.monotonic() + state.settle_retry_seconds
    try:
        while True:
            if time.monotonic() + backoff > deadline or state.closing:
                outcome = SettleOutcome(False, _UNAVAILABLE, detail="redis unavailable")
                break
            # Redis away: the hold is still ACTIVE there, so trying again is safe (a hold ends
            # once); if Redis stays away the sweeper expires the hold without a charge.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _SETTLE_BACKOFF_MAX_S)
            outcome = await engine.end_hold(hold, commit, amount)
            if outcome.state != _UNAVAILABLE:
                break
    except Exception:
        (metrics.commit_failed if commit else metrics.release_failed).inc()
        log.exception("ending hold %s of %s failed", hold.hold_id, hold.project_id)
        return
    _record(state, hold, commit, outcome)


def _record(state: GatewayState, hold: Hold, commit: bool, outcome: SettleOutcome) -> None:
    metrics = state.metrics
    if outcome.ok:
        metrics.hot.ended(commit, hold.meter, outcome.amount)
        return
    (metrics.commit_failed if commit else metrics.release_failed).inc()
    log.warning(
        "hold %s of %s not %s: %s %s",
        hold.hold_id,
        hold.project_id,
        "committed" if commit else "released",
        outcome.state,
        outcome.detail,
    )
