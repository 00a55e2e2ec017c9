"""Admission decisions as values: what the engine tells the gateway, never an exception.

Pure data, no I/O. The HTTP mapping (status, problem type, headers) lives in gateway_plugin.
The per-request values are plain slotted dataclasses, not frozen ones (a frozen dataclass costs
four times as much to create, on the admission hot path); treat them as immutable all the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mypy_extensions import mypyc_attr


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
    reset_seconds: int  # until the oldest counted unit leaves the window (<= window; 0: none)


class Hold:
    """An ACTIVE hold in Redis (or in a lease): the handle needed to commit or release it.

    Hand-written rather than a dataclass, like Decision: one is made per admitted request, and
    a compiled dataclass still runs the __init__ the dataclasses module generates, interpreted.
    """

    __slots__ = (
        "allow_overage",
        "amount",
        "counters",
        "hold_id",
        "meter",
        "project_id",
        "route",
        "shard",
    )

    def __init__(  # noqa: PLR0917 - the dataclass signature it replaces
        self,
        hold_id: str,
        project_id: str,
        shard: int,
        amount: int,
        route: str,
        meter: str,
        allow_overage: bool,
        counters: tuple[str, ...] = (),
    ) -> None:
        self.hold_id = hold_id
        self.project_id = project_id
        self.shard = shard
        self.amount = amount
        self.route = route
        self.meter = meter
        self.allow_overage = allow_overage
        # Redis keys of the concurrency counters this hold occupies. A hint for settle.lua,
        # which checks it against the hold and asks for the right keys when it does not match.
        self.counters = counters

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _HOLD_FIELDS)

    def __reduce__(self) -> tuple[type[Hold], tuple[object, ...]]:
        # copy and pickle: a compiled class cannot be made without its __init__ arguments.
        return Hold, self._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hold):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in _HOLD_FIELDS)
        return f"Hold({inner})"


_HOLD_FIELDS = (
    "hold_id",
    "project_id",
    "shard",
    "amount",
    "route",
    "meter",
    "allow_overage",
    "counters",
)


# What a lease-mode admission renders for its headers (see Decision.rendered): the quotas'
# definitions (name, kind, limit, window_seconds) and, per quota, its remaining count and,
# for rate quotas only, its reset seconds, in order.
QuotaDefs = tuple[tuple[str, QuotaKind, int, int], ...]


class Rendered:
    """An admission's RateLimit-Policy and RateLimit field values, rendered when decided.

    The lease path renders both strings from per-lease templates instead of building a
    QuotaStatus per quota per request; `quotas()` builds those from the same figures when
    someone asks (Decision.quotas).
    """

    __slots__ = ("defs", "figures", "policy", "ratelimit")

    def __init__(self, policy: str, ratelimit: str, defs: QuotaDefs, figures: tuple[int, ...]):
        self.policy = policy
        self.ratelimit = ratelimit
        self.defs = defs
        self.figures = figures

    def quotas(self) -> tuple[QuotaStatus, ...]:
        return quota_statuses(self.defs, self.figures)

    def __reduce__(self) -> tuple[type[Rendered], tuple[object, ...]]:
        return Rendered, (self.policy, self.ratelimit, self.defs, self.figures)


def fill_ratelimit(pieces: tuple[str, ...], figures: tuple[int, ...]) -> str:
    """pieces[0] + str(figures[0]) + pieces[1] + ... + pieces[-1]: a RateLimit value from its
    template (gateway_plugin.headers.ratelimit_templates). Compiled, an f-string of up to three
    figures is one allocation of the final length (less than half of what `%` formatting or a
    join costs); more figures take the join."""
    n = len(figures)
    if len(pieces) != n + 1:
        raise ValueError(f"a template of {len(pieces)} pieces takes {len(pieces) - 1} figures")
    p = pieces
    f = figures
    if n == 3:
        return f"{p[0]}{f[0]}{p[1]}{f[1]}{p[2]}{f[2]}{p[3]}"
    if n == 2:
        return f"{p[0]}{f[0]}{p[1]}{f[1]}{p[2]}"
    if n == 1:
        return f"{p[0]}{f[0]}{p[1]}"
    out = [p[0]]
    for i, figure in enumerate(f):
        out.append(str(figure))
        out.append(p[i + 1])
    return "".join(out)


def quota_statuses(defs: QuotaDefs, figures: tuple[int, ...]) -> tuple[QuotaStatus, ...]:
    """QuotaStatus values from definitions and figures laid out as in `Rendered`."""
    out = []
    it = iter(figures)
    for name, kind, limit, window in defs:
        remaining = next(it)
        reset = next(it) if kind is QuotaKind.RATE else 0
        out.append(QuotaStatus(name, kind, limit, window, remaining, reset))
    return tuple(out)


class Decision:
    """The outcome of one admission. Treat as immutable.

    A hand-written slotted class rather than a dataclass, for one reason: `quotas` of a
    lease-mode admission is built only when read (from `rendered`), since the headers need
    only the rendered strings and most requests never look at it.
    """

    __slots__ = (
        "_quotas",
        "admitted",
        "degraded",
        "detail",
        "grace_until_ms",
        "hold",
        "low_balance",
        "project_id",
        "reason",
        "rendered",
        "retry_after_seconds",
        "shadow",
        "wallet_state",
        "would_deny",
    )

    def __init__(  # noqa: PLR0917 - the dataclass signature it replaces; hot callers pass all
        self,
        admitted: bool,
        reason: Reason,
        project_id: str | None = None,
        hold: Hold | None = None,
        quotas: tuple[QuotaStatus, ...] | None = (),
        retry_after_seconds: int | None = None,
        wallet_state: WalletState = WalletState.UNSPECIFIED,
        low_balance: bool = False,
        grace_until_ms: int = 0,
        shadow: bool = False,
        would_deny: Reason | None = None,
        detail: str = "",
        degraded: bool = False,
        rendered: Rendered | None = None,
    ) -> None:
        self.admitted = admitted
        self.reason = reason
        self.project_id = project_id
        # None for denials and for routes with no credits and no concurrency.
        self.hold = hold
        self._quotas = quotas  # None: build from `rendered` when read
        self.retry_after_seconds = retry_after_seconds  # every denial that can succeed later
        self.wallet_state = wallet_state
        self.low_balance = low_balance  # admitted, but the wallet is LOW: warn the caller
        self.grace_until_ms = grace_until_ms
        self.shadow = shadow  # shadow route: admitted whatever the rules said
        self.would_deny = would_deny  # shadow route: the denial that was not enforced
        self.detail = detail
        self.degraded = degraded  # decided without Redis (failure policy allow)
        self.rendered = rendered  # header values rendered at decision time, if any

    @property
    def quotas(self) -> tuple[QuotaStatus, ...]:
        """The quotas that applied, with what remained after this decision."""
        quotas = self._quotas
        if quotas is None:
            quotas = self._quotas = self.rendered.quotas() if self.rendered is not None else ()
        return quotas

    def replace(self, **changes: object) -> Decision:
        """A copy with some fields changed (dataclasses.replace for this class)."""
        fields = {name: getattr(self, name) for name in _DECISION_FIELDS}
        fields.update(changes)
        return Decision(**fields)

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _DECISION_FIELDS if name != "rendered")

    def __reduce__(self) -> tuple[type[Decision], tuple[object, ...]]:
        # copy and pickle; `quotas` is passed as built (None stays "build from rendered").
        args = [self._quotas if n == "quotas" else getattr(self, n) for n in _DECISION_FIELDS]
        return Decision, tuple(args)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in _DECISION_FIELDS)
        return f"Decision({inner})"


_DECISION_FIELDS = (
    "admitted",
    "reason",
    "project_id",
    "hold",
    "quotas",
    "retry_after_seconds",
    "wallet_state",
    "low_balance",
    "grace_until_ms",
    "shadow",
    "would_deny",
    "detail",
    "degraded",
    "rendered",
)


@dataclass(slots=True)
class SettleOutcome:
    """Result of ending a hold: COMMITTED / RELEASED, or why nothing changed."""

    ok: bool
    state: str  # "COMMITTED", "RELEASED", or the state it was already in / "UNKNOWN"
    amount: int = 0
    detail: str = ""


# Not a native class when compiled: callers may pass anything, and AdmissionEngine.admit answers
# a bad field with INVALID_REQUEST rather than the constructor raising TypeError.
@mypyc_attr(native_class=False)
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
