"""Per-request counts as plain integers, added to on the admission hot path (compiled).

gateway_plugin.metrics.GatewayMetrics.fold() moves them into the Prometheus metrics and
zeroes them: prometheus-client takes a lock for every inc() and observe(), and four of them
per request cost more than the admission decision itself. Compiled with the middleware
(admission.native), each count is a field of a C struct rather than an attribute lookup.
"""

from __future__ import annotations

from admission.decision import Reason


class HotCounts:
    """Counts owned by the event loop's thread; see GatewayMetrics.fold for when they fold.

    A fold runs every second (a task of the plugin's lifecycle), at shutdown, and at the
    start of every collect that runs on the loop's thread (a collector registered ahead of
    the metrics it feeds), so /metrics, the dashboard and registry reads in tests see every
    request counted so far. A collect on another thread (an exporter thread) does not fold;
    it sees the last fold, at most one second old. Workers of `serve --workers N` fold into
    their multiprocess files the same way.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # upper bounds of the admission latency buckets, ascending
        self.admitted: dict[Reason, int] = {}
        self.denied: dict[Reason, int] = {}
        # Admission latency: count per bucket of `bounds` (index len(bounds) is +Inf).
        self.latency = [0] * (len(bounds) + 1)
        self.latency_sum = 0.0
        self.commits = 0  # commits that succeeded
        self.releases = 0  # releases that succeeded
        self.credits: dict[str, int] = {}  # committed, per meter

    def observe(self, seconds: float) -> None:
        """One admission latency: Histogram.observe's bucket (the first bound >= seconds)."""
        i = 0
        for bound in self.bounds:
            if seconds <= bound:
                break
            i += 1
        self.latency[i] += 1
        self.latency_sum += seconds

    def decided(self, admitted: bool, reason: Reason) -> None:
        counts = self.admitted if admitted else self.denied
        counts[reason] = counts.get(reason, 0) + 1

    def ended(self, commit: bool, meter: str, amount: int) -> None:
        """A commit of `amount` credits of `meter` (or a release) that succeeded."""
        if commit:
            self.commits += 1
            if amount:
                credits = self.credits
                credits[meter] = credits.get(meter, 0) + amount
        else:
            self.releases += 1
