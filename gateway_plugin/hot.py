"""Per-request counts as plain integers, added to on the admission hot path (compiled).

gateway_plugin.metrics.GatewayMetrics.fold() moves them into the Prometheus metrics and
zeroes them: prometheus-client takes a lock for every inc() and observe(), and four of them
per request cost more than the admission decision itself. Compiled with the middleware
(admission.native), each count is a field of a C struct rather than an attribute lookup.

A count is a field of HotCounts (admissions, commits, releases, the latency sum), or, where
counts are kept per reason, per meter or per latency bucket, a `Tally`: a one-field object
kept from one fold to the next. Adding to either changes a C integer in place. A count kept
as a Python int in a dict or a list would be replaced by a new int object at every request
once it passes 256 (the small-int cache): an allocation and a free per count per request.
"""

from __future__ import annotations

from typing import TypeVar

from admission.decision import Reason

K = TypeVar("K")  # a Reason or a meter name

_ADMITTED = Reason.ADMITTED


class Tally:
    """One count (a C integer once compiled)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _tally(counts: dict[K, Tally], key: K) -> Tally:
    """counts[key], made at the first use of `key`."""
    tally = counts.get(key)
    if tally is None:
        tally = counts[key] = Tally()
    return tally


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
        self.admissions = 0  # admitted with Reason.ADMITTED, the common case
        # Other decisions per reason: admitted ones and denied ones.
        self._admitted: dict[Reason, Tally] = {}
        self._denied: dict[Reason, Tally] = {}
        # Admission latency: count per bucket of `bounds` (index len(bounds) is +Inf).
        self._latency = [Tally() for _ in range(len(bounds) + 1)]
        self.latency_sum = 0.0
        self.commits = 0  # commits that succeeded
        self.releases = 0  # releases that succeeded
        self._credits: dict[str, Tally] = {}  # committed, per meter

    def observe(self, seconds: float) -> None:
        """One admission latency: Histogram.observe's bucket (the first bound >= seconds)."""
        i = 0
        for bound in self.bounds:
            if seconds <= bound:
                break
            i += 1
        self._latency[i].n += 1
        self.latency_sum += seconds

    def decided(self, admitted: bool, reason: Reason) -> None:
        if admitted and reason is _ADMITTED:
            self.admissions += 1  # no dict: a StrEnum key is slower to look up than a str
        else:
            _tally(self._admitted if admitted else self._denied, reason).n += 1

    def ended(self, commit: bool, meter: str, amount: int) -> None:
        """A commit of `amount` credits of `meter` (or a release) that succeeded."""
        if commit:
            self.commits += 1
            if amount:
                _tally(self._credits, meter).n += amount
        else:
            self.releases += 1

    # -- read by the fold (and tests); each take_* returns the counts and zeroes them ------

    def latency_counts(self) -> list[int]:
        """The count per latency bucket, without zeroing them."""
        return [t.n for t in self._latency]

    def take_latency(self) -> tuple[list[int], float]:
        counts = [t.n for t in self._latency]
        for t in self._latency:
            t.n = 0
        total = self.latency_sum
        self.latency_sum = 0.0
        return counts, total

    def take_decisions(self) -> list[tuple[bool, Reason, int]]:
        """(admitted, reason, count) for every reason counted since the last take."""
        out = []
        if self.admissions:
            out.append((True, _ADMITTED, self.admissions))
            self.admissions = 0
        for admitted, counts in ((True, self._admitted), (False, self._denied)):
            for reason, tally in counts.items():
                if tally.n:
                    out.append((admitted, reason, tally.n))
                    tally.n = 0
        return out

    def take_credits(self) -> list[tuple[str, int]]:
        """(meter, credits committed) for every meter counted since the last take."""
        out = []
        for meter, tally in self._credits.items():
            if tally.n:
                out.append((meter, tally.n))
                tally.n = 0
        return out
