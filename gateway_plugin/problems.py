"""RFC 9457 problem details: every problem body the gateway sends is made by problem_http.

Denials have one stable `type` per admission Reason: the configured base + the Reason value
(urn:creditgate:problem:rate-limited); status, title and whether Retry-After applies are fixed
per reason in PROBLEMS. The standalone gateway's own answers (400/502/504) use gateway_problem.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, istr

from admission.decision import Decision, Reason
from gateway_plugin import headers as hdr
from gateway_plugin.config import DEFAULT_PROBLEM_TYPE_BASE

log = logging.getLogger(__name__)

# No charset parameter: JSON is UTF-8 by definition (RFC 8259 8.1) and the media type defines
# none (RFC 9457 6.1).
CONTENT_TYPE = "application/problem+json"
# The path as the client sent it, where a middleware in front of the plugin rewrote the request
# (the standalone gateway's canonical paths): a problem's `instance` names what the client sent.
SENT_PATH = web.RequestKey("creditgate_sent_path", str)
WWW_AUTHENTICATE = istr("WWW-Authenticate")
BEARER_CHALLENGE = 'Bearer realm="creditgate"'
_CONTENT_TYPE = istr("Content-Type")


@dataclass(frozen=True, slots=True)
class ProblemSpec:
    status: int
    title: str
    detail: str  # used when the decision carries none
    retryable: bool  # Retry-After is sent: waiting (or a top-up) can cure it


PROBLEMS: dict[Reason, ProblemSpec] = {
    Reason.RATE_LIMITED: ProblemSpec(
        429, "Rate limit exceeded", "A rate quota of this project is exhausted.", True
    ),
    Reason.CONCURRENCY_LIMITED: ProblemSpec(
        429,
        "Too many concurrent requests",
        "The project has as many requests in flight as its concurrency quota allows.",
        True,
    ),
    Reason.INSUFFICIENT_CREDITS: ProblemSpec(
        402,
        "Insufficient credits",
        "The project's prepaid balance does not cover this request.",
        True,
    ),
    Reason.WALLET_GRACE: ProblemSpec(
        402,
        "Wallet in grace period",
        "The project's balance is exhausted; chargeable requests are refused until a top-up.",
        True,
    ),
    Reason.WALLET_EXPIRED: ProblemSpec(
        403,
        "Wallet expired",
        "The project's grace period has ended; every request is refused until a top-up.",
        False,
    ),
    Reason.UNKNOWN_PROJECT: ProblemSpec(
        403, "Unknown project", "The credential belongs to no known project.", False
    ),
    Reason.MISSING_CREDENTIAL: ProblemSpec(
        401, "Missing credential", "Send an API key as 'Authorization: Bearer <key>'.", False
    ),
    Reason.INVALID_CREDENTIAL: ProblemSpec(
        403, "Invalid credential", "The API key is unknown or revoked.", False
    ),
    Reason.SETTLEMENT_BACKLOG: ProblemSpec(
        503,
        "Settlement backlog",
        "Too much of this project's usage is not yet settled with the credit authority.",
        True,
    ),
    Reason.UNAVAILABLE: ProblemSpec(
        503,
        "Admission unavailable",
        "Admission cannot decide right now and this route does not admit blindly.",
        True,
    ),
    Reason.INVALID_REQUEST: ProblemSpec(
        400, "Invalid request", "The request cannot be admitted as configured.", False
    ),
}


def status_of(reason: Reason) -> int:
    spec = PROBLEMS.get(reason)
    return spec.status if spec is not None else 500


def problem_type(reason: Reason, base: str = DEFAULT_PROBLEM_TYPE_BASE) -> str:
    return base + reason.value


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


REDIS_UNAVAILABLE_DETAIL = "The admission store (Redis) is unavailable; try again later."
AUTHORITY_UNAVAILABLE_DETAIL = (
    "The credit authority is unreachable and this project is not cached yet; try again later."
)
# SECURITY: the detail of an UNAVAILABLE decision is the engine's diagnostic for operators
# (admission/engine.py _admit and _redis_down, admission/lease.py _failed and _fill_once): it may
# be an exception repr naming hosts and ports. Clients get the sentence of its cause, known by
# the prefix the engine writes (else the reason's generic detail); the diagnostic is logged.
_UNAVAILABLE_CAUSES = (
    ("redis unavailable", REDIS_UNAVAILABLE_DETAIL),
    ("project not cached and the authority is unreachable", AUTHORITY_UNAVAILABLE_DETAIL),
    ("the gateway is not started yet", "The gateway is starting; try again shortly."),
)
# Every request of an outage carries one of a few diagnostics: each is logged once a minute.
_LOG_EVERY_S = 60.0
_logged_at: dict[str, float] = {}


def public_detail(decision: Decision) -> str:
    """The `detail` member of a denial: the decision's, but never an internal diagnostic."""
    spec = PROBLEMS[decision.reason]
    detail = decision.detail
    if decision.reason is not Reason.UNAVAILABLE or not detail:
        return detail or spec.detail
    _log_diagnostic(detail)
    for prefix, public in _UNAVAILABLE_CAUSES:
        if detail.startswith(prefix):
            return public
    return spec.detail


