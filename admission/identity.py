"""Who is calling: API key -> project (local LRU, Redis, authority), or a trusted proxy's word.

Revocations reach the local cache through the Watch stream (evict); while that stream is down,
local entries live at most `disconnected_ttl_s` (1 s), so a revocation is effective within 1 s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import hashlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy, istr
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from admission import keys
from admission.authority import AuthorityClient, AuthorityRequestFailed
from admission.decision import Reason
from admission.errors import AuthorityUnavailable
from admission.metrics import authority_metrics
from creditservice.v1 import credit_pb2 as pb

log = logging.getLogger(__name__)

# A case-insensitive key: a multidict looks it up without folding its case on every request.
_AUTHORIZATION = istr("Authorization")

SECRET_RE = re.compile(r"^cg_[A-Za-z0-9_-]{43}\Z")
# \Z, not $: "$" also matches before a trailing newline.
PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
PROJECT_HEADER = "X-Creditgate-Project"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller resolved to a project."""

    project_id: str
    key_hash: str | None  # None when a trusted proxy named the project
    via_trusted_proxy: bool = False


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    trusted_proxies: tuple[str, ...] = ()  # networks, e.g. ("10.0.0.0/8", "::1/128")
    cache_size: int = 100_000
    positive_ttl_s: float = 60.0  # while the Watch stream is connected (it evicts revocations)
    disconnected_ttl_s: float = 1.0  # invariant 6: revocation effective within 1 s
    negative_ttl_s: float = 5.0
    redis_ttl_s: int = 300  # bounds a Redis mapping whose revocation no gateway saw
    # Once the authority could not answer, lookups go to Redis for this long before it is
    # asked again: each failed call costs its timeout, which must not fall on every request.
    authority_retry_s: float = 1.0


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None or isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return value  # aiohttp's headers are case-insensitive already
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def extract_secret(headers: Mapping[str, str]) -> str | None:
    """The presented credential: `Authorization: Bearer ...` first, else `X-Api-Key`."""
    auth = _header(headers, "Authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    api_key = _header(headers, "X-Api-Key")
    return api_key.strip() if api_key is not None else None


class _Miss(enum.Enum):
    MISS = enum.auto()


_MISS = _Miss.MISS


def _offer_done(project_id: str, fut: asyncio.Future[bool]) -> None:
    if fut.cancelled():
        return
    err = fut.exception()
    if err is not None:
        # The cache is filled the usual way when admission finds the project cold.
        log.warning("filling %s from its key's snapshot failed: %r", project_id, err)


class SnapshotSink(Protocol):
    """Takes the project snapshot that comes with a key resolution (cache.CacheFiller)."""

    def recording(self) -> AbstractContextManager[Any]: ...

    def offer_nowait(
        self, snapshot: pb.ProjectSnapshot, recording: Any
    ) -> asyncio.Future[bool] | None: ...


class IdentityResolver:
    """Implements ports.CredentialResolver and cache.KeyCache.

    With `snapshots`, a key the authority resolves comes back with its project's snapshot,
    which fills the cache at once: a new project's first request then makes one authority
    call instead of two (the lease or engine finds the project cached).
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        authority: AuthorityClient,
        config: IdentityConfig | None = None,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        snapshots: SnapshotSink | None = None,
    ) -> None:
        self.redis = redis
        self.authority = authority
        self._snapshots = snapshots
        self.config = config or IdentityConfig()
        self._networks: tuple[IpNetwork, ...] = tuple(
            ipaddress.ip_network(net, strict=False) for net in self.config.trusted_proxies
        )
        self._clock = clock
        # key hash -> (project id or None for unknown/revoked, monotonic time it was learnt)
        self._cache: collections.OrderedDict[str, tuple[str | None, float]] = (
            collections.OrderedDict()
        )
        self._inflight: dict[str, asyncio.Future[str | None]] = {}
        self._watch_connected = False
        self._authority_down_until = float("-inf")  # see IdentityConfig.authority_retry_s
        # Bumped by every eviction: a lookup that overlapped one may carry a revoked answer,
        # so it is used for its own request but neither cached here nor written to Redis.
        self._evictions = 0
        self._metrics = authority_metrics(registry)
        resolutions = self._metrics.key_resolutions
        self._local_valid = resolutions.labels(source="local", result="valid")
        # identify_cached's hits, as a plain count: fold_metrics() adds them to the counter
        # (the gateway folds with its own per-request counts, see gateway_plugin.metrics).
        self.cached_hits = 0
        self._local_invalid = resolutions.labels(source="local", result="invalid")
        self._format_invalid = resolutions.labels(source="format", result="invalid")
        # secret -> its sha256 hex: a pure function, so caching it changes no answer.
        self._digests: dict[str, str] = {}
        # Authorization header value -> the Identity it resolved to; valid only while the key
        # hash's entry in _cache is fresh (see identify_cached).
        self._by_header: dict[str, Identity] = {}

    # ---------------------------------------------------------------- KeyCache (Watch)

    def evict(self, key_hash: str) -> None:
        self._evictions += 1
        self._cache.pop(key_hash, None)

    def clear(self) -> None:
        self._evictions += 1
        self._cache.clear()
        self._by_header.clear()

    def set_watch_connected(self, connected: bool) -> None:
        self._watch_connected = connected

    # ---------------------------------------------------------------- identification

    def is_trusted_proxy(self, peer_ip: str | None) -> bool:
        if not peer_ip or not self._networks:
            return False
        try:
            address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in net for net in self._networks)

    def identify_cached(self, headers: Mapping[str, str]) -> Identity | None:
        """identify()'s answer when a fresh local cache entry gives it without I/O, else None.

        Only for `Authorization: Bearer` keys and no trusted proxies configured (the header of
        a trusted proxy depends on the peer). Same freshness rule as the local cache.
        """
        if self._networks:
            return None
        auth = headers.get(_AUTHORIZATION)
        if auth is None:
            return None
        ident = self._by_header.get(auth)
        if ident is None:
            return None
        cached = self._cache.get(ident.key_hash or "")
        if cached is None or cached[0] != ident.project_id:
            return None
        ttl = (
            self.config.positive_ttl_s if self._watch_connected else self.config.disconnected_ttl_s
        )
        if self._clock() - cached[1] >= ttl:
            return None
        self.cached_hits += 1
        return ident

    def fold_metrics(self) -> None:
        """Adds identify_cached's hits to creditgate_key_resolutions_total{source="local"}."""
        hits = self.cached_hits
        if hits:
            self.cached_hits = 0
            self._local_valid.inc(hits)

    async def identify(self, headers: Mapping[str, str], peer_ip: str | None) -> Identity | Reason:
        """The caller's project, or the denial reason (MISSING/INVALID_CREDENTIAL, ...)."""
        # SECURITY (invariant 8): a client-supplied project id is honoured only from a
        # configured proxy network; from anyone else the header is ignored.
        claimed = _header(headers, PROJECT_HEADER) if self._networks else None
        if claimed is not None and self.is_trusted_proxy(peer_ip):
            claimed = claimed.strip()
            if not PROJECT_RE.match(claimed):
                return Reason.INVALID_REQUEST
            return Identity(project_id=claimed, key_hash=None, via_trusted_proxy=True)
        secret = extract_secret(headers)
        if secret is None or secret == "":
            return Reason.MISSING_CREDENTIAL
        digest = self._digests.get(secret)
        if digest is None:
            if not SECRET_RE.match(secret):
                self._format_invalid.inc()
                return Reason.INVALID_CREDENTIAL
            if len(self._digests) >= max(self.config.cache_size, 1):
                self._digests.clear()
            digest = self._digests[secret] = key_hash(secret)
        cached = self._local(digest)
        if cached is not _MISS:
            if cached is None:
                return Reason.INVALID_CREDENTIAL
            return self._note_header(headers, Identity(project_id=cached, key_hash=digest))
        try:
            project_id = await self.resolve_hash(digest)
        except AuthorityUnavailable:
            return Reason.UNAVAILABLE
        except AuthorityRequestFailed as err:
            # e.g. a gateway token the authority refuses: an operator problem, not the caller's.
            log.error("API key resolution failed: %s", err)
            return Reason.UNAVAILABLE
        if project_id is None:
            return Reason.INVALID_CREDENTIAL
        return self._note_header(headers, Identity(project_id=project_id, key_hash=digest))

    def _note_header(self, headers: Mapping[str, str], ident: Identity) -> Identity:
        auth = headers.get("Authorization")
        if auth is None or self._networks:
            return ident
        # SECURITY: only a header whose own Bearer token is this key may stand for it (the
        # secret may have come from X-Api-Key next to some other Authorization header).
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and key_hash(token.strip()) == ident.key_hash:
            if len(self._by_header) >= max(self.config.cache_size, 1):
                self._by_header.clear()
            self._by_header[auth] = ident
        return ident

    async def resolve(self, secret: str) -> str | None:
        """ports.CredentialResolver: the project of a secret, None when unknown or revoked."""
        if not SECRET_RE.match(secret):
            return None
        return await self.resolve_hash(key_hash(secret))

    def _local(self, digest: str) -> str | _Miss | None:
        """The local cache's fresh answer for a key hash, or _MISS."""
        cached = self._cache.get(digest)
        if cached is None:
            return _MISS
        project_id, learnt = cached
        if project_id is None:
            ttl = self.config.negative_ttl_s
        elif self._watch_connected:
            ttl = self.config.positive_ttl_s
        else:
            ttl = self.config.disconnected_ttl_s
        if self._clock() - learnt < ttl:
            self._cache.move_to_end(digest)
            (self._local_valid if project_id else self._local_invalid).inc()
            return project_id
        del self._cache[digest]
        return _MISS

    async def resolve_hash(self, digest: str) -> str | None:
        cached = self._local(digest)
        if cached is not _MISS:
            return cached
        fut = self._inflight.get(digest)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup(digest))
            self._inflight[digest] = fut
            fut.add_done_callback(lambda f: self._lookup_done(digest, f))
        return await asyncio.shield(fut)

    def _lookup_done(self, digest: str, fut: asyncio.Future[str | None]) -> None:
        if self._inflight.get(digest) is fut:
            del self._inflight[digest]
        if not fut.cancelled():
            fut.exception()  # retrieved: every waiter may have gone

    async def _lookup(self, digest: str) -> str | None:
        learnt = self._clock()
        evictions = self._evictions
        if self._watch_connected:
            found = await self._from_redis(digest)
            if found is not None:
                if evictions == self._evictions:
                    self._remember(digest, found, learnt)
                return found
            return await self._from_authority(digest, learnt, evictions)
        # Without our Watch stream a Redis mapping may outlive its revocation: ask the
        # authority first, and fall back to Redis only when the authority cannot answer. Once
        # it could not, Redis answers alone for authority_retry_s (1 s), so that its timeout
        # is paid once a second, not by every request. Such an answer is not kept locally: the
        # first lookup after the second asks the authority again, so a revocation is still
        # effective within 1 s (invariant 6), also when the authority came back meanwhile.
        if learnt >= self._authority_down_until:
            try:
                return await self._from_authority(digest, learnt, evictions)
            except AuthorityUnavailable:
                self._authority_down_until = self._clock() + self.config.authority_retry_s
        found = await self._from_redis(digest)
        if found is None:
            raise AuthorityUnavailable("the authority is unreachable and Redis has no mapping")
        return found

    async def _from_redis(self, digest: str) -> str | None:
        try:
            stored = await self.redis.get(keys.api_key(digest))
        except RedisError:
            return None  # Redis is a cache here; the authority still answers
        if stored is None:
            return None
        self._metrics.key_resolutions.labels(source="redis", result="valid").inc()
        return stored.decode() if isinstance(stored, bytes) else str(stored)

    async def _from_authority(self, digest: str, learnt: float, evictions: int) -> str | None:
        sink = self._snapshots
        snapshot: pb.ProjectSnapshot | None = None
        # The recording runs from before the call until offer() has put its buffer in place
        # (its first step, before any await): a Watch event delivered at any await between
        # the two would otherwise be neither recorded nor buffered, and lost.
        with contextlib.ExitStack() as stack:
            recording = stack.enter_context(sink.recording()) if sink is not None else None
            try:
                if sink is None:
                    key = await self.authority.resolve_api_key(digest)
                else:
                    key, snapshot = await self.authority.resolve_api_key_with_snapshot(digest)
            except AuthorityUnavailable:
                self._metrics.key_resolutions.labels(source="authority", result="unavailable").inc()
                raise
            except AuthorityRequestFailed:
                self._metrics.key_resolutions.labels(source="authority", result="error").inc()
                raise
            if (
                sink is not None
                and snapshot is not None
                and key is not None
                and key.revoked_at_ms == 0
                and key.project_id
                and snapshot.wallet.project_id == key.project_id
            ):
                # Not waited for: the write goes on while the key mapping's SET below makes
                # its round trip, and the project's first lease sync (or admit) finds the
                # project cached, or, cold, waits for this write as for any fill in flight.
                offered = sink.offer_nowait(snapshot, recording)
                if offered is not None:
                    offered.add_done_callback(functools.partial(_offer_done, key.project_id))
        if key is None or key.revoked_at_ms != 0 or not key.project_id:
            self._remember(digest, None, learnt)
            # A revoked mapping must not linger in Redis for the other gateways either.
            with contextlib.suppress(RedisError):
                await self.redis.delete(keys.api_key(digest))
            self._metrics.key_resolutions.labels(source="authority", result="invalid").inc()
            return None
        if evictions == self._evictions:
            # On a Redis error the answer stands; only the shared cache misses a write.
            with contextlib.suppress(RedisError):
                await self.redis.set(
                    keys.api_key(digest), key.project_id, ex=self.config.redis_ttl_s
                )
            self._remember(digest, key.project_id, learnt)
        self._metrics.key_resolutions.labels(source="authority", result="valid").inc()
        return key.project_id

    def _remember(self, digest: str, project_id: str | None, learnt: float) -> None:
        if self.config.cache_size <= 0:
            return
        self._cache[digest] = (project_id, learnt)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def trusted_networks(self) -> Iterable[IpNetwork]:
        return self._networks
