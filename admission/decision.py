"""Admission decisions as values: what the engine tells the gateway, never an exception.

Pure data, no I/O. The HTTP mapping (status, problem type, headers) lives in gateway_plugin.
The per-request values are plain slotted dataclasses, not frozen ones (a frozen dataclass costs
four times as much to create, on the admission hot path); treat them as immutable all the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class WalletState(enum.IntEnum):
    """Mirrors creditservice.v1.WalletState (same numbers)."""

    UNSPECIFIED = 0
    HEALTHY = 1
    LOW = 2
    GRACE = 3
    EXPIRED = 4


class Reason(enum.StrEnum):
    """Why a request was admitted or denied. The value is the stable problem-type slug."""

    ADMITTED = "admitted"
    RATE_LIMITED = "rate-limited"  # 429
    CONCURRENCY_LIMITED = "concurrency-limited"  # 429
    INSUFFICIENT_CREDITS = "insufficient-credits"  # 402
    WALLET_GRACE = "wallet-grace"  # 402 for chargeable routes
    WALLET_EXPIRED = "wallet-expired"  # 403
    UNKNOWN_PROJECT = "unknown-project"  # 403
    MISSING_CREDENTIAL = "missing-credential"  # 401
    INVALID_CREDENTIAL = "invalid-credential"  # 403
    SETTLEMENT_BACKLOG = "settlement-backlog"  # 503: unsettled limit reached (invariant 7)
    UNAVAILABLE = "admission-unavailable"  # 503: cannot decide and the route says deny
    INVALID_REQUEST = "invalid-request"  # 400: e.g. cost <= 0 or above the maximum


class QuotaKind(enum.StrEnum):
    RATE = "rate"  # sliding window log: at most limit per any window_seconds
    CONCURRENCY = "concurrency"  # in flight at once


@dataclass(slots=True)
class QuotaStatus:
    """One quota that applied to a decision, for RateLimit-Policy / RateLimit headers."""

    name: str
    kind: QuotaKind
    limit: int
    window_seconds: int  # 0 for concurrency
    remaining: int
    reset_seconds: int  # seconds until `remaining` is back to `limit` (0 if already)


@dataclass(slots=True)
class Hold:
    """An ACTIVE hold in Redis: the handle needed to commit or release it."""

    hold_id: str
    project_id: str
    shard: int
    amount: int
    route: str
    meter: str
    allow_overage: bool
    # Redis keys of the concurrency counters this hold occupies. A hint for settle.lua, which
    # checks it against the hold and asks for the right keys when it does not match.
    counters: tuple[str, ...] = ()


@dataclass(slots=True)
class Decision:
    admitted: bool
    reason: Reason
    project_id: str | None = None
    hold: Hold | None = None  # None for denials and for routes with no credits and no concurrency
    quotas: tuple[QuotaStatus, ...] = ()
    retry_after_seconds: int | None = None  # set on every denial that can succeed later
    wallet_state: WalletState = WalletState.UNSPECIFIED
    low_balance: bool = False  # admitted, but the wallet is LOW: warn the caller
    grace_until_ms: int = 0
    shadow: bool = False  # shadow route: admitted whatever the rules said
    would_deny: Reason | None = None  # shadow route: the denial that was not enforced
    detail: str = ""
    degraded: bool = False  # decided without Redis (failure policy allow)


@dataclass(slots=True)
class SettleOutcome:
    """Result of ending a hold: COMMITTED / RELEASED, or why nothing changed."""

    ok: bool
    state: str  # "COMMITTED", "RELEASED", or the state it was already in / "UNKNOWN"
    amount: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """One admission: a resolved project, the matched route, and its cost."""

    project_id: str
    route: str
    cost: int  # credits to hold; 0 for a free route
    meter: str = "requests"
    quotas: tuple[str, ...] = ()  # quota names that apply (route defaults + project overrides)
    quota_weight: int = 1  # a request may count for more than 1 against rate quotas
    hold_ttl_seconds: int = 300
    allow_overage: bool = False
    shadow: bool = False
    extra: dict[str, str] = field(default_factory=dict)
