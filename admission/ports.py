"""The narrow interfaces the admission engine needs from its surroundings."""

from __future__ import annotations

from typing import Protocol


class SnapshotFiller(Protocol):
    """Fills a cold project's snapshot (wallet + quota overrides) into Redis from the authority.

    Returns False when the authority does not know the project. Implementations are single
    flight per project per process: concurrent calls for one project share one authority call.
    Raises admission.errors.AuthorityUnavailable when the authority cannot be reached.
    """

    async def fill(self, project_id: str) -> bool: ...


class CredentialResolver(Protocol):
    """Maps an API key secret to its project id, or None when unknown or revoked."""

    async def resolve(self, secret: str) -> str | None: ...
