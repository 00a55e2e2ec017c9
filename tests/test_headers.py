"""Unit tests of gateway_plugin.headers and gateway_plugin.problems: values parsed as RFC 8941."""

from __future__ import annotations

import json

import http_sfv
import pytest
from multidict import CIMultiDict

from admission.decision import Decision, QuotaKind, QuotaStatus, Reason, WalletState
from gateway_plugin import headers as hdr
from gateway_plugin import problems

RATE = QuotaStatus("requests", QuotaKind.RATE, 600, 60, 599, 1)
CONC = QuotaStatus("concurrent", QuotaKind.CONCURRENCY, 20, 0, 19, 0)


def sf_list(value: str) -> list[tuple[object, dict[str, object]]]:
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return [(item.value, dict(item.params)) for item in parsed]


def sf_dict(value: str) -> dict[str, object]:
    parsed = http_sfv.Dictionary()
    parsed.parse(value.encode())
    return {k: v.value for k, v in parsed.items()}


def test_policy_and_ratelimit_match_the_draft_examples() -> None:
    assert hdr.ratelimit_policy_value((RATE, CONC)) == (
        '"requests";q=600;w=60, "concurrent";q=20;qu="concurrent-requests"'
    )
    assert hdr.ratelimit_value((RATE, CONC)) == '"requests";r=599;t=1, "concurrent";r=19'
    assert sf_list(hdr.ratelimit_policy_value((RATE, CONC))) == [
        ("requests", {"q": 600, "w": 60}),
        ("concurrent", {"q": 20, "qu": "concurrent-requests"}),
    ]
    assert sf_list(hdr.ratelimit_value((RATE, CONC))) == [
        ("requests", {"r": 599, "t": 1}),
        ("concurrent", {"r": 19}),
    ]


def test_negative_remaining_and_reset_are_clamped_to_zero() -> None:
    q = QuotaStatus("burst", QuotaKind.RATE, 10, 1, -3, -1)
    assert sf_list(hdr.ratelimit_value((q,))) == [("burst", {"r": 0, "t": 0})]


@pytest.mark.parametrize("name", ['we"ird', "back\\slash", "tab\there", "ünï"])
def test_odd_names_still_give_valid_structured_fields(name: str) -> None:
    q = QuotaStatus(name, QuotaKind.RATE, 5, 10, 4, 2)
    items = sf_list(hdr.ratelimit_policy_value((q,)))
    assert len(items) == 1
    assert items[0][1] == {"q": 5, "w": 10}
    if name.isascii() and name.isprintable():
        assert items[0][0] == name


def test_retry_after_is_never_earlier_than_an_exhausted_reset() -> None:
    exhausted = QuotaStatus("requests", QuotaKind.RATE, 600, 60, 0, 9)
    d = Decision(False, Reason.RATE_LIMITED, quotas=(exhausted, CONC), retry_after_seconds=3)
    assert hdr.retry_after_seconds(d) == 9
    d2 = Decision(False, Reason.RATE_LIMITED, quotas=(exhausted,), retry_after_seconds=20)
    assert hdr.retry_after_seconds(d2) == 20
    d3 = Decision(False, Reason.INSUFFICIENT_CREDITS)
    assert hdr.retry_after_seconds(d3, default_seconds=30) == 30
    d4 = Decision(False, Reason.CONCURRENCY_LIMITED, retry_after_seconds=0)
    assert hdr.retry_after_seconds(d4) == 1


def test_admitted_headers_low_balance_and_shadow() -> None:
    h: CIMultiDict[str] = CIMultiDict()
    d = Decision(
        True,
        Reason.ADMITTED,
        project_id="p",
        quotas=(RATE,),
        low_balance=True,
        wallet_state=WalletState.LOW,
        shadow=True,
        would_deny=Reason.RATE_LIMITED,
    )
    hdr.apply_admitted(h, d)
    assert sf_list(h["RateLimit-Policy"]) == [("requests", {"q": 600, "w": 60})]
    assert sf_list(h["Creditgate-Warning"]) == [("low-balance", {})]
    assert sf_dict(h["Creditgate-Shadow"]) == {"would-deny": "rate-limited"}
    assert "Retry-After" not in h


def test_admitted_without_quotas_adds_nothing() -> None:
    h: CIMultiDict[str] = CIMultiDict()
    hdr.apply_admitted(h, Decision(True, Reason.ADMITTED, project_id="p"))
    assert len(h) == 0


@pytest.mark.parametrize(
    ("reason", "status", "retry"),
    [
        (Reason.RATE_LIMITED, 429, True),
        (Reason.CONCURRENCY_LIMITED, 429, True),
        (Reason.INSUFFICIENT_CREDITS, 402, True),
        (Reason.WALLET_GRACE, 402, True),
        (Reason.WALLET_EXPIRED, 403, False),
        (Reason.UNKNOWN_PROJECT, 403, False),
        (Reason.INVALID_CREDENTIAL, 403, False),
        (Reason.MISSING_CREDENTIAL, 401, False),
        (Reason.SETTLEMENT_BACKLOG, 503, True),
        (Reason.UNAVAILABLE, 503, True),
        (Reason.INVALID_REQUEST, 400, False),
    ],
)
def test_problem_response_per_reason(reason: Reason, status: int, retry: bool) -> None:
    d = Decision(
        False, reason, project_id="proj-1", quotas=(RATE,), grace_until_ms=1_700_000_000_000
    )
    resp = problems.problem_response(d, "/v1/x", default_retry_after=7)
    assert resp.status == status
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.body is not None
    body = json.loads(bytes(resp.body))  # type: ignore[arg-type]
    assert body["type"] == f"urn:creditgate:problem:{reason.value}"
    assert body["status"] == status
    assert body["instance"] == "/v1/x"
    assert body["title"] and body["detail"]
    assert ("Retry-After" in resp.headers) is retry
    if retry:
        assert int(resp.headers["Retry-After"]) >= 7
    assert sf_list(resp.headers["RateLimit"]) == [("requests", {"r": 599, "t": 1})]
    assert ("WWW-Authenticate" in resp.headers) is (status == 401)
    if reason is Reason.WALLET_GRACE:
        assert body["grace_until_ms"] == 1_700_000_000_000
        assert body["grace_until"].startswith("2023-11-14T22:13:20")


def test_every_denial_reason_has_a_problem() -> None:
    assert set(problems.PROBLEMS) == set(Reason) - {Reason.ADMITTED}
    with pytest.raises(ValueError, match="not a denial"):
        problems.problem_response(Decision(True, Reason.ADMITTED), "/")


def test_problem_type_base_is_configurable() -> None:
    d = Decision(False, Reason.RATE_LIMITED)
    resp = problems.problem_response(d, "/", type_base="https://errors.example/")
    body = json.loads(bytes(resp.body))  # type: ignore[arg-type]
    assert body["type"] == "https://errors.example/rate-limited"
