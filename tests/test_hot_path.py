"""The hot path's shortcuts give the same answers as the plain code they stand in for.

- Lease-mode admissions render their RateLimit headers from per-lease templates: the strings
  must equal what gateway_plugin.headers renders from the QuotaStatus values, and
  Decision.quotas built lazily must equal those values.
- Per-request metrics are plain counts folded into Prometheus: what a scrape sees after a fold
  must equal what per-request inc()/observe() would have recorded.
"""

from __future__ import annotations

import threading

import http_sfv
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from admission.decision import (
    Decision,
    QuotaKind,
    QuotaStatus,
    Reason,
    Rendered,
    WalletState,
    fill_ratelimit,
    quota_statuses,
)
from gateway_plugin import headers as hdr
from gateway_plugin.metrics import ADMISSION_BUCKETS, GatewayMetrics

quota_defs = st.lists(
    st.tuples(
        # Names with the characters a template must escape (%), quote (" \) or replace.
        st.text(alphabet=st.sampled_from('ab%"\\ \tü-_'), min_size=1, max_size=8),
        st.sampled_from([QuotaKind.RATE, QuotaKind.CONCURRENCY]),
        st.integers(1, 10**9),
        st.integers(1, 86_400),
    ),
    min_size=1,
    max_size=4,
)


def _layout(
    defs: list[tuple[str, QuotaKind, int, int]], numbers: list[int]
) -> tuple[tuple[tuple[str, QuotaKind, int, int], ...], tuple[int, ...]]:
    """Definitions as the lease path keeps them (window 0 for concurrency) and figures."""
    out_defs = []
    figures: list[int] = []
    it = iter(numbers)
    for name, kind, limit, window in defs:
        out_defs.append((name, kind, limit, window if kind is QuotaKind.RATE else 0))
        figures.append(next(it))
        if kind is QuotaKind.RATE:
            figures.append(next(it))
    return tuple(out_defs), tuple(figures)


@given(defs=quota_defs, numbers=st.lists(st.integers(0, 10**12), min_size=8, max_size=8))
def test_rendered_headers_equal_the_quota_status_rendering(
    defs: list[tuple[str, QuotaKind, int, int]], numbers: list[int]
) -> None:
    layout, figures = _layout(defs, numbers)
    policy, template = hdr.ratelimit_templates(layout)
    statuses = quota_statuses(layout, figures)
    assert policy == hdr.ratelimit_policy_value(statuses)
    assert fill_ratelimit(template, figures) == hdr.ratelimit_value(statuses)
    # And both parse as structured-field lists with one member per quota.
    for value in (policy, fill_ratelimit(template, figures)):
        parsed = http_sfv.List()
        parsed.parse(value.encode())
        assert len(parsed) == len(layout)


def test_a_template_and_figures_that_do_not_fit_are_refused() -> None:
    _, template = hdr.ratelimit_templates((("requests", QuotaKind.RATE, 600, 60),))
    assert fill_ratelimit(template, (599, 1)) == '"requests";r=599;t=1'
    with pytest.raises(ValueError, match="takes 2 figures"):
        fill_ratelimit(template, (599,))


def test_lazy_quotas_equal_eager_ones_and_headers_use_the_rendering() -> None:
    layout = (("requests", QuotaKind.RATE, 600, 60), ("concurrent", QuotaKind.CONCURRENCY, 20, 0))
    figures = (599, 1, 19)
    policy, template = hdr.ratelimit_templates(layout)
    rendered = Rendered(policy, fill_ratelimit(template, figures), layout, figures)
    lazy = Decision(True, Reason.ADMITTED, "p", quotas=None, rendered=rendered)
    eager = Decision(
        True,
        Reason.ADMITTED,
        "p",
        quotas=(
            QuotaStatus("requests", QuotaKind.RATE, 600, 60, 599, 1),
            QuotaStatus("concurrent", QuotaKind.CONCURRENCY, 20, 0, 19, 0),
        ),
    )
    assert lazy.quotas == eager.quotas
    assert lazy == eager  # equality ignores how the headers were produced
    lazy_headers: dict[str, str] = {}
    eager_headers: dict[str, str] = {}
    hdr.apply_admitted(lazy_headers, lazy)
    hdr.apply_admitted(eager_headers, eager)
    assert lazy_headers == eager_headers
    assert lazy_headers[hdr.RATELIMIT] == '"requests";r=599;t=1, "concurrent";r=19'


def test_decision_replace_and_repr() -> None:
    d = Decision(False, Reason.UNAVAILABLE, "p", retry_after_seconds=2, detail="redis down")
    r = d.replace(degraded=True)
    assert r.degraded and not d.degraded
    assert (r.reason, r.project_id, r.retry_after_seconds, r.detail) == (
        Reason.UNAVAILABLE,
        "p",
        2,
        "redis down",
    )
    assert r != d
    assert "retry_after_seconds=2" in repr(d)
    assert d.wallet_state is WalletState.UNSPECIFIED


