"""The gRPC face of the authority: a thin grpc.aio servicer over CreditCore.

It only moves bytes: the bearer token from metadata, ServiceError -> status code + message, and
anything unexpected -> INTERNAL with the traceback logged. Every rule lives in creditservice.core.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from creditservice.auth import bearer_token
from creditservice.core import CreditCore
from creditservice.errors import InvalidArgument, ServiceError
from creditservice.principal import Principal
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = Any  # grpc.aio.ServicerContext; grpc ships no type information

# How long a refused client-streaming call may keep sending (see _drain): an authenticated
# caller, and one without a valid credential (kept short: anyone can open such a call).
DRAIN_S = 10.0
UNAUTHENTICATED_DRAIN_S = 1.0


def _token(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return bearer_token(value if isinstance(value, str) else value.decode())
    return None


async def _abort(context: Context, exc: BaseException, method: str) -> NoReturn:
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message)
    log.error("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


class CreditServicer(pb_grpc.CreditServiceServicer):
    def __init__(self, core: CreditCore) -> None:
        self._core = core

    async def _unary(
        self,
        method: str,
        call: Callable[[Req, Principal], Awaitable[Resp]],
        request: Req,
        context: Context,
    ) -> Resp:
        try:
            principal = await self._core.authenticate(_token(context))
            return await call(request, principal)
        except Exception as exc:  # every failure becomes a status
            await _abort(context, exc, method)

    async def _stream(
        self,
        method: str,
        call: Callable[[Req, Principal], AsyncIterator[Resp]],
        request: Req,
        context: Context,
    ) -> AsyncIterator[Resp]:
        try:
            principal = await self._core.authenticate(_token(context))
            async for item in call(request, principal):
                yield item
        except Exception as exc:  # every failure becomes a status
            await _abort(context, exc, method)

    async def CreateWallet(
        self, request: pb.CreateWalletRequest, context: Context
    ) -> pb.CreateWalletResponse:
        return await self._unary("CreateWallet", self._core.CreateWallet, request, context)

    async def GetWallet(
        self, request: pb.GetWalletRequest, context: Context
    ) -> pb.GetWalletResponse:
        return await self._unary("GetWallet", self._core.GetWallet, request, context)

    async def ListWallets(
        self, request: pb.ListWalletsRequest, context: Context
    ) -> pb.ListWalletsResponse:
        return await self._unary("ListWallets", self._core.ListWallets, request, context)

    async def TopUp(self, request: pb.TopUpRequest, context: Context) -> pb.TopUpResponse:
        return await self._unary("TopUp", self._core.TopUp, request, context)

    async def Adjust(self, request: pb.AdjustRequest, context: Context) -> pb.AdjustResponse:
        return await self._unary("Adjust", self._core.Adjust, request, context)

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Context
    ) -> pb.ListTransactionsResponse:
        return await self._unary("ListTransactions", self._core.ListTransactions, request, context)

    async def SetWalletPolicy(
        self, request: pb.SetWalletPolicyRequest, context: Context
    ) -> pb.SetWalletPolicyResponse:
        return await self._unary("SetWalletPolicy", self._core.SetWalletPolicy, request, context)

    async def ExplainUsage(
        self, request: pb.ExplainUsageRequest, context: Context
    ) -> pb.ExplainUsageResponse:
        return await self._unary("ExplainUsage", self._core.ExplainUsage, request, context)

    async def SetQuota(self, request: pb.SetQuotaRequest, context: Context) -> pb.SetQuotaResponse:
        return await self._unary("SetQuota", self._core.SetQuota, request, context)

    async def GetQuota(self, request: pb.GetQuotaRequest, context: Context) -> pb.GetQuotaResponse:
        return await self._unary("GetQuota", self._core.GetQuota, request, context)

    async def ListQuotas(
        self, request: pb.ListQuotasRequest, context: Context
    ) -> pb.ListQuotasResponse:
        return await self._unary("ListQuotas", self._core.ListQuotas, request, context)

    async def DeleteQuota(
        self, request: pb.DeleteQuotaRequest, context: Context
    ) -> pb.DeleteQuotaResponse:
        return await self._unary("DeleteQuota", self._core.DeleteQuota, request, context)

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        return await self._unary("Reserve", self._core.Reserve, request, context)

    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        return await self._unary("Commit", self._core.Commit, request, context)

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        return await self._unary("Release", self._core.Release, request, context)

    async def GetReservation(
        self, request: pb.GetReservationRequest, context: Context
    ) -> pb.GetReservationResponse:
        return await self._unary("GetReservation", self._core.GetReservation, request, context)

    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        return await self._unary("Settle", self._core.Settle, request, context)

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: Context
    ) -> pb.RecordUsageResponse:
        return await self._unary("RecordUsage", self._core.RecordUsage, request, context)

    async def CheckAdmission(
        self, request: pb.CheckAdmissionRequest, context: Context
    ) -> pb.CheckAdmissionResponse:
        return await self._unary("CheckAdmission", self._core.CheckAdmission, request, context)

    async def GetAdmissionSnapshot(
        self, request: pb.GetAdmissionSnapshotRequest, context: Context
    ) -> pb.GetAdmissionSnapshotResponse:
        return await self._unary(
            "GetAdmissionSnapshot", self._core.GetAdmissionSnapshot, request, context
        )

    # grpc.aio recognizes streaming handlers by being async generator functions themselves.
    async def Watch(
        self, request: pb.WatchRequest, context: Context
    ) -> AsyncIterator[pb.WatchEvent]:
        async for event in self._stream("Watch", self._core.Watch, request, context):
            yield event

    async def IssueApiKey(
        self, request: pb.IssueApiKeyRequest, context: Context
    ) -> pb.IssueApiKeyResponse:
        return await self._unary("IssueApiKey", self._core.IssueApiKey, request, context)

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        return await self._unary("RevokeApiKey", self._core.RevokeApiKey, request, context)

    async def ResolveApiKey(
        self, request: pb.ResolveApiKeyRequest, context: Context
    ) -> pb.ResolveApiKeyResponse:
        return await self._unary("ResolveApiKey", self._core.ResolveApiKey, request, context)

    async def Export(
        self, request: pb.ExportRequest, context: Context
    ) -> AsyncIterator[pb.ExportRecord]:
        async for record in self._stream("Export", self._core.Export, request, context):
            yield record

    async def Import(
        self, request_iterator: AsyncIterator[pb.ExportRecord], context: Context
    ) -> pb.ImportResponse:
        principal: Principal | None = None
        try:
            principal = await self._core.authenticate(_token(context))
            return await self._core.Import(request_iterator, principal)
        except Exception as exc:  # every failure becomes a status
            within_s = UNAUTHENTICATED_DRAIN_S if principal is None else DRAIN_S
            await _drain(request_iterator, within_s)
            if isinstance(exc, DecodeError):
                exc = InvalidArgument(f"a record of the stream does not parse: {exc}")
            await _abort(context, exc, "Import")


async def _drain(requests: AsyncIterator[Any], within_s: float) -> None:
    """Read the rest of a client stream that is being refused, for up to `within_s` seconds.

    A grpc.aio client whose write is in flight when the server ends the call reports INTERNAL
    ("execute_batch") instead of the server's status (grpc/grpc#36066). Reading the stream to
    its end first lets the client half-close, so it sees the real code and message. The bound
    keeps a client that never half-closes from holding the handler; past it, or when the rest
    cannot be read (a message that does not parse, the call gone), the status is sent anyway.
    """
    try:
        async with asyncio.timeout(within_s):
            async for _ in requests:
                pass
    except Exception:  # the refusal's own status is what the client must get
        pass


def add_to_server(core: CreditCore, server: grpc.aio.Server) -> None:
    pb_grpc.add_CreditServiceServicer_to_server(CreditServicer(core), server)
