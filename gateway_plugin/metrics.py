"""Prometheus metrics of the gateway plugin (creditgate_*), and the /metrics handler.

Per-project series exist only for an allow-list plus the top-N projects by decisions (a
space-saving sketch), so cardinality stays bounded whatever the traffic.

The per-request figures (decisions, admission latency, commits and releases) are counted as
C integers in `gateway_plugin.hot.HotCounts` (compiled) and folded into the Prometheus metrics:
prometheus-client takes a lock for every inc() and observe(), and four of them per request
cost more than the admission decision itself. See `HotCounts` for when a fold happens.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from admission.decision import Reason
from gateway_plugin.hot import HotCounts

log = logging.getLogger("gateway_plugin")

# 50 us .. 50 ms: admission is expected well under 1 ms; the default buckets start at 5 ms.
ADMISSION_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
)


class ProjectDecisions(Collector):
    """creditgate_project_decisions_total{project,outcome} for a bounded set of projects.

    Allow-listed projects are always exported. Others compete for `top_n` places through a
    space-saving sketch of capacity 8*top_n: a project that enters the sketch starts counting
    from zero (a counter reset to Prometheus), its rank uses the inherited estimate.
    """

    def __init__(self, allow: Iterable[str], top_n: int) -> None:
        self._allow = frozenset(allow)
        self._top_n = top_n
        self._capacity = max(8 * top_n, 64) if top_n else 0
        # project -> [rank estimate, admitted, denied]
        self._entries: dict[str, list[int]] = {p: [0, 0, 0] for p in self._allow}
        self._sketched = 0
        self._lock = threading.Lock()  # collect() may run in the exporter's thread
        self.enabled = bool(self._allow) or top_n > 0

    def record(self, project_id: str, admitted: bool) -> None:
        entry = self._entries.get(project_id)
        if entry is None:
            entry = self._admit(project_id)
            if entry is None:
                return
        entry[0] += 1
        entry[1 if admitted else 2] += 1

    def _admit(self, project_id: str) -> list[int] | None:
        if not self._capacity:
            return None
        with self._lock:
            if self._sketched < self._capacity:
                self._sketched += 1
                entry = self._entries[project_id] = [0, 0, 0]
                return entry
            victim, floor = None, 0
            for pid, e in self._entries.items():
                if pid not in self._allow and (victim is None or e[0] < floor):
                    victim, floor = pid, e[0]
            if victim is None:
                return None
            del self._entries[victim]
            entry = self._entries[project_id] = [floor, 0, 0]
            return entry

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "creditgate_project_decisions",
            "Admission decisions per project (allow-listed and top-N projects only)",
            labels=["project", "outcome"],
        )
        with self._lock:
            snapshot = [(pid, list(e)) for pid, e in self._entries.items()]
        top = sorted(
            (item for item in snapshot if item[0] not in self._allow),
            key=lambda item: item[1][0],
            reverse=True,
        )[: self._top_n]
        for pid, e in [item for item in snapshot if item[0] in self._allow] + top:
            family.add_metric([pid, "admitted"], e[1])
            family.add_metric([pid, "denied"], e[2])
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _FoldFirst(Collector):
    """Registered before the plugin's metrics: a collect on the loop's thread folds first."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = weakref.ref(metrics)

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics()
        if metrics is not None and threading.get_ident() == metrics.loop_thread:
            metrics.fold()
        return iter(())

    def describe(self) -> Iterator[Metric]:
        return iter(())


