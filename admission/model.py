"""A pure-Python reference model of the admission rules, with an explicit clock.

Mirrors admit.lua, settle.lua and sweep.lua; the state-machine test runs both side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from admission.decision import QuotaKind, Reason, WalletState
from admission.policy import QuotaDef

# Admit outcome codes, as admit.lua returns them.
ADMITTED, DENIED, COLD = 0, 1, 2
# Settle outcome codes, as settle.lua returns them (no "wrong keys": the model needs no keys).
ENDED, UNKNOWN, ALREADY_ENDED, OVER_HOLD, NOT_DUE = 0, 1, 2, 3, 5

END_STATE = {"COMMIT": "COMMITTED", "RELEASE": "RELEASED", "EXPIRE": "EXPIRED"}


@dataclass
class Wallet:
    snap: int
    ver: int = 1
    state: int = WalletState.HEALTHY
    low: int = 0
    od: int = 0
    gu: int = 0
    unsl: int | None = None  # None: the policy default applies
    held: int = 0
    uns: int = 0


@dataclass
class LogEntry:
    t: int
    weight: int
    member: str  # "<op id>:<weight>", the tie-break order of Redis sorted sets


@dataclass
class Hold:
    hold_id: str
    project: str
    amount: int
    meter: str
    route: str
    overage: bool
    counters: tuple[str, ...]  # quota names of the concurrency counters it occupies
    exp: int
    state: str = "ACTIVE"


@dataclass
class Event:
    hold_id: str
    kind: str
    project: str
    held: int
    amount: int
    meter: str
    route: str
    t: int
    gateway: str


@dataclass(frozen=True)
class QuotaOutcome:
    name: str
    kind: QuotaKind
    limit: int
    window_seconds: int
    remaining: int
    reset_seconds: int


@dataclass(frozen=True)
class AdmitOutcome:
    status: int
    reason: Reason
    retry_after: int
    wallet_state: int
    low: bool
    grace_until_ms: int
    hold_created: bool
    quotas: tuple[QuotaOutcome, ...]


@dataclass(frozen=True)
class SettleOutcome:
    status: int
    state: str
    amount: int


_REASON_ORDER = (Reason.RATE_LIMITED, Reason.CONCURRENCY_LIMITED)


def _wait(log: list[LogEntry], *, used: int, w: int, limit: int, win_ms: int, now: int) -> int:
    """ms until enough of the oldest entries leave the window for `w` more to fit."""
    if w > limit:
        return win_ms
    left = used
    for e in sorted(log, key=lambda e: (e.t, e.member)):
        left -= e.weight
        if left + w <= limit:
            return e.t + win_ms - now
    return win_ms


@dataclass
class Model:
    """The state of one Redis deployment as the scripts see it; `now` is the scripts' clock."""

    gateway: str = "gw"
    wallets: dict[str, Wallet] = field(default_factory=dict)
    quota_defs: dict[str, dict[str, str]] = field(default_factory=dict)
    logs: dict[tuple[str, str], list[LogEntry]] = field(default_factory=dict)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    outbox: list[Event] = field(default_factory=list)

    # -- admit ------------------------------------------------------------------------------

    def _effective(self, project: str, q: QuotaDef) -> QuotaDef:
        raw = self.quota_defs.get(project, {}).get(q.name)
        if raw is None:
            return q
        parts = raw.split(":")
        if len(parts) != 3:
            return q
        kind, limit, window = parts
        if kind not in ("rate", "concurrency") or not limit.isdigit() or not window.isdigit():
            return q
        return QuotaDef(q.name, QuotaKind(kind), int(limit), int(window))

    def _trim(self, project: str, name: str, win_ms: int, now: int) -> int:
        log = self.logs.setdefault((project, name), [])
        log[:] = [e for e in log if e.t > now - win_ms]
        return sum(e.weight for e in log)

    def admit(
        self,
        *,
        now: int,
        project: str,
        op_id: str,
        cost: int,
        weight: int,
        ttl_ms: int,
        meter: str,
        route: str,
        overage: bool,
        quotas: tuple[QuotaDef, ...],
        unsettled_limit: int,
    ) -> AdmitOutcome:
        effective = [self._effective(project, q) for q in quotas]
        wallet = self.wallets.get(project)
        if wallet is None:
            return AdmitOutcome(COLD, Reason.ADMITTED, 0, 0, False, 0, False, ())
        reason: Reason = Reason.ADMITTED
        retry = 0
        if wallet.state == WalletState.EXPIRED:
            reason = Reason.WALLET_EXPIRED
        elif cost > 0 and wallet.state == WalletState.GRACE:
            reason = Reason.WALLET_GRACE
        elif cost > 0 and wallet.held + wallet.uns + cost > wallet.snap + wallet.od:
            reason = Reason.INSUFFICIENT_CREDITS
        elif cost > 0 and wallet.uns + wallet.held + cost > (
            wallet.unsl if wallet.unsl is not None else unsettled_limit
        ):
            reason = Reason.SETTLEMENT_BACKLOG
        used: list[int] = []
        for q in effective:
            if q.kind is QuotaKind.RATE:
                win_ms = q.window_seconds * 1000
                u = self._trim(project, q.name, win_ms, now)
                if u + weight > q.limit:
                    log = self.logs[(project, q.name)]
                    wait = max(
                        1,
                        math.ceil(
                            _wait(log, used=u, w=weight, limit=q.limit, win_ms=win_ms, now=now)
                            / 1000
                        ),
                    )
                    if reason is Reason.ADMITTED:
                        reason = Reason.RATE_LIMITED
                    if reason in _REASON_ORDER:
                        retry = max(retry, wait)
            else:
                u = self.counters.get((project, q.name), 0)
                if u + 1 > q.limit:
                    if reason is Reason.ADMITTED:
                        reason = Reason.CONCURRENCY_LIMITED
                    if reason in _REASON_ORDER:
                        retry = max(retry, 1)
            used.append(u)

        admitted = reason is Reason.ADMITTED
        made_hold = False
        if admitted:
            conc: list[str] = []
            for i, q in enumerate(effective):
                if q.kind is QuotaKind.RATE:
                    self.logs[(project, q.name)].append(LogEntry(now, weight, f"{op_id}:{weight}"))
                    used[i] += weight
                else:
                    self.counters[(project, q.name)] = self.counters.get((project, q.name), 0) + 1
                    conc.append(q.name)
                    used[i] += 1
            if cost > 0 or conc:
                self.holds[op_id] = Hold(
                    op_id, project, cost, meter, route, overage, tuple(conc), now + ttl_ms
                )
                wallet.held += cost
                made_hold = True

        outcomes: list[QuotaOutcome] = []
        for q, u in zip(effective, used, strict=True):
            remaining = max(0, q.limit - u)
            if q.kind is QuotaKind.RATE:
                log = self.logs[(project, q.name)]
                reset = 0
                if log:
                    oldest = min(e.t for e in log)
                    reset = max(0, math.ceil((oldest + q.window_seconds * 1000 - now) / 1000))
                outcomes.append(
                    QuotaOutcome(q.name, q.kind, q.limit, q.window_seconds, remaining, reset)
                )
            else:
                outcomes.append(QuotaOutcome(q.name, q.kind, q.limit, 0, remaining, 0))
        low = wallet.snap - wallet.uns - wallet.held < wallet.low
        return AdmitOutcome(
            ADMITTED if admitted else DENIED,
            reason,
            retry,
            wallet.state,
            low,
            wallet.gu,
            made_hold,
            tuple(outcomes),
        )

    # -- settle -----------------------------------------------------------------------------

    def settle(self, *, now: int, hold_id: str, kind: str, amount: int) -> SettleOutcome:
        """kind COMMIT | RELEASE | EXPIRE; amount -1 commits the held amount."""
        h = self.holds.get(hold_id)
        if h is None:
            return SettleOutcome(UNKNOWN, "UNKNOWN", 0)
        if h.state != "ACTIVE":
            return SettleOutcome(ALREADY_ENDED, h.state, 0)
        committed = 0
        if kind == "COMMIT":
            committed = h.amount if amount < 0 else amount
        if kind == "EXPIRE" and h.exp > now:
            return SettleOutcome(NOT_DUE, "ACTIVE", 0)
        if committed > h.amount and not h.overage:
            return SettleOutcome(OVER_HOLD, "ACTIVE", committed)
        wallet = self.wallets.get(h.project)
        if wallet is None:
            wallet = self.wallets[h.project] = Wallet(snap=0)
        wallet.held -= h.amount
        wallet.uns += committed
        for name in h.counters:
            self.counters[(h.project, name)] -= 1
        h.state = END_STATE[kind]
        self.outbox.append(
            Event(
                hold_id, kind, h.project, h.amount, committed, h.meter, h.route, now, self.gateway
            )
        )
        return SettleOutcome(ENDED, h.state, committed)

    def due(self, now: int) -> list[str]:
        """Ids of ACTIVE holds whose expiry has passed, oldest first (as sweep.lua)."""
        active = [h for h in self.holds.values() if h.state == "ACTIVE" and h.exp <= now]
        return [h.hold_id for h in sorted(active, key=lambda h: (h.exp, h.hold_id))]

    # -- authority side ---------------------------------------------------------------------

    def apply_snapshot(
        self,
        project: str,
        *,
        snap: int,
        ver: int,
        state: int,
        low: int = 0,
        od: int = 0,
        gu: int = 0,
        unsl: int | None = None,
    ) -> bool:
        """A newer authority wallet; held and uns are this tier's counters and stay."""
        w = self.wallets.get(project)
        if w is None:
            self.wallets[project] = Wallet(snap, ver, state, low, od, gu, unsl)
            return True
        if ver <= w.ver:
            return False
        w.snap, w.ver, w.state, w.low, w.od, w.gu = snap, ver, state, low, od, gu
        if unsl is not None:
            w.unsl = unsl
        return True

    def acknowledge(self, project: str, amount: int) -> None:
        """The flusher's ack of a settled COMMIT: the amount leaves uns exactly once."""
        w = self.wallets[project]
        w.uns -= min(amount, w.uns)

    def active_held(self, project: str) -> int:
        return sum(
            h.amount for h in self.holds.values() if h.project == project and h.state == "ACTIVE"
        )
