"""Errors of the admission package; decisions are values (admission.decision), these are failures.

AdmissionError
├── PolicyError            bad policy file: message names file, line and field
├── StoreUnavailable       Redis unreachable or too slow (converted from redis-py errors)
└── AuthorityUnavailable   the authority cannot be reached (cache fill, settle)
"""

from __future__ import annotations

from redis.exceptions import ClusterError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What redis-py raises for a failed command: RedisClusterException is not a RedisError.
REDIS_ERRORS = (RedisError, RedisClusterException)

# After a round trip to a shard failed (see redis_unreachable), requests that would need Redis
# are decided by their route's on_redis_down at once for this long; then Redis is tried again.
REDIS_RETRY_S = 1.0


class AdmissionError(Exception):
    """Base of every error raised by the admission package."""


class PolicyError(AdmissionError):
    """A policy file that cannot be used, e.g. "policy.toml:14: routes[1].cost: must be ..."."""

    def __init__(self, message: str, *, filename: str = "", line: int = 0, field: str = "") -> None:
        super().__init__(message)
        self.filename = filename
        self.line = line
        self.field = field


class StoreUnavailable(AdmissionError):
    """Redis did not answer in time or refused the connection; the original is the __cause__."""


class AuthorityUnavailable(AdmissionError):
    """The authority could not be reached or did not answer before the deadline."""


# Redis did not answer, or a cluster cannot serve the slot (CLUSTERDOWN, MASTERDOWN, a slot
# without a node, the client's redirections exhausted): redis-py may spend a timeout on each.
_UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    RedisClusterException,
    OSError,
    TimeoutError,
)


def redis_unreachable(exc: BaseException) -> bool:
    """Whether a failed round trip means the shard is unreachable or too slow, rather than an
    error reply to a call, which came back at once (WRONGTYPE, OOM, READONLY, a script error).
    The exception's __cause__ chain is searched: StoreUnavailable wraps what redis-py raised."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, _UNREACHABLE):
            return True
        seen = seen.__cause__
    return False
