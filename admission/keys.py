"""The Redis key layout: every key of a project, its shard and its outbox share one hash tag.

This module is the contract between the admission scripts, the flusher and the cache fill.
"""

from __future__ import annotations

import zlib

DEFAULT_SHARDS = 16
PREFIX = "cg"
# A gateway id travels in every outbox event (E_GATEWAY); the authority refuses an event whose
# gateway_id is longer, and a refused event is never charged: the id is checked at start.
MAX_GATEWAY_ID = 128


def check_gateway_id(gateway_id: str) -> None:
    """ValueError unless `gateway_id` can travel in an outbox event."""
    if not gateway_id:
        raise ValueError("gateway_id must not be empty")
    if len(gateway_id) > MAX_GATEWAY_ID:
        raise ValueError(
            f"gateway_id is {len(gateway_id)} characters long, at most {MAX_GATEWAY_ID} "
            "allowed (the authority refuses longer ids in settlement events)"
        )


def shard_of(project_id: str, shards: int = DEFAULT_SHARDS) -> int:
    return zlib.crc32(project_id.encode()) % shards


def tag(shard: int) -> str:
    return "{" + f"{PREFIX}{shard}" + "}"


def wallet(shard: int, project_id: str) -> str:
    """Hash: cached snapshot + local counters. Fields in WALLET_FIELDS."""
    return f"{PREFIX}:{tag(shard)}:w:{project_id}"


def quota_defs(shard: int, project_id: str) -> str:
    """Hash: project quota overrides from the authority, name -> "kind:limit:window_seconds"."""
    return f"{PREFIX}:{tag(shard)}:qd:{project_id}"


def rate(shard: int, project_id: str, quota: str) -> str:
    """Sorted set: the sliding window log of a rate quota, member "<op id>:<weight>", score ms."""
    return f"{PREFIX}:{tag(shard)}:r:{project_id}:{quota}"


def rate_sum(shard: int, project_id: str, quota: str) -> str:
    """Integer: sum of the weights in the rate() log (kept next to it so admission is O(log n))."""
    return f"{PREFIX}:{tag(shard)}:rs:{project_id}:{quota}"


def concurrency(shard: int, project_id: str, quota: str) -> str:
    """Integer: requests in flight under this concurrency quota."""
    return f"{PREFIX}:{tag(shard)}:c:{project_id}:{quota}"


def hold(shard: int, hold_id: str) -> str:
    """Hash: one ACTIVE hold (project, amount, meter, route, overage, concurrency quotas)."""
    return f"{PREFIX}:{tag(shard)}:h:{hold_id}"


def hold_expiry(shard: int) -> str:
    """Sorted set: hold_id scored by expiry time in ms, for the sweeper."""
    return f"{PREFIX}:{tag(shard)}:hx"


def lease(shard: int, lease_id: str) -> str:
    """Hash: one live lease of a gateway process (lease mode; fields in lease.lua's header).
    Lease ids start with "L" and are [A-Za-z0-9] only; they share the hold expiry zset."""
    return f"{PREFIX}:{tag(shard)}:l:{lease_id}"


def outbox(shard: int) -> str:
    """Stream: one entry per ended hold; consumer group OUTBOX_GROUP."""
    return f"{PREFIX}:{tag(shard)}:outbox"


def clock_offset(shard: int) -> str:
    """The shard scripts' test clock; only tests set it. An integer is ms added to Redis TIME;
    "=MS" freezes the scripts' time at MS (the model-based tests, which must be deterministic)."""
    return f"{PREFIX}:{tag(shard)}:clk"


def api_key(key_hash: str) -> str:
    """String: project id for a SHA-256 key hash (cache; deleted on revocation)."""
    return f"{PREFIX}:key:{key_hash}"


OUTBOX_GROUP = "settle"

# Fields of the wallet hash.
W_SNAPSHOT = "snap"  # authority `available` at version `ver`
W_VERSION = "ver"
W_STATE = "state"  # WalletState number
W_LOW_THRESHOLD = "low"
W_OVERDRAFT = "od"
W_GRACE_UNTIL = "gu"
W_HELD = "held"  # sum of ACTIVE holds
W_UNSETTLED = "uns"  # committed in Redis, not yet acknowledged by the authority
W_UNSETTLED_LIMIT = "unsl"  # invariant 7

# Fields of an outbox entry.
E_EVENT_ID = "id"
E_KIND = "k"  # "COMMIT" | "RELEASE" | "EXPIRE"
E_PROJECT = "p"
E_HOLD_ID = "h"
E_HELD = "ha"
E_AMOUNT = "a"
E_METER = "m"
E_ROUTE = "r"
E_TIME_MS = "t"
E_GATEWAY = "g"
E_QUANTITY = "n"  # requests the event stands for (lease events); missing = 1
