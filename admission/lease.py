"""Lease-mode admission: a gateway process admits from blocks it leases from Redis.

Theory of operation. Per project this process keeps one `LocalLease`: credits, rate-quota units
and concurrency slots taken from Redis by lease.lua. A request whose needs the lease covers is
decided here, in memory, without I/O (`try_admit`). Ending a request is local too (`end`):
commits accumulate per route+meter. A single background task syncs leases, all shards in one
round trip: every `lease_sync_ms` for a lease that was used, at once for a lease a waiting
request found short. A sync hands Redis the commits made since the last one (one outbox event
per route+meter), stamps the rate units used at Redis time, keeps what is in use plus the free
part still wanted, and grants more when the wallet and quotas allow (see admission/lua/lease.lua
and the exactness argument there).

What the lease protects, at every moment, in Redis (invariant 1):
- credits: local holds + commits not yet synced <= the lease amount, which is in `held`;
- concurrency: requests in flight here <= the pool, which is in the counter;
- rate: a unit is used only before its grant's expiry, at which it is stamped in the log.

Requests whose needs the lease does not cover wait for the next sync (one per tick at most),
then are decided from its reply as it is applied, in arrival order, before any request that
arrives later can spend the grant. A denial is decided locally only from a reply younger than
one sync interval, so a denial storm costs one sync per interval, and a change at the
authority (top-up, lifecycle) reaches decisions within the Watch latency plus one interval.

A gateway that dies loses the commits it had not synced yet (at most one interval: those
requests are never charged); Redis ends its lease at expiry (the sweeper): held credits and
concurrency slots come back, leased rate units stay counted until they leave the window.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mypy_extensions import mypyc_attr
from prometheus_client import CollectorRegistry

from admission.decision import (
    Decision,
    Hold,
    QuotaDefs,
    QuotaKind,
    QuotaStatus,
    Reason,
    Rendered,
    SettleOutcome,
    WalletState,
    fill_ratelimit,
    quota_statuses,
)
from admission.errors import REDIS_RETRY_S, AuthorityUnavailable, redis_unreachable
from admission.identity import PROJECT_RE
from admission.metrics import authority_metrics
from admission.policy import MAX_AMOUNT, Policy, QuotaDef, Route
from admission.ports import SnapshotFiller
from admission.store import (
    LeaseEvent,
    LeaseOp,
    LeaseQuotaOp,
    LeaseResult,
    LeaseStatus,
    Store,
)

log = logging.getLogger("admission.lease")

_PROJECT_RE = PROJECT_RE
_RATE = QuotaKind.RATE
_CONC = QuotaKind.CONCURRENCY
_EXPIRED = WalletState.EXPIRED
_GRACE = WalletState.GRACE
# Headroom a sync asks for: demand over this many sync intervals (the next interval, the round
# trip, and bursts) ...
_HORIZON_INTERVALS = 3
# ... or, when a busy event loop stretches the sync cycle past the interval, this many times
# (the measured cycle + the last round trip): what is asked for now must last until the grant
# after it lands. That time counts up to _CYCLE_CAP_S (and the lease TTL): a larger lease keeps
# credits and quota units from the other gateways for longer.
_CYCLE_HEADROOM = 1.5
_CYCLE_CAP_S = 0.25
# A waiting request asks for at least this many requests' worth (a new lease has no demand
# figure yet; the script's half-of-what-is-left rule keeps it from starving other gateways).
_MIN_BLOCK = 4
_MAX_LEASES = 100_000
# Syncs a request the lease does not cover may wait for. Waiters are decided when the reply
# is applied, in arrival order, before any other request can spend the grant. A grant can
# still fall short of them (requests of the fast path spent the kept part while the sync was
# in flight, or they registered after it was sent): they wait for the next sync. Only the last
# attempt denies without a reason from Redis (then: insufficient credits).
_ATTEMPTS = 3


class _Failure:
    """Why a waiting request's sync did not decide it (the request maps this to a Decision)."""

    __slots__ = ("detail", "reason", "retry")

    def __init__(self, reason: Reason | None, detail: str, retry: int | None = None) -> None:
        self.reason = reason  # None: Redis unavailable (the route's on_redis_down decides)
        self.detail = detail
        self.retry = retry


class _Quota:
    """One quota inside a lease, as its last sync left it plus local use since."""

    __slots__ = (
        "admitted",
        "free",
        "inflight",
        "kind",
        "limit",
        "need",
        "need_sum",
        "pool",
        "qdef",
        "remaining",
        "reset_s",
        "retry_s",
        "short_at",
        "used",
        "window",
    )

    def __init__(self, qdef: QuotaDef) -> None:
        self.qdef = qdef
        self.kind = qdef.kind
        self.limit = qdef.limit
        self.window = qdef.window_seconds
        self.free = 0  # rate: units of the current grant not used yet
        self.used = 0  # rate: units used since the last sync was sent
        self.pool = 0  # concurrency: slots held in Redis (after the last send: kept ones)
        self.inflight = 0  # concurrency: requests in flight here
        self.admitted = 0  # units/requests admitted since the last send (demand estimate)
        self.need = 0  # the largest need of a waiting request
        self.need_sum = 0
        self.remaining = qdef.limit  # from the last reply: limit minus all counted in Redis
        self.reset_s = 0
        self.retry_s = 0
        self.short_at = -1.0  # loop time of the last reply that could not serve `need`

    def available(self) -> int:
        return self.free if self.kind is _RATE else self.pool - self.inflight


