"""The Redis adapter of the engine: encodes batches for admit.lua / settle.lua / sweep.lua /
lease.lua (lease mode: the keys, arguments and replies are in lease.lua's header).

One pipeline round trip for all shards on standalone Redis; one call per shard on a Cluster.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.resources
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from admission import keys
from admission.decision import QuotaKind, QuotaStatus, Reason, WalletState
from admission.errors import REDIS_ERRORS, StoreUnavailable
from admission.policy import QuotaDef

Client: TypeAlias = "aioredis.Redis | aioredis.RedisCluster"

# A script call with hundreds of operations blocks Redis for its whole run; split bigger batches.
MAX_OPS_PER_CALL = 128
_KEY_CACHE_MAX = 50_000
_IDLE_CONNECTIONS = 4

_REASONS = {
    0: Reason.ADMITTED,
    1: Reason.RATE_LIMITED,
    2: Reason.CONCURRENCY_LIMITED,
    3: Reason.INSUFFICIENT_CREDITS,
    4: Reason.WALLET_GRACE,
    5: Reason.WALLET_EXPIRED,
    6: Reason.SETTLEMENT_BACKLOG,
}


class AdmitStatus(enum.IntEnum):
    ADMITTED = 0
    DENIED = 1
    COLD = 2


# Lua integers arrive as Python ints (RESP integer replies): plain dict lookups, no int() calls.
_STATUSES = {int(s): s for s in AdmitStatus}
_STATES = {int(s): s for s in WalletState}


class SettleStatus(enum.IntEnum):
    ENDED = 0
    UNKNOWN = 1
    ALREADY_ENDED = 2
    OVER_HOLD = 3
    WRONG_KEYS = 4
    NOT_DUE = 5


# Internal hot-path records: plain slots (a frozen __init__ costs an object.__setattr__ per field).
@dataclass(slots=True)
class AdmitOp:
    shard: int
    project_id: str
    op_id: str  # the hold id when a hold is created; the rate log member otherwise
    cost: int
    weight: int
    ttl_ms: int
    meter: str
    route: str
    allow_overage: bool
    unsettled_limit: int
    quotas: tuple[QuotaDef, ...]


@dataclass(slots=True)
class AdmitResult:
    status: AdmitStatus
    reason: Reason
    retry_after: int
    wallet_state: WalletState
    low: bool
    grace_until_ms: int
    hold_created: bool
    quotas: tuple[QuotaStatus, ...]
    counters: tuple[str, ...]  # concurrency counter keys the hold occupies
    now_ms: int  # the script's clock when it decided


@dataclass(slots=True)
class SettleOp:
    shard: int
    hold_id: str
    kind: str  # COMMIT | RELEASE | EXPIRE
    amount: int  # -1: the held amount
    wallet_key: str | None
    counters: tuple[str, ...]


@dataclass(slots=True)
class SettleResult:
    status: SettleStatus
    state: str
    amount: int
    held: int
    wallet_key: str
    counters: tuple[str, ...]
    now_ms: int


_SETTLE_STATUSES = {int(s): s for s in SettleStatus}
# The states settle.lua answers, as they arrive (bytes), so the hot path decodes nothing.
_SETTLE_STATES = {s.encode(): s for s in ("COMMITTED", "RELEASED", "EXPIRED", "ACTIVE", "UNKNOWN")}


# -- lease mode (lease.lua) --------------------------------------------------------------------

LEASE_ID_PREFIX = "L"  # hold ids are lowercase hex: the sweeper tells leases apart by this


class LeaseStatus(enum.IntEnum):
    OK = 0  # applied (a repeated seq gets the stored reply of that seq)
    COLD = 1  # no wallet snapshot: commits/returns applied, nothing granted; fill + resync
    UNKNOWN = 2  # EXPIRE of a lease that does not exist
    NOT_DUE = 3  # EXPIRE before the lease's exp: nothing changed
    WRONG_KEYS = 4  # EXPIRE: the declared keys are not the lease's; call again with them
    STALE = 5  # SYNC/CLOSE with a seq below the stored one: nothing changed (a bug)


@dataclass(frozen=True, slots=True)
class LeaseQuotaOp:
    quota: QuotaDef  # the policy's definition; project overrides apply in the script
    used: int  # rate: units of the current grant used since the last sync (stamped at now)
    keep: int  # rate: unused units carried; concurrency: slots kept (in flight + free kept)
    want: int  # more units/slots wanted beyond keep
    want_min: int  # the least grant that serves a waiting request (0: none waiting)


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    """Aggregated commits of one route+meter since the last sync."""

    event_id: str  # "<lease_id>.<seq>.<i>"
    amount: int  # credits charged (> 0)
    held: int  # sum of the holds these commits ended
    count: int  # number of requests (ledger quantity)
    meter: str
    route: str


@dataclass(frozen=True, slots=True)
class LeaseOp:
    kind: str  # "SYNC" | "CLOSE" | "EXPIRE"
    shard: int
    lease_id: str
    project_id: str  # "" for EXPIRE
    seq: int  # 1, 2, 3... per lease (SYNC/CLOSE); 0 for EXPIRE
    ttl_ms: int  # grant lifetime; the lease expires at now + ttl_ms unless synced again
    keep: int  # credits kept (in-flight holds + free kept); trusted, not checked
    want: int  # more credits wanted
    want_min: int  # least credit grant that serves a waiting request (0: none)
    unsettled_limit: int  # the policy default (the wallet's unsl field overrides, like admit)
    quotas: tuple[LeaseQuotaOp, ...] = ()
    events: tuple[LeaseEvent, ...] = ()
    wallet_key: str | None = None  # EXPIRE: declared wallet key (None: unknown yet)
    counters: tuple[str, ...] = ()  # EXPIRE: declared concurrency counter keys


@dataclass(frozen=True, slots=True)
class LeaseQuotaResult:
    name: str
    kind: QuotaKind  # effective kind (after project override)
    limit: int
    window_seconds: int  # 0 for concurrency
    granted: int  # rate: units in the new grant; concurrency: pool size (keep + new)
    remaining: int  # limit minus everything counted in Redis after this sync (>= 0)
    reset_seconds: int  # rate: until the oldest counted entry leaves the window; 0 otherwise
    retry_after_seconds: int  # when granted - keep < want_min: until want_min could fit; else 0


@dataclass(frozen=True, slots=True)
class LeaseResult:
    status: LeaseStatus
    now_ms: int
    expires_ms: int  # the lease's new exp (SYNC), 0 otherwise
    wallet_state: WalletState
    # Credits the lease's holds may have in flight before the wallet is LOW (lease.lua): the
    # wallet is LOW while the lease has more in flight than this.
    low_room: int
    grace_until_ms: int
    amount: int  # credits now held by the lease (keep + granted); 0 after CLOSE/EXPIRE
    reason: Reason | None  # when the credit grant < want_min (WALLET_EXPIRED: always if EXPIRED)
    renewed: bool  # SYNC found no lease although seq > 1 (it had expired): started afresh
    quotas: tuple[LeaseQuotaResult, ...] = ()
    wallet_key: str = ""  # WRONG_KEYS
    counters: tuple[str, ...] = ()  # WRONG_KEYS


_LEASE_STATUSES = {int(s): s for s in LeaseStatus}
_LEASE_KINDS = ("SYNC", "CLOSE", "EXPIRE")


def is_lease_id(item_id: str) -> bool:
    """An id from the hold expiry zset that names a lease (not a hold)."""
    return item_id.startswith(LEASE_ID_PREFIX)


def expire_op(
    shard: int, lease_id: str, wallet_key: str | None = None, counters: tuple[str, ...] = ()
) -> LeaseOp:
    """The sweeper's EXPIRE of a due lease (first call: keys unknown; then the named ones)."""
    return LeaseOp("EXPIRE", shard, lease_id, "", 0, 0, 0, 0, 0, 0, (), (), wallet_key, counters)


