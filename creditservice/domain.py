"""Wallet lifecycle rules of the authority as pure functions over frozen values (no I/O).

Theory of operation
-------------------
A wallet's state follows from its balance, its policy and one remembered deadline:

    balance >= threshold and > 0   HEALTHY
    0 < balance < threshold        LOW
    balance <= 0                   GRACE   (grace_until = entry time + grace period)
    GRACE and grace_until <= now   EXPIRED (only the grace job, `expire_grace`, moves it here)

GRACE and EXPIRED are sticky while the balance stays <= 0: further debits keep the deadline, a
policy change does not move it. A credit that lifts the balance above 0 restores LOW or HEALTHY
and clears the deadline. Every transition yields the lifecycle events to emit, in order:

    HEALTHY -> LOW            LOW_BALANCE_ALERT
    HEALTHY -> GRACE          LOW_BALANCE_ALERT, GRACE_STARTED   (the crossing counts too)
    LOW     -> GRACE          GRACE_STARTED
    GRACE   -> EXPIRED        WALLET_EXPIRED
    GRACE/EXPIRED -> LOW/HEALTHY   WALLET_RESTORED

LOW -> LOW never alerts again; LOW -> HEALTHY -> LOW alerts once more (a new crossing). A new wallet
(previous state UNSPECIFIED) takes the state of its balance without events: created with balance
0 it starts in GRACE with its deadline counted from creation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from creditservice.v1 import credit_pb2 as pb

State: TypeAlias = pb.WalletState.ValueType
Kind: TypeAlias = pb.LifecycleKind.ValueType

DEFAULT_GRACE_PERIOD_SECONDS = 7 * 24 * 3600
DEFAULT_RESERVATION_TTL_SECONDS = 300
DEFAULT_METER = "requests"
# The largest balance (either sign) a top-up or adjustment may leave. The gateways' Redis
# scripts compute with doubles, exact up to 2^53 (about 9.007e15): a balance of at most 5e15,
# plus the unsettled, held and overdraft amounts (each at most 1e15), stays exact there.
MAX_BALANCE = 5 * 10**15

HEALTHY: State = pb.HEALTHY
LOW: State = pb.LOW
GRACE: State = pb.GRACE
EXPIRED: State = pb.EXPIRED
UNSPECIFIED: State = pb.WALLET_STATE_UNSPECIFIED

_NON_POSITIVE = (GRACE, EXPIRED)


@dataclass(frozen=True, slots=True)
class Policy:
    """What the lifecycle depends on besides the balance."""

    low_balance_threshold: int
    grace_period_seconds: int
    overdraft_limit: int = 0


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """One lifecycle event to emit (mirrors pb.LifecycleEvent without the project id)."""

    kind: Kind
    from_state: State
    to_state: State
    balance: int
    grace_until_ms: int


@dataclass(frozen=True, slots=True)
class Transition:
    """The wallet's state after a change, and the events the change emits."""

    state: State
    grace_until_ms: int
    events: tuple[Lifecycle, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.events)


def effective_grace_period(grace_period_seconds: int) -> int:
    """0 means the server default (7 days)."""
    return grace_period_seconds if grace_period_seconds > 0 else DEFAULT_GRACE_PERIOD_SECONDS


def state_for_balance(balance: int, threshold: int) -> State:
    """The state a balance implies, before the grace job's EXPIRED."""
    if balance <= 0:
        return GRACE
    return HEALTHY if balance >= threshold else LOW


def transition(
    old_state: State, old_grace_until_ms: int, new_balance: int, now_ms: int, policy: Policy
) -> Transition:
    """The new state, deadline and events after the balance (or the policy) changed."""
    if new_balance <= 0:
        if old_state in _NON_POSITIVE:
            return Transition(old_state, old_grace_until_ms)
        until = now_ms + effective_grace_period(policy.grace_period_seconds) * 1000
        if old_state == UNSPECIFIED:
            return Transition(GRACE, until)
        events: list[Lifecycle] = []
        if old_state == HEALTHY:
            events.append(Lifecycle(pb.LOW_BALANCE_ALERT, old_state, GRACE, new_balance, until))
        events.append(Lifecycle(pb.GRACE_STARTED, old_state, GRACE, new_balance, until))
        return Transition(GRACE, until, tuple(events))
    target = HEALTHY if new_balance >= policy.low_balance_threshold else LOW
    if old_state in _NON_POSITIVE:
        restored = Lifecycle(pb.WALLET_RESTORED, old_state, target, new_balance, 0)
        return Transition(target, 0, (restored,))
    if old_state == HEALTHY and target == LOW:
        alert = Lifecycle(pb.LOW_BALANCE_ALERT, HEALTHY, LOW, new_balance, 0)
        return Transition(LOW, 0, (alert,))
    return Transition(target, 0)


def expire_grace(state: State, grace_until_ms: int, balance: int, now_ms: int) -> Transition:
    """The grace job: a GRACE wallet whose deadline passed becomes EXPIRED."""
    if state == GRACE and grace_until_ms <= now_ms:
        expired = Lifecycle(pb.WALLET_EXPIRED, GRACE, EXPIRED, balance, grace_until_ms)
        return Transition(EXPIRED, grace_until_ms, (expired,))
    return Transition(state, grace_until_ms)


def reserve_refusal(state: State, available: int, amount: int, overdraft_limit: int) -> str | None:
    """Why an authority reservation of `amount` is refused, or None when it may proceed."""
    if state in _NON_POSITIVE:
        return f"wallet is {pb.WalletState.Name(state)}: reservations are refused"
    if available - amount < -overdraft_limit:
        return (
            f"insufficient credits: available {available}, requested {amount}, "
            f"overdraft limit {overdraft_limit}"
        )
    return None


def state_is_consistent(state: State, balance: int, threshold: int) -> bool:
    """Whether a stored state agrees with its balance (used by verify)."""
    if balance <= 0:
        return state in _NON_POSITIVE
    return state == state_for_balance(balance, threshold)
