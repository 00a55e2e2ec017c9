"""The admission engine API: admit, commit, release, sweep; usable without aiohttp.

Turns requests into batched Redis script operations and their results into Decision values.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from admission import keys
from admission.batcher import Batcher
from admission.decision import (
    AdmitRequest,
    Decision,
    Hold,
    Reason,
    SettleOutcome,
)
from admission.errors import (
    REDIS_ERRORS,
    REDIS_RETRY_S,
    AuthorityUnavailable,
    StoreUnavailable,
    redis_unreachable,
)
from admission.identity import PROJECT_RE
from admission.policy import MAX_AMOUNT, Policy, QuotaDef, Route
from admission.ports import SnapshotFiller
from admission.store import (
    AdmitOp,
    AdmitResult,
    AdmitStatus,
    Client,
    LeaseOp,
    LeaseStatus,
    SettleOp,
    SettleResult,
    SettleStatus,
    Store,
    StoreStats,
    expire_op,
    is_lease_id,
)

_PROJECT_RE = PROJECT_RE
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@dataclass(slots=True)
class EngineStats:
    """Engine-level counters; `store` holds the Redis-level ones (round trips, script calls)."""

    store: StoreStats
    admits: int = 0
    cold_fills: int = 0
    orphans_released: int = 0
    redis_down: int = 0  # admissions decided by on_redis_down
    skipped: int = 0  # of those, decided without trying Redis (the shard failed < 1 s ago)

    @property
    def round_trips(self) -> int:
        return self.store.round_trips

    @property
    def script_calls(self) -> int:
        return self.store.script_calls

    @property
    def batches(self) -> int:
        return self.store.batches


class AdmissionEngine:
    """Admission against Redis with a policy; one per process, shared by every request."""

    def __init__(
        self,
        redis: Client,
        policy: Policy,
        filler: SnapshotFiller,
        *,
        gateway_id: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._clock = clock
        # shard -> until when its admissions skip Redis (a round trip of it failed).
        self._shard_down_until: dict[int, float] = {}
        self._filler = filler
        self._store = Store(redis, gateway_id=gateway_id)
        self._batcher = Batcher(self._store, self._orphaned)
        self._background: set[asyncio.Task[SettleOutcome]] = set()
        self._id_prefix = secrets.token_hex(10)
        self._seq = itertools.count(1)
        self._quota_defs: dict[tuple[str, ...], tuple[QuotaDef, ...]] = {}
        # Per route (by identity, for the policy it came from): its request template and the
        # verdict of _invalid on everything except the project id, computed once.
        self._routes: dict[int, tuple[Route, Policy, AdmitRequest, str | None]] = {}
        self._wallet_keys: dict[tuple[int, str], str] = {}
        self.stats = EngineStats(self._store.stats)

    # -- requests ---------------------------------------------------------------------------

    def shard_of(self, project_id: str) -> int:
        return keys.shard_of(project_id, self.policy.settings.shards)

    def request_for(self, route: Route, project_id: str) -> AdmitRequest:
        return AdmitRequest(
            project_id=project_id,
            route=route.name,
            cost=route.cost,
            meter=route.meter,
            quotas=route.quotas,
            quota_weight=route.weight,
            hold_ttl_seconds=self.policy.settings.hold_ttl_seconds,
            allow_overage=route.allow_overage,
            shadow=route.shadow,
        )

    def _invalid(self, req: AdmitRequest) -> str | None:
        s = self.policy.settings
        if type(req.cost) is not int:
            return f"cost must be an integer, got {req.cost!r}"
        if req.cost < 0:
            return f"cost must be >= 0, got {req.cost}"
        if req.cost > s.max_cost:
            return f"cost must be <= {s.max_cost}, got {req.cost}"
        if not isinstance(req.project_id, str) or not _PROJECT_RE.match(req.project_id):
            return f"bad project id {req.project_id!r}"
        if not _LABEL_RE.match(req.route) or not _LABEL_RE.match(req.meter):
            return f"bad route or meter name {req.route!r} / {req.meter!r}"
        if type(req.quota_weight) is not int or not 1 <= req.quota_weight <= MAX_AMOUNT:
            return f"quota weight must be an integer >= 1, got {req.quota_weight!r}"
        if type(req.hold_ttl_seconds) is not int or not 1 <= req.hold_ttl_seconds <= 7 * 86400:
            return f"hold ttl must be 1..604800 seconds, got {req.hold_ttl_seconds!r}"
        for q in req.quotas:
            if q not in self.policy.quotas:
                return f"unknown quota {q!r}"
        if len(set(req.quotas)) != len(req.quotas):
            return "duplicate quota"
        return None

    def _op(self, req: AdmitRequest, project_id: str) -> AdmitOp:
        quotas = self._quota_defs.get(req.quotas)
        if quotas is None:
            quotas = tuple(self.policy.quotas[q] for q in req.quotas)
            self._quota_defs[req.quotas] = quotas
        return AdmitOp(
            self.shard_of(project_id),
            project_id,
            # Unique across processes and restarts (random prefix) and cheap (a counter): the id
            # is the hold id and the outbox event id the authority deduplicates on.
            f"{self._id_prefix}{next(self._seq):x}",
            req.cost,
            req.quota_weight,
            req.hold_ttl_seconds * 1000,
            req.meter,
            req.route,
            req.allow_overage,
            self.policy.settings.unsettled_limit,
            quotas,
        )

    @property
    def store(self) -> Store:
        return self._store

    def route_problem(self, route: Route) -> str | None:
        """Why requests of `route` cannot be admitted under this policy (None: they can)."""
        return self._invalid(self.request_for(route, "x"))

    # -- admit ------------------------------------------------------------------------------

    async def admit(self, req: AdmitRequest) -> Decision:
        """Decide one request. Never raises for Redis or authority failures: see Decision."""
        problem = self._invalid(req)
        if problem is not None:
            return Decision(False, Reason.INVALID_REQUEST, req.project_id, detail=problem)
        return await self._admit(req, req.project_id, self._op(req, req.project_id))

    async def admit_route(self, route: Route, project_id: str) -> Decision:
        """admit(request_for(route, project_id)), with the route's checks done once per route."""
        entry = self._routes.get(id(route))
        if entry is None or entry[0] is not route or entry[1] is not self.policy:
            if len(self._routes) >= 1024:
                self._routes.clear()
            template = self.request_for(route, "x")
            entry = (route, self.policy, template, self._invalid(template))
            self._routes[id(route)] = entry
        req, problem = entry[2], entry[3]
        if problem is None and not (type(project_id) is str and _PROJECT_RE.match(project_id)):
            problem = f"bad project id {project_id!r}"
        if problem is not None:
            return Decision(False, Reason.INVALID_REQUEST, project_id, detail=problem)
        return await self._admit(req, project_id, self._op(req, project_id))

    async def _admit(self, req: AdmitRequest, project_id: str, op: AdmitOp) -> Decision:
        """`req` may be a route's template: its project_id is not used, `project_id` is."""
        self.stats.admits += 1
        unavailable = self.policy.settings.unavailable_retry_after_seconds
        down = self._shard_down_until
        probe_until = None
        if down:
            until = down.get(op.shard)
            if until is not None:
                now = self._clock()
                if now < until:
                    self.stats.skipped += 1
                    detail = "a round trip to this shard failed less than a second ago"
                    return self._redis_down(req, project_id, StoreUnavailable(detail))
                # This request probes the shard; the others keep skipping it meanwhile.
                probe_until = down[op.shard] = now + REDIS_RETRY_S
        try:
            res = await self._submit(op)
            if down:
                down.pop(op.shard, None)
            if res.status is AdmitStatus.COLD:
                self.stats.cold_fills += 1
                try:
                    known = await self._filler.fill(project_id)
                except AuthorityUnavailable as exc:
                    detail = f"project not cached and the authority is unreachable: {exc}"
                    return _deny(req, project_id, Reason.UNAVAILABLE, unavailable, detail)
                if not known:
                    detail = "the authority does not know this project"
                    return _deny(req, project_id, Reason.UNKNOWN_PROJECT, None, detail)
                res = await self._submit(op)
                if res.status is AdmitStatus.COLD:
                    detail = "the project snapshot is still missing after a cache fill"
                    return _deny(req, project_id, Reason.UNAVAILABLE, unavailable, detail)
        except (StoreUnavailable, *REDIS_ERRORS, OSError) as exc:
            if redis_unreachable(exc):  # not an error reply about this request's own data
                down[op.shard] = self._clock() + REDIS_RETRY_S
            elif probe_until is not None and down.get(op.shard) == probe_until:
                del down[op.shard]  # the probe got an answer: the shard is up
            return self._redis_down(req, project_id, exc)
        except asyncio.CancelledError:
            if probe_until is not None and down.get(op.shard) == probe_until:
                down[op.shard] = 0.0  # the probe went away unanswered: the next request probes
            raise
        return self._decision(req, op, res)

    async def _submit(self, op: AdmitOp) -> AdmitResult:
        fut = self._batcher.admit(op)
        try:
            return await fut
        except asyncio.CancelledError:
            # The batch answered, but this task was cancelled before it resumed: the hold is
            # ours to end. (A future cancelled before the answer is the batcher's case.)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                res = fut.result()
                if res.hold_created:
                    self._orphaned(op, res)
            raise

    def _redis_down(self, req: AdmitRequest, project_id: str, exc: BaseException) -> Decision:
        self.stats.redis_down += 1
        route = self.policy.route(req.route)
        mode = route.on_redis_down if route is not None else ("deny" if req.cost > 0 else "allow")
        if mode == "allow":
            return Decision(
                True,
                Reason.ADMITTED,
                project_id,
                degraded=True,
                shadow=req.shadow,
                detail=f"redis unavailable: {exc}",
            )
        retry = self.policy.settings.unavailable_retry_after_seconds
        decision = _deny(req, project_id, Reason.UNAVAILABLE, retry, f"redis unavailable: {exc}")
        return decision.replace(degraded=decision.admitted)

    def _decision(self, req: AdmitRequest, op: AdmitOp, res: AdmitResult) -> Decision:
        s = self.policy.settings
        if res.status is AdmitStatus.ADMITTED:
            hold = None
            if res.hold_created:
                hold = Hold(
                    op.op_id,
                    op.project_id,
                    op.shard,
                    op.cost,
                    op.route,
                    op.meter,
                    op.allow_overage,
                    res.counters,
                )
            return Decision(
                True,
                Reason.ADMITTED,
                op.project_id,
                hold=hold,
                quotas=res.quotas,
                wallet_state=res.wallet_state,
                low_balance=res.low,
                grace_until_ms=res.grace_until_ms,
                shadow=req.shadow,
            )
        reason = res.reason
        if req.shadow:
            return Decision(
                True,
                Reason.ADMITTED,
                op.project_id,
                quotas=res.quotas,
                wallet_state=res.wallet_state,
                low_balance=res.low,
                grace_until_ms=res.grace_until_ms,
                shadow=True,
                would_deny=reason,
            )
        retry: int | None
        if reason in (Reason.RATE_LIMITED, Reason.CONCURRENCY_LIMITED):
            retry = max(1, res.retry_after)
        elif reason in (Reason.INSUFFICIENT_CREDITS, Reason.WALLET_GRACE):
            retry = s.credit_retry_after_seconds
        elif reason is Reason.SETTLEMENT_BACKLOG:
            retry = s.backlog_retry_after_seconds
        else:
            retry = None
        return Decision(
            False,
            reason,
            op.project_id,
            quotas=res.quotas,
            retry_after_seconds=retry,
            wallet_state=res.wallet_state,
            low_balance=res.low,
            grace_until_ms=res.grace_until_ms,
        )

    # -- settle -----------------------------------------------------------------------------

    async def commit(self, hold: Hold, amount: int | None = None) -> SettleOutcome:
        """Commit `amount` (None: the held amount). Above the hold needs allow_overage."""
        return await self.end_hold(hold, True, amount)

    async def release(self, hold: Hold) -> SettleOutcome:
        return await self.end_hold(hold, False)

    def end_hold(
        self, hold: Hold, commit: bool, amount: int | None = None
    ) -> asyncio.Future[SettleOutcome]:
        """commit() (commit=True) or release() without a coroutine or task of its own.

        The operation joins the current tick's batch before this returns, so the caller may be
        cancelled right after without losing it. The future gets the outcome (UNAVAILABLE when
        Redis did not answer), an exception only for a bug.
        """
        out: asyncio.Future[SettleOutcome] = asyncio.get_running_loop().create_future()
        if commit:
            if amount is not None and (type(amount) is not int or not 0 <= amount <= MAX_AMOUNT):
                out.set_result(
                    SettleOutcome(False, "INVALID", detail=f"bad commit amount {amount!r}")
                )
                return out
            kind, value = "COMMIT", -1 if amount is None else amount
        else:
            kind, value = "RELEASE", 0
        wk = (hold.shard, hold.project_id)
        wallet = self._wallet_keys.get(wk)
        if wallet is None:
            if len(self._wallet_keys) >= 50_000:
                self._wallet_keys.clear()
            wallet = self._wallet_keys[wk] = keys.wallet(hold.shard, hold.project_id)
        op = SettleOp(hold.shard, hold.hold_id, kind, value, wallet, hold.counters)
        self._batcher.settle(op).add_done_callback(functools.partial(self._settled, op, out, True))
        return out

    def _settled(
        self,
        op: SettleOp,
        out: asyncio.Future[SettleOutcome],
        may_retry: bool,
        fut: asyncio.Future[SettleResult],
    ) -> None:
        if out.done():  # the caller cancelled it; the batch still ran
            if not fut.cancelled():
                fut.exception()
            return
        if fut.cancelled():
            out.cancel()
            return
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, StoreUnavailable | RedisError | OSError):
                out.set_result(
                    SettleOutcome(False, "UNAVAILABLE", detail=f"redis unavailable: {exc}")
                )
            else:
                out.set_exception(exc)
            return
        res = fut.result()
        if res.status is SettleStatus.WRONG_KEYS and may_retry:
            op = SettleOp(op.shard, op.hold_id, op.kind, op.amount, res.wallet_key, res.counters)
            retry = self._batcher.settle(op)
            retry.add_done_callback(functools.partial(self._settled, op, out, False))
            return
        out.set_result(_outcome(res))

    async def _settle_op(self, op: SettleOp) -> SettleResult:
        res = await self._batcher.settle(op)
        if res.status is SettleStatus.WRONG_KEYS:
            op = SettleOp(op.shard, op.hold_id, op.kind, op.amount, res.wallet_key, res.counters)
            res = await self._batcher.settle(op)
        return res

    async def sweep_expired(self, limit: int = 1000) -> int:
        """End every due hold and lease (up to `limit` per shard) as EXPIRED; returns how many
        ended. Lease ids (leading "L") go to lease.lua EXPIRE, hold ids to settle.lua."""
        shards = list(range(self.policy.settings.shards))
        due = await self._store.due_holds(shards, limit)
        ops = [
            SettleOp(shard, hid, "EXPIRE", 0, None, ())
            for shard, d in due.items()
            for hid in d.hold_ids
            if not is_lease_id(hid)
        ]
        leases = {
            shard: [expire_op(shard, i) for i in d.hold_ids if is_lease_id(i)]
            for shard, d in due.items()
        }
        leases = {shard: lops for shard, lops in leases.items() if lops}
        results = await asyncio.gather(
            *(self._settle_op(op) for op in ops),
            self._expire_leases(leases),
            return_exceptions=True,
        )
        lease_ended = results.pop()
        for r in (*results, lease_ended):
            if isinstance(r, BaseException) and not isinstance(r, StoreUnavailable):
                raise r
        ended = sum(
            1 for r in results if isinstance(r, SettleResult) and r.status is SettleStatus.ENDED
        )
        return ended + (lease_ended if isinstance(lease_ended, int) else 0)

    async def _expire_leases(self, due: dict[int, list[LeaseOp]]) -> int:
        """EXPIRE due leases: a first call names each lease's wallet and counters (WRONG_KEYS),
        a second declares them. A shard Redis did not answer is left to the next sweep."""
        ended = 0
        for _ in range(2):
            if not due:
                break
            retry: dict[int, list[LeaseOp]] = {}
            for shard, res in (await self._store.run_leases(due)).items():
                if isinstance(res, BaseException):
                    if not isinstance(res, StoreUnavailable):
                        raise res
                    continue
                for op, r in zip(due[shard], res, strict=True):
                    if r.status is LeaseStatus.OK:
                        ended += 1
                    elif r.status is LeaseStatus.WRONG_KEYS and op.wallet_key is None:
                        retry.setdefault(shard, []).append(
                            expire_op(shard, op.lease_id, r.wallet_key, r.counters)
                        )
            due = retry
        return ended

    # -- lifecycle --------------------------------------------------------------------------

    def _orphaned(self, op: AdmitOp, res: AdmitResult) -> None:
        """A hold was created for a caller that is gone: release it now rather than at expiry."""
        self.stats.orphans_released += 1
        hold = Hold(
            op.op_id,
            op.project_id,
            op.shard,
            op.cost,
            op.route,
            op.meter,
            op.allow_overage,
            res.counters,
        )
        task = asyncio.get_running_loop().create_task(self.release(hold))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for in-flight batches and background releases (call before closing Redis)."""
        while self._background or self._batcher.busy:
            await self._batcher.drain()
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)


def _deny(
    req: AdmitRequest, project_id: str, reason: Reason, retry: int | None, detail: str
) -> Decision:
    """A denial decided outside the scripts; a shadow route records it and admits."""
    if req.shadow:
        return Decision(
            True, Reason.ADMITTED, project_id, shadow=True, would_deny=reason, detail=detail
        )
    return Decision(False, reason, project_id, retry_after_seconds=retry, detail=detail)


def _outcome(res: SettleResult) -> SettleOutcome:
    if res.status is SettleStatus.ENDED:
        return SettleOutcome(True, res.state, res.amount)
    if res.status is SettleStatus.UNKNOWN:
        return SettleOutcome(False, "UNKNOWN", detail="no such hold (never existed or long gone)")
    if res.status is SettleStatus.ALREADY_ENDED:
        return SettleOutcome(False, res.state, detail=f"hold already ended as {res.state}")
    if res.status is SettleStatus.OVER_HOLD:
        return SettleOutcome(
            False,
            "ACTIVE",
            res.amount,
            detail=f"commit {res.amount} exceeds the hold of {res.held} "
            "and the route does not allow overage",
        )
    return SettleOutcome(False, res.state, detail=f"settle failed: {res.status.name}")
