"""Prometheus metrics of the authority side of admission: flusher, cache fill, Watch, identity.

One `AuthorityMetrics` per registry (`authority_metrics(registry)`), so components share series.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_SETTLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class AuthorityMetrics:
    outbox_length: Gauge
    outbox_pending: Gauge
    outbox_oldest_pending_age: Gauge
    outbox_poison: Gauge
    settle_batch_size: Histogram
    settle_duration: Histogram
    settle_requests: Counter
    settle_errors: Counter
    settle_events: Counter
    settle_rejected: Counter
    settle_uns_clamped: Counter
    holds_swept: Counter
    cache_fills: Counter
    watch_connected: Gauge
    watch_reconnects: Counter
    watch_events: Counter
    drift_projects: Gauge
    drift: Counter
    key_resolutions: Counter
    lease_rounds: Counter
    lease_ops: Counter
    lease_errors: Counter
    lease_renewed: Counter
    lease_waits: Counter
    lease_round_duration: Histogram
    leases: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AuthorityMetrics:
        r = registry
        return cls(
            outbox_length=Gauge(
                "creditgate_outbox_length", "Entries in the outbox stream", ["shard"], registry=r
            ),
            outbox_pending=Gauge(
                "creditgate_outbox_pending",
                "Outbox entries delivered to a flusher and not yet acknowledged",
                ["shard"],
                registry=r,
            ),
            outbox_oldest_pending_age=Gauge(
                "creditgate_outbox_oldest_pending_age_seconds",
                "Age of the oldest unacknowledged outbox entry (Redis time)",
                ["shard"],
                registry=r,
            ),
            outbox_poison=Gauge(
                "creditgate_outbox_poison_entries",
                "Pending outbox entries delivered more often than the poison threshold",
                ["shard"],
                registry=r,
            ),
            settle_batch_size=Histogram(
                "creditgate_settle_batch_size",
                "Events per Settle call",
                buckets=_BATCH_BUCKETS,
                registry=r,
            ),
            settle_duration=Histogram(
                "creditgate_settle_duration_seconds",
                "Duration of Settle calls",
                buckets=_SETTLE_BUCKETS,
                registry=r,
            ),
            settle_requests=Counter(
                "creditgate_settle_requests_total", "Settle calls sent", registry=r
            ),
            settle_errors=Counter(
                "creditgate_settle_errors_total",
                "Settle calls that failed (nothing acknowledged)",
                ["code"],
                registry=r,
            ),
            settle_events=Counter(
                "creditgate_settle_events_total",
                "Settled events by result",
                ["status"],
                registry=r,
            ),
            settle_rejected=Counter(
                "creditgate_settle_rejected_total",
                "Events the authority refused for good (acknowledged, logged with the event id)",
                registry=r,
            ),
            settle_uns_clamped=Counter(
                "creditgate_settle_unsettled_clamped_total",
                "Acknowledged commits whose amount exceeded the wallet's unsettled counter",
                registry=r,
            ),
            holds_swept=Counter(
                "creditgate_holds_expired_total",
                "Holds ended by the expiry sweeper",
                registry=r,
            ),
            cache_fills=Counter(
                "creditgate_cache_fills_total",
                "Snapshot fills from the authority by result",
                ["result"],
                registry=r,
            ),
            watch_connected=Gauge(
                "creditgate_watch_connected", "1 while the Watch stream is open", registry=r
            ),
            watch_reconnects=Counter(
                "creditgate_watch_reconnects_total",
                "Watch streams reopened after an error",
                registry=r,
            ),
            watch_events=Counter(
                "creditgate_watch_events_total",
                "Watch events received by kind",
                ["kind"],
                registry=r,
            ),
            drift_projects=Gauge(
                "creditgate_cache_drift_projects",
                "Cached projects found stale by the last reconcile pass",
                registry=r,
            ),
            drift=Counter(
                "creditgate_cache_drift_total",
                "Stale cached projects found (and repaired) by reconcile",
                registry=r,
            ),
            key_resolutions=Counter(
                "creditgate_key_resolutions_total",
                "API key resolutions by where they were answered and the outcome",
                ["source", "result"],
                registry=r,
            ),
            lease_rounds=Counter(
                "creditgate_lease_sync_rounds_total",
                "Lease sync rounds (one Redis round trip for all shards each)",
                registry=r,
            ),
            lease_ops=Counter(
                "creditgate_lease_ops_total",
                "Lease operations sent to Redis by kind (SYNC, CLOSE)",
                ["kind"],
                registry=r,
            ),
            lease_errors=Counter(
                "creditgate_lease_sync_errors_total",
                "Lease operations whose round or shard failed (re-sent unchanged)",
                registry=r,
            ),
            lease_renewed=Counter(
                "creditgate_lease_renewed_total",
                "Leases Redis had expired while this process still used them",
                registry=r,
            ),
            lease_waits=Counter(
                "creditgate_lease_waits_total",
                "Requests the lease did not cover, which waited for a sync",
                registry=r,
            ),
            lease_round_duration=Histogram(
                "creditgate_lease_sync_duration_seconds",
                "Duration of a lease sync round trip",
                buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
                registry=r,
            ),
            leases=Gauge(
                "creditgate_leases",
                "Project leases this process holds",
                registry=r,
            ),
        )


_lock = threading.Lock()
_by_registry: dict[int, tuple[CollectorRegistry, AuthorityMetrics]] = {}


def authority_metrics(registry: CollectorRegistry | None = None) -> AuthorityMetrics:
    """The metrics registered in `registry` (default: the global one), created on first use."""
    reg = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(id(reg))
        if found is None or found[0] is not reg:
            found = (reg, AuthorityMetrics.create(reg))
            _by_registry[id(reg)] = found
        return found[1]