class _Sums:
    """Commits of one route and meter not yet sent to Redis: the sums of the open outbox
    event, and the events closed before it. A commit that would take a sum past MAX_AMOUNT
    (what the authority takes in one event) closes the open event: each stays valid. The
    sums are fields, not list items: adding to a field boxes no integer."""

    __slots__ = ("amount", "closed", "count", "held")

    def __init__(self, amount: int, held: int) -> None:
        self.amount = amount
        self.held = held
        self.count = 1
        self.closed: list[tuple[int, int, int]] = []

    def add(self, amount: int, held: int) -> None:
        if self.amount + amount > MAX_AMOUNT or self.held + held > MAX_AMOUNT:
            self.closed.append((self.amount, self.held, self.count))
            self.amount = amount
            self.held = held
            self.count = 1
        else:
            self.amount += amount
            self.held += held
            self.count += 1

    def events(self) -> list[tuple[int, int, int]]:
        """(amount, held, count) of each event, in the order they were opened."""
        return [*self.closed, (self.amount, self.held, self.count)]


class LocalLease:
    """This process's lease of one project (see the module docstring)."""

    __slots__ = (
        "admitted",
        "closing",
        "cold",
        "credit_short",
        "dirty",
        "filled",
        "free",
        "grace_until_ms",
        "in_flight",
        "inflight",
        "lease_id",
        "low_room",
        "need",
        "need_sum",
        "pending",
        "project_id",
        "quotas",
        "replied_at",
        "retry_op",
        "sending",
        "sent_at",
        "seq",
        "shard",
        "spent",
        "state",
        "synced",
        "used_at",
        "valid_until",
        "views",
        "waiters",
    )

    def __init__(self, project_id: str, shard: int, lease_id: str, now: float) -> None:
        self.project_id = project_id
        self.shard = shard
        self.lease_id = lease_id
        self.seq = 0
        self.free = 0  # credits free for new holds
        self.inflight = 0  # credits of local holds not ended
        self.admitted = 0  # credits held since the last send (demand estimate)
        self.need = 0
        self.need_sum = 0
        # (route, meter) -> the commits not yet sent to Redis (one outbox event or more).
        self.pending: dict[tuple[str, str], _Sums] = {}
        self.quotas: dict[str, _Quota] = {}
        # route name -> its quotas here, resolved and rendered; cleared by every reply. The
        # view's route is checked: another Route object of the same name builds a new view.
        self.views: dict[str, _View] = {}
        self.state = WalletState.UNSPECIFIED
        self.low_room = 0  # LOW while more than this is in flight here (LeaseResult) ...
        self.spent = 0  # ... or committed here since the sync that said so
        self.grace_until_ms = 0
        self.credit_short: Reason | None = None
        self.synced = False  # a sync answered: the fields above are Redis's
        self.dirty = False  # admitted or ended something since the last send
        self.cold = False
        self.filled = False  # a cache fill ran since the last COLD answer
        self.closing = False
        self.sending = False
        self.in_flight: LeaseOp | None = None  # the sync on its way to Redis now
        self.retry_op: LeaseOp | None = None  # sent, outcome unknown: re-sent as is
        self.sent_at = now
        self.replied_at = -1.0
        self.used_at = now
        self.valid_until = -1.0  # loop time after which nothing leased may be used
        # Requests waiting for the next sync: their answer, what they need, last attempt or not.
        self.waiters: list[_Waiter] = []

    @property
    def idle(self) -> bool:
        return (
            self.inflight == 0
            and not self.pending
            and self.retry_op is None
            and all(q.inflight == 0 and q.used == 0 for q in self.quotas.values())
        )


# A waiting request's answer: decided at the reply (Decision), to wait for another sync (None),
# or a failure the request maps to a Decision.
_Answer = Decision | _Failure | None
_Waiter = tuple[asyncio.Future[_Answer], "_RouteSpec", bool]


@dataclass(slots=True)
class LeaseStats:
    syncs: int = 0  # sync rounds (one Redis round trip each)
    ops: int = 0  # lease operations sent
    errors: int = 0  # rounds or shards that failed
    closed: int = 0
    renewed: int = 0  # leases Redis had expired while this process still used them
    cold: int = 0
    fast: int = 0  # requests decided without waiting
    waited: int = 0  # requests that waited for a sync


@dataclass(frozen=True, slots=True)
class _RouteSpec:
    route: Route
    policy: Policy
    problem: str | None
    quotas: tuple[QuotaDef, ...]


class _View:
    """A route's quotas inside one lease, resolved once per sync reply: the fast path
    touches the _Quota objects directly and renders its headers from a template."""

    __slots__ = ("conc", "conc_names", "defs", "fmt", "policy", "quotas", "rate", "spec")

    def __init__(self, spec: _RouteSpec, quotas: tuple[_Quota, ...]) -> None:
        self.spec = spec
        self.quotas = quotas
        self.rate = tuple(q for q in quotas if q.kind is _RATE)
        self.conc = tuple(q for q in quotas if q.kind is not _RATE)
        self.conc_names = tuple(q.qdef.name for q in self.conc)
        self.defs: QuotaDefs = tuple(
            (q.qdef.name, q.kind, q.limit, q.window if q.kind is _RATE else 0) for q in quotas
        )
        self.policy: str | None = None
        self.fmt: tuple[str, ...] | None = None  # the RateLimit template (decision.fill_ratelimit)


# Renders (RateLimit-Policy value, RateLimit template) for quota definitions; the gateway
# passes gateway_plugin.headers.ratelimit_templates.
Templates = Callable[[QuotaDefs], tuple[str, tuple[str, ...]]]