def _log_diagnostic(detail: str) -> None:
    now = time.monotonic()
    if now - _logged_at.get(detail, -_LOG_EVERY_S) < _LOG_EVERY_S:
        return
    if len(_logged_at) >= 256:  # bounded whatever the diagnostics contain
        _logged_at.clear()
    _logged_at[detail] = now
    log.warning("creditgate: answered 503 admission-unavailable: %s", detail)


def problem_document(
    decision: Decision, instance: str, type_base: str = DEFAULT_PROBLEM_TYPE_BASE
) -> dict[str, Any]:
    """The JSON object of a denial (RFC 9457 members + creditgate extension members)."""
    spec = PROBLEMS[decision.reason]
    doc = problem_members(
        problem_type(decision.reason, type_base),
        spec.title,
        spec.status,
        public_detail(decision),
        instance,
    )
    if decision.reason is Reason.WALLET_GRACE and decision.grace_until_ms > 0:
        doc["grace_until"] = _iso_ms(decision.grace_until_ms)
        doc["grace_until_ms"] = decision.grace_until_ms
    if decision.project_id is not None:
        doc["project_id"] = decision.project_id
    return doc


def problem_response(
    decision: Decision,
    instance: str,
    *,
    type_base: str = DEFAULT_PROBLEM_TYPE_BASE,
    default_retry_after: int = 1,
) -> web.Response:
    """The complete denial: status, problem+json body, RateLimit / Retry-After headers."""
    spec = PROBLEMS.get(decision.reason)
    if spec is None:
        raise ValueError(f"{decision.reason!r} is not a denial reason")
    headers: CIMultiDict[str] = CIMultiDict()
    retry_after = hdr.retry_after_seconds(decision, default_retry_after) if spec.retryable else None
    hdr.apply_denied(headers, decision, retry_after)
    if spec.status == 401:
        headers[WWW_AUTHENTICATE] = BEARER_CHALLENGE
    return problem_http(problem_document(decision, instance, type_base), headers)


def gateway_problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    instance: str,
    *,
    type_base: str = DEFAULT_PROBLEM_TYPE_BASE,
) -> web.Response:
    """A problem the gateway answers itself, not an admission decision (the standalone
    gateway's 400 for an ambiguous path, 502 and 504 for its upstream)."""
    return problem_http(problem_members(type_base + slug, title, status, detail, instance))


def problem_members(
    type_: str, title: str, status: int, detail: str, instance: str
) -> dict[str, Any]:
    """The RFC 9457 members every problem body of creditgate has."""
    return {"type": type_, "title": title, "status": status, "detail": detail, "instance": instance}


def problem_http(doc: dict[str, Any], headers: CIMultiDict[str] | None = None) -> web.Response:
    """The one way a problem body goes on the wire: status from the body, CONTENT_TYPE."""
    out: CIMultiDict[str] = CIMultiDict() if headers is None else headers
    out[_CONTENT_TYPE] = CONTENT_TYPE
    return web.Response(status=doc["status"], body=json.dumps(doc).encode(), headers=out)
