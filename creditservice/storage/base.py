"""The authority's storage interface (`Store`), the URL-based opener and helpers shared by backends.

Requests reach the store validated by the core (ids well-formed, amounts in range); the store
enforces what needs data (existence, state, balances) and raises creditservice.errors.*.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from creditservice.v1 import credit_pb2 as pb


class Store(Protocol):
    """Authoritative state: wallets, append-only ledger, quotas, reservations, keys, change log.

    Every unary mutation is idempotent by (method, request.request_id): the outcome (response or
    error) is recorded with the change; a repeat with the same parameters returns it again, the
    same request id with other parameters raises FailedPrecondition. Every mutation appends
    WatchEvents to the change log in its transaction.
    """

    backend: str  # "sqlite" | "postgresql"

    async def close(self) -> None: ...

    # Unary mutations.
    async def create_wallet(
        self, req: pb.CreateWalletRequest, now_ms: int
    ) -> pb.CreateWalletResponse: ...
    async def top_up(self, req: pb.TopUpRequest, now_ms: int) -> pb.TopUpResponse: ...
    async def adjust(self, req: pb.AdjustRequest, now_ms: int) -> pb.AdjustResponse: ...
    async def set_wallet_policy(
        self, req: pb.SetWalletPolicyRequest, now_ms: int
    ) -> pb.SetWalletPolicyResponse: ...
    async def set_quota(self, req: pb.SetQuotaRequest, now_ms: int) -> pb.SetQuotaResponse: ...
    async def delete_quota(
        self, req: pb.DeleteQuotaRequest, now_ms: int
    ) -> pb.DeleteQuotaResponse: ...
    async def reserve(self, req: pb.ReserveRequest, now_ms: int) -> pb.ReserveResponse: ...
    async def commit(self, req: pb.CommitRequest, now_ms: int) -> pb.CommitResponse: ...
    async def release(self, req: pb.ReleaseRequest, now_ms: int) -> pb.ReleaseResponse: ...
    async def record_usage(
        self, req: pb.RecordUsageRequest, now_ms: int
    ) -> pb.RecordUsageResponse: ...
    async def issue_api_key(
        self, req: pb.IssueApiKeyRequest, key_id: str, key_hash: str, prefix: str, now_ms: int
    ) -> pb.IssueApiKeyResponse: ...
    async def revoke_api_key(
        self, req: pb.RevokeApiKeyRequest, now_ms: int
    ) -> pb.RevokeApiKeyResponse: ...
    async def settle(
        self, events: Sequence[pb.SettlementEvent], now_ms: int
    ) -> pb.SettleResponse: ...

    # Reads.
    async def get_wallet(self, project_id: str) -> pb.Wallet: ...
    async def list_wallets(
        self, organization_id: str, page_size: int, page_token: str
    ) -> tuple[list[pb.Wallet], str]: ...
    async def list_transactions(
        self, project_id: str, page_size: int, page_token: str
    ) -> tuple[list[pb.LedgerEntry], str]: ...
    async def explain_usage(
        self, project_id: str, since_ms: int, until_ms: int
    ) -> pb.ExplainUsageResponse: ...
    async def get_quota(self, project_id: str, name: str) -> pb.Quota: ...
    async def list_quotas(self, project_id: str) -> list[pb.Quota]: ...
    async def get_reservation(self, reservation_id: str) -> pb.Reservation: ...
    async def get_snapshot(self, project_id: str) -> pb.ProjectSnapshot: ...
    async def resolve_api_key(self, key_hash: str) -> pb.ApiKey: ...
    async def resolve_api_key_with_snapshot(
        self, key_hash: str
    ) -> tuple[pb.ApiKey, pb.ProjectSnapshot | None]: ...

    # Change log.
    async def changes_after(self, cursor: int, limit: int) -> list[pb.WatchEvent]: ...
    async def last_cursor(self) -> int: ...
    async def oldest_cursor(self) -> int: ...
    async def prune_changes(self, keep_after_ms: int) -> int: ...
    def add_change_listener(self, callback: Callable[[int], None]) -> None:
        """Call `callback(last_cursor)` after each commit that logged changes (in the loop)."""
        ...

    # Jobs.
    async def expire_grace(self, now_ms: int) -> int: ...
    async def expire_reservations(self, now_ms: int) -> int: ...

    # Export / import / verify.
    def export(self) -> AsyncIterator[pb.ExportRecord]: ...
    async def import_records(
        self, records: AsyncIterator[pb.ExportRecord]
    ) -> pb.ImportResponse: ...
    async def verify(self) -> list[str]: ...


async def open_store(url: str) -> Store:
    """Open (and create the schema of) the store named by `url`.

    sqlite:////abs/path.db, sqlite:///relative.db, sqlite://:memory:, or postgresql://... (also
    postgres://); a PostgreSQL DSN may carry `schema=NAME` in its query to keep the tables in that
    schema (created if missing).
    """
    if url.startswith("sqlite:"):
        from creditservice.storage.sqlite import open_sqlite

        return await open_sqlite(url)
    if url.startswith(("postgresql:", "postgres:")):
        from creditservice.storage.postgres import open_postgres

        return await open_postgres(url)
    from creditservice.errors import InvalidArgument

    raise InvalidArgument(f"unsupported database url {url.split(':', 1)[0]!r}")
