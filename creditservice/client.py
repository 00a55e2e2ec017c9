"""A small gRPC client of the authority for one-shot tools (the CLI): one channel, bearer
metadata, a deadline on every call, and gRPC failures converted into the errors.py tree.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from creditservice import errors
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class AuthorityUnreachable(Exception):
    """No answer from the authority (connection refused, deadline, or UNAVAILABLE)."""


class AuthorityClient:
    """`async with AuthorityClient(target, token) as c: await c.call("GetWallet", request)`."""

    def __init__(self, target: str, token: str | None, timeout_s: float = 15.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def __aenter__(self) -> AuthorityClient:
        # grpc.aio channels must be made inside the running loop.
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = pb_grpc.CreditServiceStub(self._channel)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def call(self, rpc: str, request: Message) -> Any:
        """Run a unary RPC by name and return its response message."""
        method = getattr(self._stub, rpc)
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._convert(exc) from exc

    async def stream(self, rpc: str, request: Message) -> AsyncIterator[Any]:
        """Items of a server-streaming RPC; no deadline, an export of a big ledger takes a while."""
        call = getattr(self._stub, rpc)(request, metadata=self._metadata)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise self._convert(exc) from exc
        finally:
            call.cancel()

    async def import_records(self, records: AsyncIterable[pb.ExportRecord]) -> pb.ImportResponse:
        try:
            response: pb.ImportResponse = await self._stub.Import(
                records.__aiter__(), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise self._convert(exc) from exc
        return response

    def _convert(self, exc: grpc.aio.AioRpcError) -> Exception:
        code = exc.code()
        details = exc.details() or code.name
        if code in _UNREACHABLE:
            return AuthorityUnreachable(f"authority unreachable at {self.target}: {details}")
        converted = errors.from_code(code, details)
        if type(converted) is errors.ServiceError:
            # Keep the real status name (INTERNAL, UNKNOWN, ...) for the one-line message.
            converted.message = f"{code.name}: {details}"
        return converted
