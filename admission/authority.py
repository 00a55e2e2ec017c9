"""The gateway's client of the authority: one grpc.aio channel per process, deadlines, retries.

gRPC errors stop here: UNAVAILABLE / DEADLINE_EXCEEDED become AuthorityUnavailable, any other
status AuthorityRequestFailed; the grpc error is kept as __cause__.
"""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from admission.errors import AdmissionError, AuthorityUnavailable
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc

SERVICE = "creditservice.v1.CreditService"

# Only idempotent calls are retried by the channel: reads, and Settle (deduplicated by event id).
_RETRIED_METHODS = ("Settle", "GetAdmissionSnapshot", "ResolveApiKey", "GetWallet")


class AuthorityRequestFailed(AdmissionError):
    """The authority answered with an error that retrying cannot fix (e.g. INVALID_ARGUMENT)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code  # grpc.StatusCode name, e.g. "INVALID_ARGUMENT"


@dataclass(frozen=True, slots=True)
class AuthorityClientConfig:
    """How to reach the authority; defaults suit a gateway next to it on a LAN."""

    target: str = "127.0.0.1:50051"
    token: str = ""
    timeout_s: float = 2.0  # unary reads (cache fill, key resolution)
    settle_timeout_s: float = 15.0  # a Settle batch of thousands of events, retries included
    # A Watch call is bounded too (every call has a deadline); the subscriber reconnects from
    # its cursor when it ends, so this only caps how long one HTTP/2 stream lives.
    watch_max_s: float = 600.0
    # Must not be below the server's grpc.http2.min_recv_ping_interval_without_data_ms (the
    # authority allows 5 s) or it answers GOAWAY too_many_pings; pings only during calls.
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 20_000
    reconnect_backoff_ms: int = 100
    max_reconnect_backoff_ms: int = 1000
    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0


def _service_config(cfg: AuthorityClientConfig) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE, "method": m} for m in _RETRIED_METHODS],
                    "retryPolicy": {
                        "maxAttempts": cfg.max_attempts,
                        "initialBackoff": f"{cfg.initial_backoff_s}s",
                        "maxBackoff": f"{cfg.max_backoff_s}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def _convert(err: grpc.aio.AioRpcError, what: str) -> AdmissionError:
    code = err.code()
    message = f"{what}: {code.name} {err.details() or ''}".rstrip()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return AuthorityUnavailable(message)
    return AuthorityRequestFailed(message, code.name)


class AuthorityClient:
    """Async client of creditservice.v1.CreditService for the admission side.

    Create it inside the running event loop (``async with AuthorityClient(cfg)`` or ``start()``
    then ``aclose()``): grpc.aio channels are bound to the loop that made them.
    """

    def __init__(self, config: AuthorityClientConfig) -> None:
        self.config = config
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._metadata = (("authorization", f"Bearer {config.token}"),)
        # Calls per method, for operators and for tests proving single flight.
        self.calls: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        if self._channel is not None:
            return
        cfg = self.config
        self._channel = grpc.aio.insecure_channel(
            cfg.target,
            options=[
                ("grpc.enable_retries", 1),
                ("grpc.service_config", _service_config(cfg)),
                ("grpc.keepalive_time_ms", cfg.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", cfg.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", 0),
                ("grpc.http2.max_pings_without_data", 0),
                # Reconnect promptly after an authority restart (default backoff grows to
                # 120 s): the Watch catch-up and invariant 6 depend on it.
                ("grpc.initial_reconnect_backoff_ms", cfg.reconnect_backoff_ms),
                ("grpc.min_reconnect_backoff_ms", cfg.reconnect_backoff_ms),
                ("grpc.max_reconnect_backoff_ms", cfg.max_reconnect_backoff_ms),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        self._stub = pb_grpc.CreditServiceStub(self._channel)

    async def aclose(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> AuthorityClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def stub(self) -> Any:
        if self._stub is None:
            raise RuntimeError("AuthorityClient used before start() or after aclose()")
        return self._stub

    async def settle(self, events: Sequence[pb.SettlementEvent]) -> pb.SettleResponse:
        self.calls["Settle"] += 1
        try:
            reply: pb.SettleResponse = await self.stub.Settle(
                pb.SettleRequest(events=events),
                timeout=self.config.settle_timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            raise _convert(err, "Settle") from err
        return reply

    async def get_snapshot(self, project_id: str) -> pb.ProjectSnapshot | None:
        """Everything admission caches about a project; None when the authority does not know it."""
        self.calls["GetAdmissionSnapshot"] += 1
        try:
            reply: pb.GetAdmissionSnapshotResponse = await self.stub.GetAdmissionSnapshot(
                pb.GetAdmissionSnapshotRequest(project_id=project_id),
                timeout=self.config.timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _convert(err, "GetAdmissionSnapshot") from err
        return reply.snapshot

    async def resolve_api_key(self, key_hash: str) -> pb.ApiKey | None:
        """The key with this SHA-256 hash (revoked keys included); None when unknown."""
        key, _ = await self.resolve_api_key_with_snapshot(key_hash, include_snapshot=False)
        return key

    async def resolve_api_key_with_snapshot(
        self, key_hash: str, *, include_snapshot: bool = True
    ) -> tuple[pb.ApiKey | None, pb.ProjectSnapshot | None]:
        """resolve_api_key, and the snapshot of the key's project in the same call (None: the
        key is unknown or revoked, its project has no wallet, or the authority predates it)."""
        self.calls["ResolveApiKey"] += 1
        try:
            reply: pb.ResolveApiKeyResponse = await self.stub.ResolveApiKey(
                pb.ResolveApiKeyRequest(key_hash=key_hash, include_snapshot=include_snapshot),
                timeout=self.config.timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None, None
            raise _convert(err, "ResolveApiKey") from err
        return reply.key, (reply.snapshot if reply.HasField("snapshot") else None)

    async def watch(
        self, after_cursor: int, project_ids: Sequence[str] = ()
    ) -> AsyncIterator[pb.WatchEvent]:
        """Changes after `after_cursor` (0 = from now on) until the stream ends or fails."""
        self.calls["Watch"] += 1
        call = self.stub.Watch(
            pb.WatchRequest(after_cursor=after_cursor, project_ids=project_ids),
            timeout=self.config.watch_max_s,
            metadata=self._metadata,
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as err:
            raise _convert(err, "Watch") from err
        finally:
            call.cancel()
