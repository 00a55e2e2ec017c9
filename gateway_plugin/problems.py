"""RFC 9457 problem details for every denial: one stable `type` per admission Reason.

`type` is the configured base + the Reason value (urn:creditgate:problem:rate-limited); status,
title and whether Retry-After applies are fixed per reason in PROBLEMS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, istr

from admission.decision import Decision, Reason
from gateway_plugin import headers as hdr
from gateway_plugin.config import DEFAULT_PROBLEM_TYPE_BASE

CONTENT_TYPE = "application/problem+json"
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


def problem_document(
    decision: Decision, instance: str, type_base: str = DEFAULT_PROBLEM_TYPE_BASE
) -> dict[str, Any]:
    """The JSON object of a denial (RFC 9457 members + creditgate extension members)."""
    spec = PROBLEMS[decision.reason]
    doc: dict[str, Any] = {
        "type": problem_type(decision.reason, type_base),
        "title": spec.title,
        "status": spec.status,
        "detail": decision.detail or spec.detail,
        "instance": instance,
    }
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
    body = json.dumps(problem_document(decision, instance, type_base)).encode()
    headers: CIMultiDict[str] = CIMultiDict()
    headers[_CONTENT_TYPE] = CONTENT_TYPE
    retry_after = hdr.retry_after_seconds(decision, default_retry_after) if spec.retryable else None
    hdr.apply_denied(headers, decision, retry_after)
    if spec.status == 401:
        headers[WWW_AUTHENTICATE] = BEARER_CHALLENGE
    return web.Response(status=spec.status, body=body, headers=headers)