def _exported(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _record(metrics: GatewayMetrics, latencies: list[float]) -> None:
    """What the middleware does per request (admitted, committed 3 credits of meter m)."""
    hot = metrics.hot
    for seconds in latencies:
        hot.observe(seconds)
        hot.decided(True, Reason.ADMITTED)
        hot.ended(True, "m", 3)
    hot.ended(False, "m", 0)  # a release: counted, charges nothing
    hot.decided(False, Reason.RATE_LIMITED)


LATENCIES = [0.00001, 0.00005, 0.0002, 0.0009, 0.003, 0.2, 0.05, 0.0001]


def test_folded_counts_equal_per_request_observations() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    reference = Histogram("reference_seconds", "", buckets=ADMISSION_BUCKETS, registry=registry)
    for seconds in LATENCIES:
        reference.observe(seconds)
    _record(metrics, LATENCIES)
    # A collect on the owning thread folds first, so the scrape is exact.
    name = "creditgate_admission_duration_seconds"
    for le in [*(str(b) for b in ADMISSION_BUCKETS), "+Inf"]:
        assert _exported(registry, f"{name}_bucket", {"le": le}) == _exported(
            registry, "reference_seconds_bucket", {"le": le}
        ), le
    assert _exported(registry, f"{name}_count", {}) == len(LATENCIES)
    assert _exported(registry, f"{name}_sum", {}) == sum(LATENCIES)
    decisions = "creditgate_decisions_total"
    assert _exported(registry, decisions, {"outcome": "admitted", "reason": "admitted"}) == 8
    assert _exported(registry, decisions, {"outcome": "denied", "reason": "rate-limited"}) == 1
    settled = {"action": "commit", "result": "ok"}
    assert _exported(registry, "creditgate_settlements_total", settled) == 8
    released = {"action": "release", "result": "ok"}
    assert _exported(registry, "creditgate_settlements_total", released) == 1
    assert _exported(registry, "creditgate_committed_credits_total", {"meter": "m"}) == 24
    # Folding zeroed the plain counts: a second scrape counts nothing twice.
    assert _exported(registry, f"{name}_count", {}) == len(LATENCIES)
    assert not any(metrics.hot.latency_counts()) and not metrics.hot.take_decisions()


def test_counts_kept_from_one_fold_to_the_next_add_up_exactly() -> None:
    """The counting cells outlive a fold (zeroed, not replaced): counts recorded after it,
    for reasons and meters seen before and new ones, are folded once each."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    for round_no in range(3):
        _record(metrics, LATENCIES)
        metrics.hot.decided(False, Reason.RATE_LIMITED)
        metrics.hot.ended(True, f"meter-{round_no}", 5)
        metrics.fold()
    decisions = "creditgate_decisions_total"
    assert _exported(registry, decisions, {"outcome": "admitted", "reason": "admitted"}) == 24
    assert _exported(registry, decisions, {"outcome": "denied", "reason": "rate-limited"}) == 6
    credits = "creditgate_committed_credits_total"
    assert _exported(registry, credits, {"meter": "m"}) == 3 * 24
    for round_no in range(3):
        assert _exported(registry, credits, {"meter": f"meter-{round_no}"}) == 5
    name = "creditgate_admission_duration_seconds"
    assert _exported(registry, f"{name}_count", {}) == 3 * len(LATENCIES)
    assert _exported(registry, f"{name}_sum", {}) == pytest.approx(3 * sum(LATENCIES))
    settled = {"action": "commit", "result": "ok"}
    assert _exported(registry, "creditgate_settlements_total", settled) == 3 * 9
    assert metrics.hot.take_decisions() == [] and metrics.hot.take_credits() == []


def test_a_collect_on_another_thread_does_not_fold() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    _record(metrics, LATENCIES)
    seen: list[float | None] = []
    other = threading.Thread(
        target=lambda: seen.append(
            registry.get_sample_value("creditgate_admission_duration_seconds_count")
        )
    )
    other.start()
    other.join()
    assert seen == [0.0]  # the counts stay with the loop's thread until it folds
    assert sum(metrics.hot.latency_counts()) == len(LATENCIES)
    metrics.fold()
    assert _exported(registry, "creditgate_admission_duration_seconds_count", {}) == len(LATENCIES)


def test_fold_without_histogram_internals_keeps_counts_exact() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics._bucket_values = None  # a prometheus-client without Histogram._buckets
    _record(metrics, LATENCIES)
    metrics.fold()
    name = "creditgate_admission_duration_seconds"
    assert _exported(registry, f"{name}_count", {}) == len(LATENCIES)
    assert _exported(registry, f"{name}_bucket", {"le": "0.0001"}) == 3
    assert _exported(registry, f"{name}_bucket", {"le": "+Inf"}) == len(LATENCIES)


def test_other_parts_fold_with_the_gateway_and_a_last_time_when_removed() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    counts = {"pending": 0, "folded": 0}

    def fold() -> None:
        counts["folded"] += counts["pending"]
        counts["pending"] = 0

    metrics.add_fold(fold)
    counts["pending"] = 5
    registry.get_sample_value("creditgate_admission_duration_seconds_count")
    assert counts == {"pending": 0, "folded": 5}
    counts["pending"] = 2
    metrics.remove_fold(fold)
    assert counts == {"pending": 0, "folded": 7}
    counts["pending"] = 1
    metrics.fold()
    assert counts["folded"] == 7