# Compiled (admission.native), a Python subclass may still override its methods (the tests
# intercept _apply and _check that way).
@mypyc_attr(allow_interpreted_subclasses=True)
class LeaseAdmitter:
    """Admission from per-project leases; one per process (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        policy: Policy,
        filler: SnapshotFiller,
        *,
        route_problem: Callable[[Route], str | None],
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
        templates: Templates | None = None,
    ) -> None:
        self.policy = policy
        # Without templates, decisions carry QuotaStatus values and no rendered headers.
        self._templates = templates
        self._store = store
        self._filler = filler
        self._route_problem = route_problem
        s = policy.settings
        self._sync_s = s.lease_sync_ms / 1000
        self._ttl_ms = s.lease_ttl_ms
        self._ttl_s = s.lease_ttl_ms / 1000
        # Stop using a grant this long before its expiry in Redis (clock rates, scheduling).
        self._margin_s = max(0.05, self._ttl_s / 10)
        self._idle_s = s.lease_idle_ms / 1000
        self._clock = clock
        self._leases: dict[str, LocalLease] = {}
        # Closing leases a newer lease of the same project replaced in _leases.
        self._retiring: dict[str, LocalLease] = {}
        self._by_id: dict[str, LocalLease] = {}
        self._specs: dict[int, _RouteSpec] = {}
        self._prefix = "L" + secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        # shard -> until when its Redis is taken as down (a sync of it failed): meanwhile a
        # request the lease does not cover is decided by its route's on_redis_down at once,
        # instead of each one waiting for a sync to time out.
        self._shard_down_until: dict[int, float] = {}
        # Shards whose shared lease.lua call got an error reply (one project's broken keys
        # fail the whole call): their ops go one per call until no error reply is left.
        self._solo_shards: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._fills: set[asyncio.Task[None]] = set()
        self._rounds: set[asyncio.Task[int]] = set()
        # The sync cycle the event loop really runs (time between the starts of the last two
        # rounds) and the last round's duration (its round trip as the loop sees it): a busy
        # loop stretches both well past lease_sync_ms. Grants are sized for them (_build).
        self._round_at = -1.0
        self._cycle_s = self._sync_s
        self._round_s = 0.0
        self._closed = False
        self._stopping = False
        self.stats = LeaseStats()
        self._metrics = authority_metrics(registry)

    # -- requests ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _spec(self, route: Route) -> _RouteSpec:
        spec = self._specs.get(id(route))
        if spec is None or spec.route is not route or spec.policy is not self.policy:
            if len(self._specs) >= 1024:
                self._specs.clear()
            quotas = tuple(self.policy.quotas[q] for q in route.quotas if q in self.policy.quotas)
            spec = _RouteSpec(route, self.policy, self._route_problem(route), quotas)
            self._specs[id(route)] = spec
        return spec

    def try_admit(self, route: Route, project_id: str) -> Decision | None:
        """The decision if this process can make it now without Redis, else None."""
        lease = self._leases.get(project_id)
        if lease is None or not lease.synced or lease.closing:
            return None
        view = lease.views.get(route.name)
        if view is None or view.spec.route is not route:
            spec = self._spec(route)
            if spec.problem is not None:
                return None
            view = self._view(lease, spec)
            if view is None:
                return None
        now = self._now()
        if now >= lease.valid_until:
            return None
        # The common case, decided with the fewest steps: everything the request needs is
        # here. Anything else (a denial, an exhausted part) goes through _check.
        cost = route.cost
        state = lease.state
        if cost <= lease.free and state is not _EXPIRED and (cost == 0 or state is not _GRACE):
            weight = route.weight
            for q in view.rate:
                if q.free < weight:
                    break
            else:
                for q in view.conc:
                    if q.pool - q.inflight < 1:
                        break
                else:
                    self.stats.fast += 1
                    return self._take(lease, view, now)
        decision = self._check(lease, view.spec, now, final=False)
        if decision is not None:
            self.stats.fast += 1
        return decision

    def _view(self, lease: LocalLease, spec: _RouteSpec) -> _View | None:
        quotas = []
        for qdef in spec.quotas:
            q = lease.quotas.get(qdef.name)
            if q is None:  # a quota no sync has seen yet
                return None
            quotas.append(q)
        view = _View(spec, tuple(quotas))
        if self._templates is not None:
            view.policy, view.fmt = self._templates(view.defs)
        lease.views[spec.route.name] = view
        return view

    async def admit(self, route: Route, project_id: str) -> Decision:
        """Decide one request, waiting for a sync when the lease does not cover it."""
        decision = self.try_admit(route, project_id)
        if decision is not None:
            return decision
        spec = self._spec(route)
        if spec.problem is not None:
            return Decision(False, Reason.INVALID_REQUEST, project_id, detail=spec.problem)
        if not (type(project_id) is str and _PROJECT_RE.match(project_id)):
            detail = f"bad project id {project_id!r}"
            return Decision(False, Reason.INVALID_REQUEST, project_id, detail=detail)
        if self._closed:
            return self._failed(spec.route, project_id, _Failure(None, "the gateway is stopping"))
        if self._shard_down_until:
            from admission import keys

            down_until = self._shard_down_until.get(
                keys.shard_of(project_id, self.policy.settings.shards)
            )
            if down_until is not None and self._now() < down_until:
                detail = "a sync with this shard failed less than a second ago"
                return self._failed(spec.route, project_id, _Failure(None, detail))
        self.stats.waited += 1
        self._metrics.lease_waits.inc()
        for attempt in range(_ATTEMPTS):
            if self._closed:
                break
            lease = self._lease(project_id)
            for qdef in spec.quotas:
                if qdef.name not in lease.quotas:
                    lease.quotas[qdef.name] = _Quota(qdef)
                    lease.views.clear()
            fut: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
            lease.waiters.append((fut, spec, attempt == _ATTEMPTS - 1))
            self._wake.set()
            try:
                answer = await fut
            except asyncio.CancelledError:
                # Cancelled after the reply admitted it: what it took goes back to the lease.
                if fut.done() and not fut.cancelled():
                    late = fut.result()
                    if isinstance(late, Decision) and late.hold is not None:
                        self.end_local(late.hold, False, 0)
                raise
            if isinstance(answer, Decision):
                return answer
            if answer is not None:
                return self._failed(spec.route, project_id, answer)
        # Only when the gateway stops meanwhile, or the lease closed under every attempt.
        return self._failed(spec.route, project_id, _Failure(None, "lease unavailable"))

    def _lease(self, project_id: str) -> LocalLease:
        lease = self._leases.get(project_id)
        if lease is None or lease.closing:
            if lease is not None:
                # Its CLOSE is in flight or must be re-sent: keep syncing it until it is done.
                self._retiring[lease.lease_id] = lease
            if len(self._leases) >= _MAX_LEASES:
                self._evict_idle()
            from admission import keys

            shard = keys.shard_of(project_id, self.policy.settings.shards)
            lease_id = f"{self._prefix}{next(self._ids):x}"
            lease = LocalLease(project_id, shard, lease_id, self._now())
            self._leases[project_id] = lease
            self._by_id[lease_id] = lease
        return lease

    def _evict_idle(self) -> None:
        for lease in list(self._leases.values()):
            if lease.idle and not lease.waiters and not lease.sending:
                lease.closing = True

    @staticmethod
    def _needs(lease: LocalLease) -> None:
        """What the waiting requests need, into the need fields of the lease and its quotas."""
        lease.need = lease.need_sum = 0
        quotas = lease.quotas
        for q in quotas.values():
            q.need = q.need_sum = 0
        for _, spec, _ in lease.waiters:
            route = spec.route
            cost = route.cost
            if cost > 0:
                lease.need = max(lease.need, cost)
                lease.need_sum += cost
            for qdef in spec.quotas:
                q = quotas[qdef.name]
                n = route.weight if q.kind is _RATE else 1
                q.need = max(q.need, n)
                q.need_sum += n

    def _check(
        self, lease: LocalLease, spec: _RouteSpec, now: float, final: bool
    ) -> Decision | None:
        """Admit from the lease, or deny from a fresh reply (always decide when `final`)."""
        route = spec.route
        fresh = final or now - lease.replied_at < self._sync_s
        state = lease.state
        reason: Reason | None = None
        retry: int | None = None
        cost = route.cost
        s = self.policy.settings
        if state is _EXPIRED:
            if not fresh:
                return None
            reason = Reason.WALLET_EXPIRED
        elif cost > 0 and state is _GRACE:
            if not fresh:
                return None
            reason, retry = Reason.WALLET_GRACE, s.credit_retry_after_seconds
        elif cost > lease.free:
            if not (final or (fresh and lease.credit_short is not None)):
                return None
            reason = lease.credit_short or Reason.INSUFFICIENT_CREDITS
            retry = (
                s.backlog_retry_after_seconds
                if reason is Reason.SETTLEMENT_BACKLOG
                else s.credit_retry_after_seconds
            )
        view = lease.views.get(route.name)
        if view is None or view.spec is not spec:
            view = self._view(lease, spec)
            if view is None:
                return None
        weight = route.weight
        for q in view.quotas:
            if q.kind is _RATE:
                if q.free >= weight:
                    continue
                if not (final or (now - q.short_at < self._sync_s)):
                    return None
                if reason is None:
                    reason = Reason.RATE_LIMITED
                if reason in (Reason.RATE_LIMITED, Reason.CONCURRENCY_LIMITED):
                    retry = max(retry or 1, q.retry_s or 1)
            else:
                if q.pool - q.inflight >= 1:
                    continue
                if not (final or (now - q.short_at < self._sync_s)):
                    return None
                if reason is None:
                    reason = Reason.CONCURRENCY_LIMITED
                if reason in (Reason.RATE_LIMITED, Reason.CONCURRENCY_LIMITED):
                    retry = max(retry or 1, 1)
        if reason is not None:
            return self._deny(lease, spec, reason, retry)
        return self._take(lease, view, now)

    def _take(self, lease: LocalLease, view: _View, now: float) -> Decision:
        """Admit: take what the request needs from the lease (it was checked to be there)."""
        route = view.spec.route
        weight = route.weight
        for q in view.rate:
            q.free -= weight
            q.used += weight
            q.admitted += weight
        for q in view.conc:
            q.inflight += 1
            q.admitted += 1
        cost = route.cost
        hold = None
        if cost > 0 or view.conc:
            lease.free -= cost
            lease.inflight += cost
            lease.admitted += cost
            hold = Hold(
                lease.lease_id,
                lease.project_id,
                lease.shard,
                cost,
                route.name,
                route.meter,
                route.allow_overage,
                view.conc_names,
            )
        lease.used_at = now
        lease.dirty = True
        # What remains after this admission, laid out as admission.decision.Rendered wants.
        figures: list[int] = []
        for q in view.quotas:
            if q.kind is _RATE:
                left = q.remaining + q.free
                figures.append(left if left > 0 else 0)
                figures.append(q.reset_s if q.reset_s > 0 else 0)
            else:
                left = q.remaining + q.pool - q.inflight
                figures.append(left if left > 0 else 0)
        fig = tuple(figures)
        fmt = view.fmt
        rendered: Rendered | None = None
        quotas: tuple[QuotaStatus, ...] | None = ()
        if not fig:
            pass
        elif fmt is not None and view.policy is not None:
            rendered = Rendered(view.policy, fill_ratelimit(fmt, fig), view.defs, fig)
            quotas = None  # built from `rendered` if someone reads Decision.quotas
        else:
            quotas = quota_statuses(view.defs, fig)
        return Decision(
            True,
            Reason.ADMITTED,
            lease.project_id,
            hold,
            quotas,
            None,
            lease.state,
            lease.inflight + lease.spent > lease.low_room,
            lease.grace_until_ms,
            route.shadow,
            None,
            "",
            False,
            rendered,
        )

    def _statuses(self, lease: LocalLease, spec: _RouteSpec) -> tuple[QuotaStatus, ...]:
        out = []
        for qdef in spec.quotas:
            q = lease.quotas.get(qdef.name)
            if q is None:
                continue
            out.append(
                QuotaStatus(
                    qdef.name,
                    q.kind,
                    q.limit,
                    q.window if q.kind is _RATE else 0,
                    max(0, q.remaining + q.available()),
                    q.reset_s if q.kind is _RATE else 0,
                )
            )
        return tuple(out)

    def _deny(
        self, lease: LocalLease, spec: _RouteSpec, reason: Reason, retry: int | None
    ) -> Decision:
        if spec.route.shadow:
            return Decision(
                True,
                Reason.ADMITTED,
                lease.project_id,
                quotas=self._statuses(lease, spec),
                wallet_state=lease.state,
                low_balance=lease.inflight + lease.spent > lease.low_room,
                grace_until_ms=lease.grace_until_ms,
                shadow=True,
                would_deny=reason,
            )
        return Decision(
            False,
            reason,
            lease.project_id,
            quotas=self._statuses(lease, spec),
            retry_after_seconds=retry,
            wallet_state=lease.state,
            low_balance=lease.inflight + lease.spent > lease.low_room,
            grace_until_ms=lease.grace_until_ms,
        )

    def _failed(self, route: Route, project_id: str, failure: _Failure) -> Decision:
        s = self.policy.settings
        retry: int | None
        if failure.reason is None:  # Redis unavailable: the route's failure policy
            detail = f"redis unavailable: {failure.detail}"
            if route.on_redis_down == "allow":
                return Decision(
                    True,
                    Reason.ADMITTED,
                    project_id,
                    degraded=True,
                    shadow=route.shadow,
                    detail=detail,
                )
            reason, retry = Reason.UNAVAILABLE, s.unavailable_retry_after_seconds
        else:
            reason, retry, detail = failure.reason, failure.retry, failure.detail
        if route.shadow:
            return Decision(
                True,
                Reason.ADMITTED,
                project_id,
                shadow=True,
                would_deny=reason,
                detail=detail,
                degraded=failure.reason is None,
            )
        return Decision(False, reason, project_id, retry_after_seconds=retry, detail=detail)

    def end(self, hold: Hold, commit: bool, amount: object = None) -> SettleOutcome:
        """End a request's local hold: commit `amount` (None: the held amount) or release.

        A commit of anything but an int (a bool, a float) releases the hold and answers
        INVALID (UNKNOWN if the hold's lease is not in this process). Typed `object`, checked
        here: compiled, a parameter typed int would turn a bool into 1 and refuse a float with
        TypeError before this method could answer.
        """
        if not commit:
            charge = 0
        elif amount is None:
            charge = hold.amount
        elif type(amount) is int:
            charge = amount
        else:
            released = self.end_local(hold, False, 0)
            detail = f"bad commit amount {amount!r}"
            return released or SettleOutcome(False, "INVALID", detail=detail)
        outcome = self.end_local(hold, commit, charge)
        if outcome is not None:
            return outcome
        return (
            SettleOutcome(True, "COMMITTED", charge) if commit else SettleOutcome(True, "RELEASED")
        )

    def end_local(self, hold: Hold, commit: bool, amount: int) -> SettleOutcome | None:
        """end() for the middleware: None when the hold ended as asked (commit `amount`, or
        release), else the outcome saying what happened instead."""
        lease = self._by_id.get(hold.hold_id)
        if lease is None:
            return SettleOutcome(False, "UNKNOWN", detail="no such lease in this process")
        held = hold.amount
        charge = 0
        outcome = None
        if commit:
            charge = amount
            # The type too: run as source, a bool or a float would pass the range check and
            # then make every sync of the lease fail in the script.
            if type(charge) is not int or not 0 <= charge <= MAX_AMOUNT:
                charge = 0
                outcome = SettleOutcome(False, "INVALID", detail=f"bad commit amount {amount!r}")
            elif charge > held and not hold.allow_overage:
                charge = 0
                outcome = SettleOutcome(
                    False,
                    "RELEASED",
                    detail=f"commit {amount} exceeds the hold of {held} and the route does "
                    "not allow overage: released",
                )
        lease.dirty = True
        lease.inflight -= held
        lease.free += held - charge
        if charge > 0:
            lease.spent += charge
            key = (hold.route, hold.meter)
            sums = lease.pending.get(key)
            if sums is None:
                lease.pending[key] = _Sums(charge, held)
            else:
                sums.add(charge, held)
        for name in hold.counters:
            q = lease.quotas.get(name)
            if q is not None and q.kind is _CONC and q.inflight > 0:
                q.inflight -= 1
        return outcome

    # -- syncing ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="creditgate-lease-sync"
            )

    async def _run(self) -> None:
        while not self._stopping:
            # With no lease to keep, nothing is due until a request opens one (and wakes us).
            idle = not self._leases and not self._retiring
            try:
                async with asyncio.timeout(None if idle else self._sync_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                return
            # One more loop turn: requests dispatched in this iteration join the round.
            await asyncio.sleep(0)
            try:
                await self.sync_round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("creditgate lease sync round failed")

    async def sync_round(self, *, closing: bool = False, force: bool = False) -> int:
        """Send every lease that needs a sync (every used one when `force`, all of them when
        `closing`); returns how many. The round runs in a task of its own: a caller cancelled
        meanwhile cannot leave an answered sync unapplied."""
        task = asyncio.get_running_loop().create_task(self._round(closing, force))
        self._rounds.add(task)
        task.add_done_callback(self._rounds.discard)
        return await asyncio.shield(task)

    async def flush(self, within_s: float = 5.0) -> bool:
        """Send the commits made so far to Redis now; True when none is left unsent."""
        try:
            async with asyncio.timeout(within_s):
                while True:
                    if self._rounds:
                        await asyncio.wait(set(self._rounds))
                    if not any(
                        lease.pending or lease.retry_op is not None
                        for lease in self._leases.values()
                    ):
                        return True
                    await self.sync_round(force=True)
        except TimeoutError:
            return False

    async def _round(self, closing: bool, force: bool) -> int:
        now = self._now()
        gap = now - self._round_at
        self._round_at = now
        # A gap beyond the cap is an idle spell (no lease to sync), not a slow loop.
        self._cycle_s = gap if gap < _CYCLE_CAP_S else self._sync_s
        picked: list[tuple[LocalLease, LeaseOp]] = []
        for lease in [*self._leases.values(), *self._retiring.values()]:
            if lease.sending:
                continue
            op = self._op_for(lease, now, closing, force)
            if op is not None:
                picked.append((lease, op))
        if not picked:
            return 0
        by_shard: dict[int, list[LeaseOp]] = {}
        solo: list[LeaseOp] = []
        for lease, op in picked:
            lease.sending = True
            lease.in_flight = op
            if op.shard in self._solo_shards:
                solo.append(op)
            else:
                by_shard.setdefault(op.shard, []).append(op)
        self.stats.syncs += 1
        self.stats.ops += len(picked)
        m = self._metrics
        m.lease_rounds.inc()
        m.leases.set(len(self._leases))
        started = time.perf_counter()
        calls = [
            self._store.run_leases(by_shard),
            *(self._store.run_leases({op.shard: [op]}) for op in solo),
        ]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        self._round_s = min(self._now() - now, _CYCLE_CAP_S)
        # StoreUnavailable for all shards of a call, or a bug: every op of that call failed.
        results: dict[int, list[LeaseResult] | BaseException] = (
            {shard: replies[0] for shard in by_shard}
            if isinstance(replies[0], BaseException)
            else replies[0]
        )
        own: dict[int, list[LeaseResult] | BaseException | None] = {
            id(op): reply if isinstance(reply, BaseException) else reply.get(op.shard)
            for op, reply in zip(solo, replies[1:], strict=True)
        }
        m.lease_round_duration.observe(time.perf_counter() - started)
        position: dict[int, int] = {}
        solo_shards = {op.shard for op in solo}
        still_failing: set[int] = set()
        for lease, op in picked:
            lease.sending = False
            lease.in_flight = None
            alone = op.shard in solo_shards
            res = own.get(id(op)) if alone else results.get(op.shard)
            m.lease_ops.labels(op.kind).inc()
            if isinstance(res, BaseException) or res is None:
                self.stats.errors += 1
                m.lease_errors.inc()
                if res is None or redis_unreachable(res):
                    # Requests the leases do not cover are decided at once by on_redis_down
                    # for a while; syncs of leases with work keep probing Redis meanwhile.
                    self._shard_down_until[op.shard] = self._now() + REDIS_RETRY_S
                elif alone:
                    still_failing.add(op.shard)
                elif len(by_shard[op.shard]) > 1:
                    # An error reply to a call shared by several projects: from the next round
                    # this shard's ops go one per call, so that the op that causes it no longer
                    # fails the others (each op is re-sent as is; lease.lua knows it by seq).
                    self._solo_shards.add(op.shard)
                lease.retry_op = op
                self._resolve(lease, _Failure(None, repr(res)))
                continue
            if alone:
                i = 0
            else:
                i = position.get(op.shard, 0)
                position[op.shard] = i + 1
            self._shard_down_until.pop(op.shard, None)
            lease.retry_op = None
            try:
                self._apply(lease, op, res[i])
            except Exception:  # a bug: this lease is dropped, the others still get their answer
                log.exception("applying the sync of lease %s failed", lease.lease_id)
                self._forget(lease)
                self._resolve(lease, _Failure(None, "lease sync could not be applied"))
        self._solo_shards -= solo_shards - still_failing
        return len(picked)

    def _op_for(
        self, lease: LocalLease, now: float, closing: bool, force: bool = False
    ) -> LeaseOp | None:
        if lease.retry_op is not None:
            if lease.waiters or closing or force or now - lease.sent_at >= self._sync_s:
                return lease.retry_op
            return None
        if lease.cold and not (closing or force):
            return None
        if lease.closing and lease.seq == 0:
            self._forget(lease)
            return None
        close = lease.closing or closing
        if not close:
            if lease.waiters or (lease.dirty and (force or now - lease.sent_at >= self._sync_s)):
                pass
            elif lease.idle and now - lease.used_at >= self._idle_s:
                close = True
                lease.closing = True
            elif lease.synced and now >= lease.valid_until - self._ttl_s / 2:
                pass  # keep alive: requests in flight, or free units not yet given back
            else:
                return None
        if close and not lease.idle:
            # Requests in flight here: sync what is done, keep their share, close later.
            close = False
            lease.closing = False
        return self._build(lease, now, close, stopping=closing)

    def _build(self, lease: LocalLease, now: float, close: bool, stopping: bool = False) -> LeaseOp:
        elapsed = max(now - lease.sent_at, self._sync_s)
        # Until the grant after this one lands: the next cycle and its round trip.
        until_next = min(self._cycle_s + self._round_s, _CYCLE_CAP_S, self._ttl_s)
        horizon = max(self._sync_s * _HORIZON_INTERVALS, _CYCLE_HEADROOM * until_next)
        self._needs(lease)
        lease.seq += 1
        seq = lease.seq
        events: list[LeaseEvent] = []
        for (route, meter), sums in lease.pending.items():
            for amount, held, count in sums.events():
                eid = f"{lease.lease_id}.{seq}.{len(events)}"
                events.append(LeaseEvent(eid, amount, held, count, meter, route))
        lease.pending = {}
        if close:
            keep = want = want_min = 0
            lease.closing = True
            lease.free = 0
            lease.valid_until = -1.0
        else:
            target = max(
                lease.need_sum,
                lease.need * _MIN_BLOCK,
                math.ceil(lease.admitted / elapsed * horizon),
            )
            free_kept = min(max(lease.free, 0), target)
            keep = lease.inflight + free_kept
            want = 0 if stopping else max(0, target - free_kept)
            # All waiting requests, not only the largest: a burst gets what is left at once.
            want_min = max(0, lease.need_sum - free_kept)
            lease.free = free_kept
        quota_ops = []
        for q in lease.quotas.values():
            if close:
                qop = LeaseQuotaOp(q.qdef, q.used, 0, 0, 0)
                q.free = q.pool = 0
            else:
                target = max(
                    q.need_sum, q.need * _MIN_BLOCK, math.ceil(q.admitted / elapsed * horizon)
                )
                kept = min(max(q.available(), 0), target)
                want_q, want_min_q = max(0, target - kept), max(0, q.need_sum - kept)
                if stopping:
                    want_q = want_min_q = 0
                if q.kind is _RATE:
                    qop = LeaseQuotaOp(q.qdef, q.used, kept, want_q, want_min_q)
                    q.free = kept
                else:
                    qop = LeaseQuotaOp(q.qdef, 0, q.inflight + kept, want_q, want_min_q)
                    q.pool = q.inflight + kept
            q.used = 0
            q.admitted = 0
            quota_ops.append(qop)
        lease.admitted = 0
        lease.sent_at = now
        lease.dirty = False
        return LeaseOp(
            "CLOSE" if close else "SYNC",
            lease.shard,
            lease.lease_id,
            lease.project_id,
            seq,
            self._ttl_ms,
            keep,
            want,
            want_min,
            self.policy.settings.unsettled_limit,
            tuple(quota_ops),
            tuple(events),
        )

    def _apply(self, lease: LocalLease, op: LeaseOp, res: LeaseResult) -> None:
        now = self._now()
        if res.status not in (LeaseStatus.OK, LeaseStatus.COLD):
            log.error(
                "lease %s of %s: unexpected sync status %s; starting a new lease",
                lease.lease_id,
                lease.project_id,
                res.status.name,
            )
            self._forget(lease)
            self._resolve(lease, _Failure(None, f"lease sync answered {res.status.name}"))
            return
        if res.renewed:
            self.stats.renewed += 1
            self._metrics.lease_renewed.inc()
        if op.kind == "CLOSE":
            self.stats.closed += 1
            self._forget(lease)
            # A request that registered meanwhile went to a new lease; nothing waits here.
            self._resolve(lease, None)
            return
        lease.views.clear()  # limits, windows or kinds may have changed
        lease.free += res.amount - op.keep
        lease.state = res.wallet_state
        lease.low_room = res.low_room
        # The room counts the commits this sync carried; those made since still count here.
        lease.spent = max(0, lease.spent - sum([e.amount for e in op.events]))
        lease.grace_until_ms = res.grace_until_ms
        lease.replied_at = now
        lease.valid_until = lease.sent_at + self._ttl_s - self._margin_s
        granted = res.amount - op.keep
        ok = res.status is LeaseStatus.OK
        short = granted < op.want_min or res.reason is Reason.WALLET_EXPIRED
        lease.credit_short = res.reason if short and ok else None
        for qop, qr in zip(op.quotas, res.quotas, strict=True):
            q = lease.quotas.get(qop.quota.name)
            if q is None:
                continue
            if q.kind is not qr.kind:
                # The script undid the old kind's state: requests in flight hold no slot now.
                q.kind = qr.kind
                q.free = 0
                q.pool = 0
                q.inflight = 0
            q.limit = qr.limit
            q.window = qr.window_seconds
            q.remaining = qr.remaining
            q.reset_s = qr.reset_seconds
            if q.kind is _RATE:
                q.free += qr.granted - qop.keep
            else:
                q.pool = qr.granted
            if ok and qop.want_min > 0 and qr.granted - qop.keep < qop.want_min:
                q.short_at = now
                q.retry_s = qr.retry_after_seconds
        if res.status is LeaseStatus.COLD:
            self.stats.cold += 1
            if lease.filled:
                lease.filled = False
                detail = "the project snapshot is still missing after a cache fill"
                retry = self.policy.settings.unavailable_retry_after_seconds
                self._resolve(lease, _Failure(Reason.UNAVAILABLE, detail, retry))
                return
            lease.cold = True
            task = asyncio.get_running_loop().create_task(self._fill(lease))
            self._fills.add(task)
            task.add_done_callback(self._fills.discard)
            return
        lease.synced = True
        lease.filled = False
        self._decide_waiters(lease, now)

    async def _fill(self, lease: LocalLease) -> None:
        try:
            await self._fill_once(lease)
        finally:
            lease.cold = False  # also when cancelled: the lease must still sync its commits

    async def _fill_once(self, lease: LocalLease) -> None:
        failure: _Failure | None = None
        try:
            known = await self._filler.fill(lease.project_id)
        except AuthorityUnavailable as exc:
            failure = _Failure(
                Reason.UNAVAILABLE,
                f"project not cached and the authority is unreachable: {exc}",
                self.policy.settings.unavailable_retry_after_seconds,
            )
        except Exception as exc:
            log.exception("cache fill of %s failed", lease.project_id)
            failure = _Failure(None, f"cache fill failed: {exc!r}")
        else:
            if not known:
                failure = _Failure(
                    Reason.UNKNOWN_PROJECT, "the authority does not know this project"
                )
        lease.cold = False
        lease.filled = failure is None
        if failure is not None:
            self._resolve(lease, failure)
            if lease.idle and not lease.synced:
                lease.closing = True
            return
        self._wake.set()  # the waiters stay registered: the next round syncs them again

    def _resolve(self, lease: LocalLease, failure: _Failure | None) -> None:
        waiters, lease.waiters = lease.waiters, []
        for fut, _, _ in waiters:
            if not fut.done():
                fut.set_result(failure)

    def _decide_waiters(self, lease: LocalLease, now: float) -> None:
        """Decide the waiting requests from the reply just applied, in arrival order.

        Done here, before any other request runs, so the fast path cannot spend a grant that
        was asked for the waiters. A waiter the reply does not decide waits for another sync.
        """
        waiters, lease.waiters = lease.waiters, []
        usable = now < lease.valid_until and not lease.closing
        for fut, spec, final in waiters:
            if fut.done():  # its request was cancelled
                continue
            answer: _Answer = None
            if usable:
                try:
                    answer = self._check(lease, spec, now, final)
                except Exception:  # a bug: this request fails, the others are still decided
                    log.exception("deciding a request of lease %s failed", lease.lease_id)
                    answer = _Failure(None, "the lease reply could not be applied to it")
            fut.set_result(answer)

    def _forget(self, lease: LocalLease) -> None:
        self._retiring.pop(lease.lease_id, None)
        if self._leases.get(lease.project_id) is lease:
            del self._leases[lease.project_id]
        self._by_id.pop(lease.lease_id, None)

    def invalidate(self, project_id: str) -> None:
        """A change at the authority: decide nothing more from the last reply (sync first)."""
        lease = self._leases.get(project_id)
        if lease is not None:
            lease.replied_at = -1.0
            lease.credit_short = None
            for q in lease.quotas.values():
                q.short_at = -1.0
            if lease.state in (_EXPIRED, _GRACE):
                lease.valid_until = -1.0

    @property
    def leases(self) -> Sequence[LocalLease]:
        return list(self._leases.values())

    def unsynced_commits(self) -> int:
        """Commits recorded in leases and not yet in Redis (they go with the next sync)."""
        return sum(
            _unsent(lease)[0] for lease in [*self._leases.values(), *self._retiring.values()]
        )

    async def aclose(self, within_s: float = 4.0) -> None:
        """Stop syncing and hand every lease back (commits included); idempotent.

        Closing syncs are retried (with backoff) for up to `within_s` while Redis does not
        answer. Commits that still could not be sent are lost to the ledger (their requests are
        never charged): they are counted in an ERROR log line, never dropped silently.
        """
        self._closed = True
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            # Not cancelled: a round in flight must come back (its outcome decides the leases).
            await asyncio.wait({task})
        for fill in list(self._fills):
            fill.cancel()
        if self._fills:
            await asyncio.wait(set(self._fills))
        if self._rounds:  # e.g. a flush() that gave up waiting: its answer decides the leases
            await asyncio.wait(set(self._rounds))
        for lease in list(self._leases.values()):
            self._resolve(lease, _Failure(None, "the gateway is stopping"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        backoff = 0.05
        try:
            for attempt in itertools.count():
                errors = self.stats.errors
                await self.sync_round(closing=True)
                if not self._leases and not self._retiring:
                    break
                # A second round may be needed (a sync already due goes first); beyond that,
                # only a round that met a Redis failure is worth another try: a lease that
                # cannot close for another reason (a hold never ended) would not close later.
                failed = self.stats.errors != errors
                if (attempt >= 1 and not failed) or loop.time() + backoff > deadline:
                    break
                if not failed:
                    continue
                await asyncio.sleep(backoff)  # Redis away: try again, up to the deadline
                backoff = min(backoff * 2, 0.5)
        finally:
            for lease in list(self._leases.values()):
                self._resolve(lease, _Failure(None, "the gateway is stopping"))
            self._report_lost()

    def _report_lost(self) -> None:
        lost: list[tuple[str, int, int]] = []
        for lease in [*self._leases.values(), *self._retiring.values()]:
            count, credits = _unsent(lease)
            if count:
                lost.append((lease.project_id, count, credits))
        if lost:
            log.error(
                "creditgate: Redis did not answer at shutdown: %d commits (%d credits) of %d "
                "projects are unconfirmed; those Redis did not apply (all of them unless a sync "
                "sent before was still queued there) are never recorded nor charged: %s",
                sum(n for _, n, _ in lost),
                sum(c for _, _, c in lost),
                len(lost),
                ", ".join(f"{pid}: {n} commits, {c} credits" for pid, n, c in lost[:20]),
            )


def _unsent(lease: LocalLease) -> tuple[int, int]:
    """(commits, credits) a lease holds that Redis has not confirmed: recorded since the last
    send, those of the sync on its way now, and those of a sent sync whose outcome is unknown
    (re-sent as is)."""
    count = credits = 0
    for sums in lease.pending.values():
        for amount, _, n in sums.events():
            credits += amount
            count += n
    ops = [] if lease.retry_op is None else [lease.retry_op]
    if lease.in_flight is not None and lease.in_flight is not lease.retry_op:  # a re-send
        ops.append(lease.in_flight)
    for op in ops:
        for event in op.events:
            count += event.count
            credits += event.amount
    return count, credits