@dataclass(frozen=True, slots=True)
class Due:
    """Holds of one shard whose expiry had passed at `now_ms` (Redis time)."""

    now_ms: int
    hold_ids: list[str]


@dataclass(slots=True)
class StoreStats:
    """Counters for the benchmark and the metrics module; only ever incremented."""

    batches: int = 0
    round_trips: int = 0
    script_calls: int = 0
    admit_ops: int = 0
    settle_ops: int = 0
    lease_ops: int = 0
    script_loads: int = 0
    errors: int = 0


def _lua(name: str) -> str:
    """A shard script with lua/lib.lua (clock, number and sliding-log helpers) in front."""
    lua = importlib.resources.files("admission").joinpath("lua")
    return lua.joinpath("lib.lua").read_text("utf-8") + "\n" + lua.joinpath(name).read_text("utf-8")


def _bulk(text: str) -> bytes:
    """One RESP bulk string."""
    b = text.encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _pack(parts: Sequence[bytes], count: int) -> bytes:
    """A RESP command from `count` bulk strings already encoded (some joined in `parts`)."""
    return b"*%d\r\n%b" % (count, b"".join(parts))


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# A batch result: per (script, shard) the results of its ops, or the error that stopped it.
# A script call: (keys, args) for redis-py (Cluster), or one packed RESP command (standalone).
Call: TypeAlias = "tuple[list[str], list[str]] | bytes"
Results: TypeAlias = "dict[tuple[str, int], list[Any] | BaseException]"


