"""Who is calling: the admin, or one project's API key. Pure; no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from creditservice.errors import PermissionDenied


@dataclass(frozen=True, slots=True)
class Principal:
    admin: bool
    project_id: str | None = None  # set for a project API key
    key_id: str | None = None

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied("this operation needs the admin credential")

    def require_project(self, project_id: str) -> None:
        """SECURITY: a project key reads only its own project (invariant 8)."""
        if self.admin:
            return
        if self.project_id != project_id:
            raise PermissionDenied("this credential may not access that project")


ADMIN = Principal(admin=True)