class GatewayMetrics:
    """The plugin's metrics in one registry. Use `for_registry` so that several apps in one
    process (sub-apps, tests) share one set instead of colliding on registration."""

    def __init__(
        self,
        registry: CollectorRegistry,
        projects: Iterable[str] = (),
        top_projects: int = 0,
    ) -> None:
        self.registry = registry
        self.hot = HotCounts(ADMISSION_BUCKETS)
        # The thread whose collects fold (bind() sets the event loop's thread at startup).
        self.loop_thread = threading.get_ident()
        registry.register(_FoldFirst(self))
        self.admission_duration = Histogram(
            "creditgate_admission_duration_seconds",
            "Time from request arrival to the admission decision (identity + engine)",
            buckets=ADMISSION_BUCKETS,
            registry=registry,
        )
        self.decisions = Counter(
            "creditgate_decisions",
            "Admission decisions by outcome (admitted|denied) and reason",
            ["outcome", "reason"],
            registry=registry,
        )
        self.shadow_would_deny = Counter(
            "creditgate_shadow_would_deny",
            "Requests on shadow routes that the rules would have denied, by reason",
            ["reason"],
            registry=registry,
        )
        self.degraded_admits = Counter(
            "creditgate_degraded_admits",
            "Requests admitted without Redis because the route's failure policy allows it",
            ["route"],
            registry=registry,
        )
        self.settlements = Counter(
            "creditgate_settlements",
            "Holds ended by the gateway: action (commit|release) and result (ok|failed)",
            ["action", "result"],
            registry=registry,
        )
        self.committed_credits = Counter(
            "creditgate_committed_credits",
            "Credits committed by this gateway (sum of commit amounts), by meter",
            ["meter"],
            registry=registry,
        )
        self.settle_in_flight = Gauge(
            "creditgate_settle_in_flight",
            "Commits/releases started and not yet in Redis (lease mode: commits waiting for "
            "their lease's next sync, or in a sync not answered yet)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.unreported = Counter(
            "creditgate_usage_unreported",
            'Requests on commit = "reported" routes that ended without a report (the hold '
            "was committed), by route",
            ["route"],
            registry=registry,
        )
        self.project_decisions = ProjectDecisions(projects, top_projects)
        if self.project_decisions.enabled:
            registry.register(self.project_decisions)
        # Bound children, so the hot path skips labels() lookups.
        self._decision_children: dict[tuple[bool, Reason], Counter] = {}
        self.commit_ok = self.settlements.labels("commit", "ok")
        self.commit_failed = self.settlements.labels("commit", "failed")
        self.release_ok = self.settlements.labels("release", "ok")
        self.release_failed = self.settlements.labels("release", "failed")
        self._credits_children: dict[str, Counter] = {}
        self._folds: list[Callable[[], None]] = []
        # Folding latency counts needs the histogram's per-bucket values (prometheus-client
        # internals, present since 0.4); without them, each count is replayed as observe() of
        # its bucket's bound (the sum is then approximate, and a warning says so).
        buckets = getattr(self.admission_duration, "_buckets", None)
        self._bucket_values = (
            list(buckets)
            if isinstance(buckets, list)
            and len(buckets) == len(ADMISSION_BUCKETS) + 1
            and all(callable(getattr(b, "inc", None)) for b in buckets)
            and callable(getattr(getattr(self.admission_duration, "_sum", None), "inc", None))
            else None
        )
        if self._bucket_values is None:
            log.warning(
                "prometheus-client without Histogram._buckets: admission latency sums are "
                "approximate (bucket bounds)"
            )

    def add_fold(self, fold: Callable[[], None]) -> None:
        """Another part's plain counts, folded with these (on the loop's thread)."""
        self._folds.append(fold)

    def remove_fold(self, fold: Callable[[], None]) -> None:
        """Folds that part's counts a last time and forgets it."""
        with contextlib.suppress(ValueError):
            self._folds.remove(fold)
            fold()

    def bind(self) -> None:
        """Collects on the calling thread (the event loop's) fold the hot counts first."""
        self.loop_thread = threading.get_ident()

    def fold(self) -> None:
        """Moves the hot counts into the Prometheus metrics (call on the loop's thread)."""
        for fold in self._folds:
            fold()
        hot = self.hot
        for admitted, reason, n in hot.take_decisions():
            self.decision(admitted, reason).inc(n)
        latency, latency_sum = hot.take_latency()
        if any(latency):
            values = self._bucket_values
            if values is not None:
                for i, n in enumerate(latency):
                    if n:
                        values[i].inc(n)
                self.admission_duration._sum.inc(latency_sum)
            else:
                bounds = (*ADMISSION_BUCKETS, ADMISSION_BUCKETS[-1] * 2)
                for i, n in enumerate(latency):
                    for _ in range(n):
                        self.admission_duration.observe(bounds[i])
        if hot.commits:
            self.commit_ok.inc(hot.commits)
            hot.commits = 0
        if hot.releases:
            self.release_ok.inc(hot.releases)
            hot.releases = 0
        for meter, amount in hot.take_credits():
            self.credits(meter).inc(amount)

    def decision(self, admitted: bool, reason: Reason) -> Counter:
        key = (admitted, reason)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(
                "admitted" if admitted else "denied", reason.value
            )
        return child

    def credits(self, meter: str) -> Counter:
        child = self._credits_children.get(meter)
        if child is None:
            child = self._credits_children[meter] = self.committed_credits.labels(meter)
        return child

    @classmethod
    def for_registry(
        cls,
        registry: CollectorRegistry | None,
        projects: Iterable[str] = (),
        top_projects: int = 0,
    ) -> GatewayMetrics:
        reg = REGISTRY if registry is None else registry
        existing = _by_registry.get(reg)
        if existing is None:
            existing = cls(reg, projects, top_projects)
            _by_registry[reg] = existing
        return existing


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, GatewayMetrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_handler(
    registry: CollectorRegistry | None,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """GET handler that serves `registry` in the Prometheus text format."""
    return make_aiohttp_handler(REGISTRY if registry is None else registry)