class Store:
    """Runs batches of admit/settle operations against Redis or Redis Cluster."""

    def __init__(self, client: Client, *, gateway_id: str) -> None:
        keys.check_gateway_id(gateway_id)
        self._client = client
        self._cluster = isinstance(client, aioredis.RedisCluster)
        self._gateway = gateway_id
        self._scripts = {
            name: client.register_script(_lua(f"{name}.lua"))
            for name in ("admit", "settle", "sweep", "lease")
        }
        self.stats = StoreStats()
        self._key_cache: dict[tuple[str, tuple[QuotaDef, ...]], list[str]] = {}
        # Standalone Redis: commands are packed here from cached RESP fragments (redis-py's
        # per-argument encoding was the largest cost of a batch). Per project+quotas: the
        # fragments before the hold key and after it; per string: its bulk string.
        self._frag_cache: dict[tuple[str, tuple[QuotaDef, ...]], tuple[bytes, bytes]] = {}
        self._bulks: dict[str, bytes] = {}
        # Connections this store keeps between batches (standalone): taking one from the pool
        # costs a timeout context and health bookkeeping per batch. Returned to the pool only
        # after an error; the client's pool disconnects them all when it is closed.
        self._idle: list[Any] = []
        self._heads = {
            name: _bulk("EVALSHA") + _bulk(script.sha) for name, script in self._scripts.items()
        }

    @property
    def cluster(self) -> bool:
        return self._cluster

    # -- encoding ---------------------------------------------------------------------------

    def _project_keys(self, op: AdmitOp) -> list[str]:
        """wallet, quota_defs, then log/sum/counter per quota; cached (f-strings add up)."""
        ck = (op.project_id, op.quotas)
        ks = self._key_cache.get(ck)
        if ks is None:
            if len(self._key_cache) >= _KEY_CACHE_MAX:
                self._key_cache.clear()
            shard, p = op.shard, op.project_id
            ks = [keys.wallet(shard, p), keys.quota_defs(shard, p)]
            for q in op.quotas:
                ks += [
                    keys.rate(shard, p, q.name),
                    keys.rate_sum(shard, p, q.name),
                    keys.concurrency(shard, p, q.name),
                ]
            self._key_cache[ck] = ks
        return ks

    def _admit_call(self, shard: int, ops: Sequence[AdmitOp]) -> tuple[list[str], list[str]]:
        ks = [keys.hold_expiry(shard), keys.clock_offset(shard)]
        args = [str(len(ops))]
        for op in ops:
            pk = self._project_keys(op)
            ks += pk[:2]
            ks.append(keys.hold(shard, op.op_id))
            ks += pk[2:]
            args.append(self._admit_arg(op))
        return ks, args

    def _bulk_of(self, text: str) -> bytes:
        """The bulk string of a string that repeats (keys of projects, shard keys)."""
        b = self._bulks.get(text)
        if b is None:
            if len(self._bulks) >= _KEY_CACHE_MAX:
                self._bulks.clear()
            b = self._bulks[text] = _bulk(text)
        return b

    def _admit_packed(self, shard: int, ops: Sequence[AdmitOp]) -> bytes:
        """_admit_call's EVALSHA as one RESP command, from cached fragments."""
        bulk_of = self._bulk_of
        hold_prefix = keys.hold(shard, "")
        ks = [bulk_of(keys.hold_expiry(shard)), bulk_of(keys.clock_offset(shard))]
        args = [_bulk(str(len(ops)))]
        nkeys = 2
        for op in ops:
            ck = (op.project_id, op.quotas)
            frags = self._frag_cache.get(ck)
            if frags is None:
                if len(self._frag_cache) >= _KEY_CACHE_MAX:
                    self._frag_cache.clear()
                pk = self._project_keys(op)
                frags = self._frag_cache[ck] = (
                    b"".join(_bulk(k) for k in pk[:2]),
                    b"".join(_bulk(k) for k in pk[2:]),
                )
            ks += (frags[0], _bulk(hold_prefix + op.op_id), frags[1])
            nkeys += 3 + 3 * len(op.quotas)
            args.append(_bulk(self._admit_arg(op)))
        return _pack([self._heads["admit"], _bulk(str(nkeys)), *ks, *args], 3 + nkeys + len(args))

    @staticmethod
    def _admit_arg(op: AdmitOp) -> str:
        # One argument per op: encoding arguments is most of the client's cost per call.
        parts = [
            op.project_id,
            op.op_id,
            str(op.cost),
            str(op.weight),
            str(op.ttl_ms),
            op.meter,
            op.route,
            "1" if op.allow_overage else "0",
            str(op.unsettled_limit),
            str(len(op.quotas)),
        ]
        for q in op.quotas:
            parts += [q.name, q.kind.value, str(q.limit), str(q.window_seconds)]
        return " ".join(parts)

    def _settle_packed(self, shard: int, ops: Sequence[SettleOp]) -> bytes:
        """_settle_call's EVALSHA as one RESP command."""
        bulk_of = self._bulk_of
        hold_prefix = keys.hold(shard, "")
        ks = [
            bulk_of(keys.hold_expiry(shard)),
            bulk_of(keys.clock_offset(shard)),
            bulk_of(keys.outbox(shard)),
        ]
        args = [
            bulk_of(keys.wallet(shard, "")[: -len("w:")]),
            bulk_of(self._gateway),
            _bulk(str(len(ops))),
        ]
        for op in ops:
            ks.append(_bulk(hold_prefix + op.hold_id))
            nk = 0
            if op.wallet_key is not None:
                ks.append(bulk_of(op.wallet_key))
                ks += [bulk_of(c) for c in op.counters]
                nk = 1 + len(op.counters)
            args += (
                _bulk(op.hold_id),
                bulk_of(op.kind),
                _bulk(str(op.amount)),
                bulk_of(str(nk)),
            )
        return _pack(
            [self._heads["settle"], _bulk(str(len(ks))), *ks, *args], 3 + len(ks) + len(args)
        )

    def _settle_call(self, shard: int, ops: Sequence[SettleOp]) -> tuple[list[str], list[str]]:
        ks = [keys.hold_expiry(shard), keys.clock_offset(shard), keys.outbox(shard)]
        args = [keys.wallet(shard, "")[: -len("w:")], self._gateway, str(len(ops))]
        for op in ops:
            extra = [] if op.wallet_key is None else [op.wallet_key, *op.counters]
            ks += [keys.hold(shard, op.hold_id), *extra]
            args += [op.hold_id, op.kind, str(op.amount), str(len(extra))]
        return ks, args

    @staticmethod
    def _decode_admit(op: AdmitOp, raw: list[Any]) -> AdmitResult:
        status = _STATUSES[raw[0]]
        made_hold = raw[6] == 1
        quotas: list[QuotaStatus] = []
        counters: list[str] = []
        if status is not AdmitStatus.COLD:
            base = 8
            for q in op.quotas:
                if raw[base] == 0:
                    kind = QuotaKind.RATE
                else:
                    kind = QuotaKind.CONCURRENCY
                    if made_hold:
                        counters.append(keys.concurrency(op.shard, op.project_id, q.name))
                quotas.append(
                    QuotaStatus(
                        q.name, kind, raw[base + 1], raw[base + 2], raw[base + 3], raw[base + 4]
                    )
                )
                base += 5
        return AdmitResult(
            status,
            _REASONS[raw[1]],
            raw[2],
            _STATES.get(raw[3], WalletState.UNSPECIFIED),
            raw[4] == 1,
            raw[5],
            made_hold,
            tuple(quotas),
            tuple(counters),
            raw[7],
        )

    @staticmethod
    def _decode_settle(raw: list[Any]) -> SettleResult:
        state = _SETTLE_STATES.get(raw[1])
        return SettleResult(
            _SETTLE_STATUSES[raw[0]],
            state if state is not None else _s(raw[1]),
            raw[2],
            raw[3],
            _s(raw[4]) if raw[4] else "",
            tuple(_s(raw[5]).split()) if raw[5] else (),
            raw[6],
        )

    def _lease_call(self, shard: int, ops: Sequence[LeaseOp]) -> tuple[list[str], list[str]]:
        """lease.lua's keys and arguments (layout in the script's header)."""
        ks = [keys.hold_expiry(shard), keys.clock_offset(shard), keys.outbox(shard)]
        args = [keys.wallet(shard, "")[: -len("w:")], self._gateway, str(len(ops))]
        for op in ops:
            if op.kind not in _LEASE_KINDS:
                raise ValueError(f"unknown lease op kind {op.kind!r}")
            ks.append(keys.lease(shard, op.lease_id))
            if op.kind == "EXPIRE":
                extra = [] if op.wallet_key is None else [op.wallet_key, *op.counters]
                ks += extra
                args.append(f"EXPIRE {op.lease_id} {len(extra)}")
                continue
            p = op.project_id
            ks += [keys.wallet(shard, p), keys.quota_defs(shard, p)]
            parts = [
                op.kind,
                op.lease_id,
                p,
                str(op.seq),
                str(op.ttl_ms),
                str(op.keep),
                str(op.want),
                str(op.want_min),
                str(op.unsettled_limit),
                str(len(op.quotas)),
                str(len(op.events)),
            ]
            for qo in op.quotas:
                q = qo.quota
                ks += [
                    keys.rate(shard, p, q.name),
                    keys.rate_sum(shard, p, q.name),
                    keys.concurrency(shard, p, q.name),
                ]
                parts += [
                    q.name,
                    q.kind.value,
                    str(q.limit),
                    str(q.window_seconds),
                    str(qo.used),
                    str(qo.keep),
                    str(qo.want),
                    str(qo.want_min),
                ]
            for ev in op.events:
                parts += [
                    ev.event_id,
                    str(ev.amount),
                    str(ev.held),
                    str(ev.count),
                    ev.meter,
                    ev.route,
                ]
            args.append(" ".join(parts))
        return ks, args

    @staticmethod
    def _decode_lease(raw: list[Any]) -> LeaseResult:
        # A repeated seq's reply comes from its stored JSON: every element a string, so numbers
        # go through int() (which takes the RESP integers and the bulk strings alike).
        quotas: list[LeaseQuotaResult] = []
        base = 12
        for _ in range(int(raw[11])):
            quotas.append(
                LeaseQuotaResult(
                    _s(raw[base]),
                    QuotaKind.RATE if int(raw[base + 1]) == 0 else QuotaKind.CONCURRENCY,
                    int(raw[base + 2]),
                    int(raw[base + 3]),
                    int(raw[base + 4]),
                    int(raw[base + 5]),
                    int(raw[base + 6]),
                    int(raw[base + 7]),
                )
            )
            base += 8
        reason = int(raw[7])
        return LeaseResult(
            _LEASE_STATUSES[int(raw[0])],
            int(raw[1]),
            int(raw[2]),
            _STATES.get(int(raw[3]), WalletState.UNSPECIFIED),
            int(raw[4]),
            int(raw[5]),
            int(raw[6]),
            _REASONS[reason] if reason else None,
            int(raw[8]) == 1,
            tuple(quotas),
            _s(raw[9]) if raw[9] else "",
            tuple(_s(raw[10]).split()) if raw[10] else (),
        )

    # -- running ----------------------------------------------------------------------------

    async def run(
        self,
        admits: Mapping[int, Sequence[AdmitOp]],
        settles: Mapping[int, Sequence[SettleOp]],
    ) -> tuple[
        dict[int, list[AdmitResult] | BaseException], dict[int, list[SettleResult] | BaseException]
    ]:
        """Run every shard's batch; a failed shard maps to its StoreUnavailable."""
        self.stats.batches += 1
        calls: list[tuple[str, int, int, Call]] = []
        cluster = self._cluster
        for shard, ops in admits.items():
            for lo in range(0, len(ops), MAX_OPS_PER_CALL):
                chunk = ops[lo : lo + MAX_OPS_PER_CALL]
                call = (
                    self._admit_call(shard, chunk) if cluster else self._admit_packed(shard, chunk)
                )
                calls.append(("admit", shard, lo, call))
            self.stats.admit_ops += len(ops)
        for shard, sops in settles.items():
            for lo in range(0, len(sops), MAX_OPS_PER_CALL):
                schunk = sops[lo : lo + MAX_OPS_PER_CALL]
                call = (
                    self._settle_call(shard, schunk)
                    if cluster
                    else self._settle_packed(shard, schunk)
                )
                calls.append(("settle", shard, lo, call))
            self.stats.settle_ops += len(sops)
        raw = await self._execute([(name, call) for name, _, _, call in calls])

        admit_out: dict[int, list[AdmitResult] | BaseException] = {}
        settle_out: dict[int, list[SettleResult] | BaseException] = {}
        for (name, shard, lo, _), res in zip(calls, raw, strict=True):
            if name == "admit":
                a_prev = admit_out.get(shard)
                if isinstance(a_prev, BaseException):
                    continue
                if isinstance(res, BaseException):
                    admit_out[shard] = res
                    continue
                chunk = admits[shard][lo : lo + MAX_OPS_PER_CALL]
                decoded = [self._decode_admit(op, r) for op, r in zip(chunk, res, strict=True)]
                admit_out[shard] = [*(a_prev or []), *decoded]
            else:
                s_prev = settle_out.get(shard)
                if isinstance(s_prev, BaseException):
                    continue
                if isinstance(res, BaseException):
                    settle_out[shard] = res
                    continue
                settle_out[shard] = [*(s_prev or []), *(self._decode_settle(r) for r in res)]
        return admit_out, settle_out

    async def run_leases(
        self, ops: Mapping[int, Sequence[LeaseOp]]
    ) -> dict[int, list[LeaseResult] | BaseException]:
        """Every shard's lease ops in one round trip (Cluster: one call per shard); a failed
        shard maps to its StoreUnavailable. Chunks of MAX_OPS_PER_CALL like run(): a shard whose
        later chunk failed maps to the error although its earlier chunks were applied."""
        calls: list[tuple[int, int, tuple[list[str], list[str]]]] = []
        out: dict[int, list[LeaseResult] | BaseException] = {}
        for shard, sops in ops.items():
            out[shard] = []
            for lo in range(0, len(sops), MAX_OPS_PER_CALL):
                calls.append((shard, lo, self._lease_call(shard, sops[lo : lo + MAX_OPS_PER_CALL])))
            self.stats.lease_ops += len(sops)
        raw = await self._execute([("lease", call) for _, _, call in calls])
        for (shard, lo, _), res in zip(calls, raw, strict=True):
            prev = out[shard]
            if isinstance(prev, BaseException):
                continue
            if isinstance(res, BaseException):
                out[shard] = res
                continue
            chunk = ops[shard][lo : lo + MAX_OPS_PER_CALL]
            if len(res) != len(chunk):
                out[shard] = StoreUnavailable(f"lease.lua answered {len(res)} of {len(chunk)}")
                continue
            prev.extend(self._decode_lease(r) for r in res)
        return out

    async def due_holds(self, shards: Sequence[int], limit: int) -> dict[int, Due]:
        """Ids of expired holds per shard (Redis time); raises StoreUnavailable."""
        calls: list[tuple[str, Call]] = [
            ("sweep", ([keys.hold_expiry(s), keys.clock_offset(s)], [str(limit)])) for s in shards
        ]
        raw = await self._execute(calls)
        out: dict[int, Due] = {}
        for shard, res in zip(shards, raw, strict=True):
            if isinstance(res, BaseException):
                raise res
            out[shard] = Due(int(res[0]), [_s(x) for x in res[1]])
        return out

    async def _execute(self, calls: Sequence[tuple[str, Call]]) -> list[Any | BaseException]:
        if not calls:
            return []
        self.stats.script_calls += len(calls)
        if self._cluster:
            self.stats.round_trips += len(calls)
            return list(
                await asyncio.gather(
                    *(
                        self._call_one(name, *call)
                        for name, call in calls
                        if isinstance(call, tuple)
                    )
                )
            )
        packed = [
            (name, call if isinstance(call, bytes) else self._pack_call(name, *call))
            for name, call in calls
        ]
        return await self._pipeline(packed)

    def _pack_call(self, name: str, ks: list[str], args: list[str]) -> bytes:
        parts = [self._heads[name], _bulk(str(len(ks))), *(_bulk(x) for x in [*ks, *args])]
        return _pack(parts, 3 + len(ks) + len(args))

    async def _pipeline(self, calls: Sequence[tuple[str, bytes]]) -> list[Any | BaseException]:
        """The calls, packed already, in one round trip on one pooled connection.

        No retry after a connection error: a script may have run, and re-sending an admission
        would apply it twice. A broken connection is closed by redis-py before it is pooled.
        """
        client = self._client
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        results: list[Any | BaseException] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            self.stats.round_trips += 1
            raw: list[Any] = []
            try:
                idle = self._idle
                if idle:
                    conn = idle.pop()
                    # What the pool checks on every get: reconnect one closed or dirty
                    # (e.g. after a Redis restart) before anything is sent on it.
                    try:
                        await pool.ensure_connection(conn)
                    except BaseException:
                        await pool.release(conn)
                        raise
                else:
                    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                try:
                    await conn.send_packed_command([calls[i][1] for i in todo])
                    for _ in todo:
                        try:
                            raw.append(await conn.read_response())
                        except ResponseError as reply:  # an error reply; the stream stays in step
                            raw.append(reply)
                except BaseException:
                    # Cancelled or failed half-way: replies may be left unread on the socket.
                    await conn.disconnect(nowait=True)
                    await pool.release(conn)
                    raise
                if len(idle) < _IDLE_CONNECTIONS:
                    idle.append(conn)
                else:
                    await pool.release(conn)
            except (RedisError, OSError) as exc:
                self.stats.errors += 1
                err = StoreUnavailable(f"redis: {exc!r}")
                err.__cause__ = exc
                for i in todo:
                    results[i] = err
                return results
            missing: list[int] = []
            for i, r in zip(todo, raw, strict=True):
                if isinstance(r, NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(r, BaseException):
                    self.stats.errors += 1
                    err = StoreUnavailable(f"redis script {calls[i][0]}: {r}")
                    err.__cause__ = r
                    results[i] = err
                else:
                    results[i] = r
            if not missing:
                break
            # Scripts are gone after a restart or SCRIPT FLUSH: load them, redo only those calls
            # (NOSCRIPT means the call did not run, so re-sending cannot apply anything twice).
            try:
                for name in {calls[i][0] for i in missing}:
                    await client.script_load(self._scripts[name].script)
                    self.stats.script_loads += 1
                    self.stats.round_trips += 1
            except (RedisError, OSError) as exc:
                err = StoreUnavailable(f"redis: {exc!r}")
                err.__cause__ = exc
                for i in missing:
                    results[i] = err
                return results
            todo = missing
        return results

    async def _call_one(self, name: str, ks: list[str], args: list[str]) -> Any:
        script = self._scripts[name]
        client = self._client
        try:
            try:
                return await client.evalsha(script.sha, len(ks), *ks, *args)
            except NoScriptError:
                # Per-node script caches are lost on restart and failover (redis-py#3935).
                await client.script_load(script.script)
                self.stats.script_loads += 1
                return await client.evalsha(script.sha, len(ks), *ks, *args)
        except (*REDIS_ERRORS, OSError) as exc:
            self.stats.errors += 1
            err = StoreUnavailable(f"redis: {exc!r}")
            err.__cause__ = exc
            return err
