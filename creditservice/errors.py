"""Errors of the authority, one per gRPC status it answers with.

    ServiceError            (code: grpc.StatusCode, message)
    ├── InvalidArgument     INVALID_ARGUMENT     / HTTP 400
    ├── NotFound            NOT_FOUND            / HTTP 404
    ├── AlreadyExists       ALREADY_EXISTS       / HTTP 409
    ├── FailedPrecondition  FAILED_PRECONDITION  / HTTP 409
    ├── Unauthenticated     UNAUTHENTICATED      / HTTP 401
    ├── PermissionDenied    PERMISSION_DENIED    / HTTP 403
    └── Unavailable         UNAVAILABLE          / HTTP 503

Storage backends convert driver errors into these at their boundary, keeping the original as
__cause__. The gRPC servicer and the REST mapping turn them into a status / problem+json body.
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class ServiceError(Exception):
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    slug = "invalid-argument"


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    slug = "not-found"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    slug = "already-exists"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    slug = "failed-precondition"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    slug = "unauthenticated"


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    slug = "permission-denied"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    slug = "unavailable"


BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
    )
}


def from_code(code: grpc.StatusCode, message: str) -> ServiceError:
    return BY_CODE.get(code, ServiceError)(message)
