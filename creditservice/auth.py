"""Who is calling the authority: the admin token or a project API key, from a bearer token.

Missing or invalid credentials (unknown, revoked, malformed) are UNAUTHENTICATED (HTTP 401);
a valid credential without the right to an operation is PERMISSION_DENIED (403), raised by the core.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from creditservice.errors import NotFound, Unauthenticated
from creditservice.principal import ADMIN, Principal
from creditservice.v1 import credit_pb2 as pb

API_KEY_RE = re.compile(r"cg_[A-Za-z0-9_-]{43}")
_CACHE_LIMIT = 100_000


def hash_secret(secret: str) -> str:
    """The only form in which the authority stores an API key: lowercase hex SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal
    key_hash: str
    expires_at: float


class Authenticator:
    """Turns tokens into principals; resolved keys are cached for `ttl_s` (monotonic time).

    Revocation through this process drops the key at once (`forget`); a revocation made by
    another authority process sharing the database takes effect within `ttl_s`.
    """

    def __init__(
        self,
        admin_token: str,
        resolve: Callable[[str], Awaitable[pb.ApiKey]],
        ttl_s: float = 1.0,
    ) -> None:
        if not admin_token:
            raise ValueError("the admin token must not be empty")
        self._admin = admin_token.encode()
        self._resolve = resolve
        self._ttl = ttl_s
        self._cache: dict[str, _Cached] = {}
        self._by_key_id: dict[str, str] = {}

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthenticated("missing credential: send 'authorization: Bearer <token>'")
        # SECURITY: constant-time comparison, the admin token is the strongest credential.
        if hmac.compare_digest(token.encode(), self._admin):
            return ADMIN
        if API_KEY_RE.fullmatch(token) is None:
            raise Unauthenticated("credential not recognized")
        digest = hash_secret(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit.expires_at > now:
            return hit.principal
        try:
            key = await self._resolve(digest)
        except NotFound:
            raise Unauthenticated("unknown API key") from None
        if key.revoked_at_ms:
            self.forget(key.key_id)
            raise Unauthenticated("API key revoked")
        principal = Principal(admin=False, project_id=key.project_id, key_id=key.key_id)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
            self._by_key_id.clear()
        self._cache[digest] = _Cached(principal, digest, now + self._ttl)
        self._by_key_id[key.key_id] = digest
        return principal

    def forget(self, key_id: str) -> None:
        """Drop a key from the cache (called after it was revoked)."""
        digest = self._by_key_id.pop(key_id, None)
        if digest is not None:
            self._cache.pop(digest, None)
