"""Boundary checks for every request of the authority: pure functions, no I/O.

Each check raises errors.InvalidArgument naming the field (as `field` or `events[3].amount`)
and what is wrong with it; storage receives only requests that passed here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from creditservice.errors import InvalidArgument
from creditservice.v1 import credit_pb2 as pb

MAX_AMOUNT = 10**15
"""Largest single amount in the smallest unit (team convention)."""
MAX_QUANTITY = 2**62
"""Largest meter quantity (RecordUsage.quantity, SettlementEvent.quantity)."""
MAX_PAGE_SIZE = 1000
MAX_SETTLE_EVENTS = 10_000
MAX_TTL_SECONDS = 7 * 24 * 3600
MAX_GRACE_SECONDS = 10 * 365 * 24 * 3600
MAX_WINDOW_SECONDS = 366 * 24 * 3600
MAX_WATCH_PROJECTS = 10_000
MAX_TEXT = 1024
MAX_SHORT_TEXT = 256
MAX_PAGE_TOKEN = 512

PROJECT_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Event, hold and reservation ids follow the request-id alphabet: they are idempotency keys too.
OPAQUE_ID_RE = REQUEST_ID_RE
QUOTA_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
METER_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
KEY_ID_RE = re.compile(r"key_[0-9a-f]{16}")
KEY_HASH_RE = re.compile(r"[0-9a-f]{64}")

_ADJUST_KINDS = (pb.SLA_CREDIT, pb.REFUND, pb.ADJUSTMENT)
_SETTLE_KINDS = (pb.COMMIT, pb.RELEASE, pb.EXPIRE)
_QUOTA_ALGORITHMS = (pb.SLIDING_WINDOW, pb.CONCURRENCY)


def _bad(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {problem}")


def _match(field: str, value: str, pattern: re.Pattern[str], what: str) -> None:
    if not value:
        raise _bad(field, "is required")
    if pattern.fullmatch(value) is None:
        raise _bad(field, f"{value[:80]!r} is not a valid {what} (must match {pattern.pattern})")


def project_id(value: str, field: str = "project_id") -> None:
    _match(field, value, PROJECT_ID_RE, "project id")


def organization_id(value: str, field: str = "organization_id") -> None:
    _match(field, value, PROJECT_ID_RE, "organization id")


def request_id(value: str, field: str = "request_id") -> None:
    _match(field, value, REQUEST_ID_RE, "request id")


def opaque_id(value: str, field: str) -> None:
    _match(field, value, OPAQUE_ID_RE, "id")


def quota_name(value: str, field: str = "name") -> None:
    _match(field, value, QUOTA_NAME_RE, "quota name")


def meter(value: str, field: str = "meter", *, required: bool = False) -> None:
    if value or required:
        _match(field, value, METER_RE, "meter name")


def key_hash(value: str, field: str = "key_hash") -> None:
    _match(field, value, KEY_HASH_RE, "key hash (64 lowercase hex chars of SHA-256)")


def text(value: str, field: str, *, limit: int = MAX_TEXT, required: bool = False) -> None:
    if required and not value.strip():
        raise _bad(field, "is required")
    if len(value) > limit:
        raise _bad(field, f"is {len(value)} characters long, at most {limit} allowed")


def amount(
    value: int, field: str = "amount", *, minimum: int = 1, maximum: int = MAX_AMOUNT
) -> None:
    """Integer range check; the messages say 'must be > 0' / 'must be >= 0' as the rule reads."""
    if value < minimum:
        rule = "> 0" if minimum == 1 else f">= {minimum}"
        raise _bad(field, f"must be {rule}, got {value}")
    if value > maximum:
        raise _bad(field, f"must be <= {maximum}, got {value}")


def page(page_size: int, page_token: str) -> None:
    amount(page_size, "page_size", minimum=0, maximum=MAX_PAGE_SIZE)
    text(page_token, "page_token", limit=MAX_PAGE_TOKEN)


# ------------------------------------------------------------------ wallets


def create_wallet(req: pb.CreateWalletRequest) -> None:
    request_id(req.request_id)
    project_id(req.project_id)
    organization_id(req.organization_id)
    amount(req.low_balance_threshold, "low_balance_threshold", minimum=0)
    amount(req.grace_period_seconds, "grace_period_seconds", minimum=0, maximum=MAX_GRACE_SECONDS)
    amount(req.overdraft_limit, "overdraft_limit", minimum=0)


def get_wallet(req: pb.GetWalletRequest) -> None:
    project_id(req.project_id)


def list_wallets(req: pb.ListWalletsRequest) -> None:
    if req.organization_id:
        organization_id(req.organization_id)
    page(req.page_size, req.page_token)


def top_up(req: pb.TopUpRequest) -> None:
    request_id(req.request_id)
    project_id(req.project_id)
    amount(req.amount)
    text(req.reference, "reference", limit=MAX_SHORT_TEXT)


def adjust(req: pb.AdjustRequest) -> None:
    request_id(req.request_id)
    project_id(req.project_id)
    if req.kind not in _ADJUST_KINDS:
        raise _bad("kind", "must be SLA_CREDIT, REFUND or ADJUSTMENT")
    if req.kind == pb.ADJUSTMENT:
        if req.amount == 0:
            raise _bad("amount", "must be != 0 for ADJUSTMENT")
        if abs(req.amount) > MAX_AMOUNT:
            raise _bad("amount", f"must be within +-{MAX_AMOUNT}, got {req.amount}")
    else:
        amount(req.amount)
    text(req.reason, "reason", required=True)
    text(req.reference, "reference", limit=MAX_SHORT_TEXT)


def list_transactions(req: pb.ListTransactionsRequest) -> None:
    project_id(req.project_id)
    page(req.page_size, req.page_token)


def set_wallet_policy(req: pb.SetWalletPolicyRequest) -> None:
    request_id(req.request_id)
    project_id(req.project_id)
    amount(req.low_balance_threshold, "low_balance_threshold", minimum=0)
    amount(req.grace_period_seconds, "grace_period_seconds", maximum=MAX_GRACE_SECONDS)
    amount(req.overdraft_limit, "overdraft_limit", minimum=0)


def explain_usage(req: pb.ExplainUsageRequest) -> None:
    project_id(req.project_id)
    amount(req.since_ms, "since_ms", minimum=0, maximum=2**62)
    amount(req.until_ms, "until_ms", minimum=0, maximum=2**62)
    if req.until_ms and req.since_ms > req.until_ms:
        raise _bad("since_ms", f"must be <= until_ms ({req.until_ms}), got {req.since_ms}")


# ------------------------------------------------------------------ quotas


def set_quota(req: pb.SetQuotaRequest) -> None:
    request_id(req.request_id)
    if not req.HasField("quota"):
        raise _bad("quota", "is required")
    q = req.quota
    project_id(q.project_id, "quota.project_id")
    quota_name(q.name, "quota.name")
    if q.algorithm not in _QUOTA_ALGORITHMS:
        raise _bad("quota.algorithm", "must be SLIDING_WINDOW or CONCURRENCY")
    amount(q.limit, "quota.limit")
    if q.algorithm == pb.SLIDING_WINDOW:
        amount(q.window_seconds, "quota.window_seconds", maximum=MAX_WINDOW_SECONDS)
    elif q.window_seconds != 0:
        raise _bad("quota.window_seconds", f"must be 0 for CONCURRENCY, got {q.window_seconds}")


def get_quota(req: pb.GetQuotaRequest) -> None:
    project_id(req.project_id)
    quota_name(req.name)


def list_quotas(req: pb.ListQuotasRequest) -> None:
    project_id(req.project_id)


def delete_quota(req: pb.DeleteQuotaRequest) -> None:
    request_id(req.request_id)
    project_id(req.project_id)
    quota_name(req.name)


# ------------------------------------------------------------------ reservations


def reserve(req: pb.ReserveRequest) -> None:
    request_id(req.request_id)
    project_id(req.project_id)
    amount(req.amount)
    amount(req.ttl_seconds, "ttl_seconds", minimum=0, maximum=MAX_TTL_SECONDS)
    meter(req.meter)


def commit(req: pb.CommitRequest) -> None:
    request_id(req.request_id)
    opaque_id(req.reservation_id, "reservation_id")
    amount(req.amount, minimum=0)


def release(req: pb.ReleaseRequest) -> None:
    request_id(req.request_id)
    opaque_id(req.reservation_id, "reservation_id")


def get_reservation(req: pb.GetReservationRequest) -> None:
    opaque_id(req.reservation_id, "reservation_id")


# ------------------------------------------------------------------ settlement and usage


def settle_event(ev: pb.SettlementEvent, index: int) -> None:
    """One event of a Settle batch; errors name it as events[index].field."""
    # Hot path (up to 10,000 per batch): plain comparisons first; the field name and the
    # precise message are built only for a bad event.
    event_id, project, kind = ev.event_id, ev.project_id, ev.kind
    held, amount_, hold_id = ev.held_amount, ev.amount, ev.hold_id
    if (
        _opaque_ok(event_id)
        and kind in _SETTLE_KINDS
        and _project_ok(project)
        and (not hold_id or _opaque_ok(hold_id))
        and 0 <= held <= MAX_AMOUNT
        and (0 <= amount_ <= MAX_AMOUNT if kind == pb.COMMIT else amount_ == 0)
        and (not ev.meter or _meter_ok(ev.meter))
        and len(ev.route) <= MAX_SHORT_TEXT
        and ev.occurred_at_ms >= 0
        and len(ev.gateway_id) <= 128
        and 0 <= ev.quantity <= MAX_QUANTITY
    ):
        return
    _explain_settle_event(ev, f"events[{index}]")


def _explain_settle_event(ev: pb.SettlementEvent, at: str) -> None:
    opaque_id(ev.event_id, f"{at}.event_id")
    if ev.kind not in _SETTLE_KINDS:
        raise _bad(f"{at}.kind", "must be COMMIT, RELEASE or EXPIRE")
    project_id(ev.project_id, f"{at}.project_id")
    if ev.hold_id:
        opaque_id(ev.hold_id, f"{at}.hold_id")
    amount(ev.held_amount, f"{at}.held_amount", minimum=0)
    if ev.kind == pb.COMMIT:
        amount(ev.amount, f"{at}.amount", minimum=0)
    elif ev.amount != 0:
        kind = pb.SettleKind.Name(ev.kind)
        raise _bad(f"{at}.amount", f"must be 0 for {kind}, got {ev.amount}")
    meter(ev.meter, f"{at}.meter")
    text(ev.route, f"{at}.route", limit=MAX_SHORT_TEXT)
    amount(ev.occurred_at_ms, f"{at}.occurred_at_ms", minimum=0, maximum=2**62)
    text(ev.gateway_id, f"{at}.gateway_id", limit=128)
    amount(ev.quantity, f"{at}.quantity", minimum=0, maximum=MAX_QUANTITY)
    raise AssertionError("settle_event and _explain_settle_event disagree")  # pragma: no cover


def _fullmatch(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    match = pattern.fullmatch
    return lambda value: match(value) is not None


_opaque_ok = _fullmatch(OPAQUE_ID_RE)
_project_ok = _fullmatch(PROJECT_ID_RE)
_meter_ok = _fullmatch(METER_RE)


def settle(events: Sequence[pb.SettlementEvent]) -> None:
    n = len(events)
    if n == 0:
        raise _bad("events", "at least one event is required")
    if n > MAX_SETTLE_EVENTS:
        raise _bad("events", f"{n} events in one batch, at most {MAX_SETTLE_EVENTS} allowed")
    for i, ev in enumerate(events):
        settle_event(ev, i)


def record_usage(req: pb.RecordUsageRequest) -> None:
    request_id(req.request_id)
    project_id(req.project_id)
    meter(req.meter, required=True)
    amount(req.amount)
    amount(req.quantity, "quantity", minimum=0, maximum=MAX_QUANTITY)
    text(req.description, "description")


def check_admission(req: pb.CheckAdmissionRequest) -> None:
    project_id(req.project_id)
    amount(req.cost, "cost", minimum=0)


def get_admission_snapshot(req: pb.GetAdmissionSnapshotRequest) -> None:
    project_id(req.project_id)


def watch(req: pb.WatchRequest) -> None:
    amount(req.after_cursor, "after_cursor", minimum=0, maximum=2**62)
    if len(req.project_ids) > MAX_WATCH_PROJECTS:
        raise _bad("project_ids", f"at most {MAX_WATCH_PROJECTS} projects per Watch")
    for i, pid in enumerate(req.project_ids):
        project_id(pid, f"project_ids[{i}]")


# ------------------------------------------------------------------ api keys


def issue_api_key(req: pb.IssueApiKeyRequest) -> None:
    request_id(req.request_id)
    project_id(req.project_id)
    text(req.name, "name", limit=128)


def revoke_api_key(req: pb.RevokeApiKeyRequest) -> None:
    request_id(req.request_id)
    _match("key_id", req.key_id, KEY_ID_RE, "key id")


def resolve_api_key(req: pb.ResolveApiKeyRequest) -> None:
    key_hash(req.key_hash)
