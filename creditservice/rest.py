"""REST/JSON mapping of CreditService over aiohttp: HTTP <-> request messages, problem+json errors.

Every rule (validation, auth, tenancy) lives in CreditCore; this adapter only maps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from google.protobuf.message import Message

from creditservice import errors, protojson
from creditservice.openapi import NDJSON, PROBLEM_JSON, PROBLEM_TYPE_PREFIX, ROUTES, Route, document
from creditservice.principal import Principal
from creditservice.v1 import credit_pb2 as pb

if TYPE_CHECKING:
    from creditservice.core import CreditCore

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A Settle batch of 10,000 events is a few MB of JSON.
MAX_BODY_BYTES = 32 * 1024 * 1024
# How long a stream may stay silent before its 200 headers go out; errors raised at once by the
# core (auth, validation) still become a proper problem response.
FIRST_ITEM_WAIT_S = 0.2

TITLES: dict[str, str] = {
    "invalid-argument": "Invalid argument",
    "not-found": "Not found",
    "already-exists": "Already exists",
    "failed-precondition": "Failed precondition",
    "unauthenticated": "Unauthenticated",
    "permission-denied": "Permission denied",
    "unavailable": "Unavailable",
    "internal": "Internal error",
    "method-not-allowed": "Method not allowed",
    "payload-too-large": "Payload too large",
    "unsupported-media-type": "Unsupported media type",
}
_HTTP_SLUGS = {
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
    400: "invalid-argument",
}


def build_app(core: CreditCore) -> web.Application:
    app = web.Application(middlewares=[problem_middleware], client_max_size=MAX_BODY_BYTES)
    doc = document()
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _handler(core, route, doc))
    return app


def _handler(core: CreditCore, route: Route, doc: dict[str, Any]) -> Handler:
    if route.kind == "document":

        async def openapi(request: web.Request) -> web.StreamResponse:
            return web.json_response(doc)

        return openapi
    if route.kind == "health":

        async def health(request: web.Request) -> web.StreamResponse:
            return web.json_response({"status": "ok"})

        return health
    method = getattr(core, route.rpc)
    if route.kind == "client_stream":

        async def import_(request: web.Request) -> web.StreamResponse:
            principal = await _authenticate(core, request)
            response = await method(_ndjson_records(request), principal)
            return web.json_response(protojson.encode(response))

        return import_
    if route.kind == "server_stream":

        async def stream(request: web.Request) -> web.StreamResponse:
            principal = await _authenticate(core, request)
            message = _request_message(route, request, None)
            return await _stream_ndjson(request, method(message, principal))

        return stream

    async def unary(request: web.Request) -> web.StreamResponse:
        principal = await _authenticate(core, request)
        body = await _read_json(request) if route.body else None
        message = _request_message(route, request, body)
        response = await method(message, principal)
        return web.json_response(protojson.encode(response))

    return unary


async def _authenticate(core: CreditCore, request: web.Request) -> Principal:
    header = request.headers.get("Authorization")
    token: str | None = None
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise errors.Unauthenticated("the Authorization header must be 'Bearer <token>'")
        token = value.strip()
    return await core.authenticate(token)


async def _read_json(request: web.Request) -> object:
    raw = await request.read()
    if not raw.strip():
        return {}
    return protojson.loads_json(raw)


def _request_message(route: Route, request: web.Request, body: object) -> Message:
    cls: type[Message] = getattr(pb, route.input.name)
    if route.body:
        message = protojson.decode(cls, body)
        if request.query:
            raise errors.InvalidArgument(
                f"query parameter {next(iter(request.query))}: not accepted here; "
                "send fields in the JSON body"
            )
    else:
        params = {k: request.query.getall(k) for k in request.query}
        message = protojson.decode_params(cls, params)
    for name, dotted in route.params.items():
        protojson.set_path_field(message, dotted, request.match_info[name])
    key = request.headers.get("Idempotency-Key")
    if key is not None and "request_id" in route.input.fields_by_name:
        current = getattr(message, "request_id")  # noqa: B009 - any request type with the field
        if not current:
            setattr(message, "request_id", key)  # noqa: B010
        elif current != key:
            raise errors.InvalidArgument(
                "request_id: differs from the Idempotency-Key header; send one of them"
            )
    return message


async def _ndjson_records(request: web.Request) -> AsyncIterator[pb.ExportRecord]:
    """Lines of the body as ExportRecords; a bad line is an InvalidArgument naming it."""
    buffer = bytearray()
    lineno = 0

    def parse(line: bytes) -> pb.ExportRecord | None:
        if not line.strip():
            return None
        return protojson.decode_line(pb.ExportRecord, line, lineno)

    async for chunk in request.content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            lineno += 1
            record = parse(line)
            if record is not None:
                yield record
    if buffer:
        lineno += 1
        record = parse(bytes(buffer))
        if record is not None:
            yield record


async def _stream_ndjson(request: web.Request, items: AsyncIterator[Message]) -> web.StreamResponse:
    iterator = aiter(items)
    first = asyncio.ensure_future(_next(iterator))
    try:
        await asyncio.wait({first}, timeout=FIRST_ITEM_WAIT_S)
        if first.done():
            first.result()  # an error raised at once becomes a problem response
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        await response.prepare(request)
        try:
            has_item, item = await first
            while has_item:
                assert item is not None
                await response.write(protojson.dumps(item).encode() + b"\n")
                has_item, item = await _next(iterator)
        except errors.ServiceError as exc:
            line = {"error": _problem_body(exc.http_status, exc.slug, exc.message, request.path)}
            await response.write(json.dumps(line).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("stream %s failed", request.path)
            line = {"error": _problem_body(500, "internal", "internal error", request.path)}
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
        return response
    finally:
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await first
        close = getattr(iterator, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


async def _next(iterator: AsyncIterator[Message]) -> tuple[bool, Message | None]:
    try:
        return True, await anext(iterator)
    except StopAsyncIteration:
        return False, None


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ServiceError as exc:
        return problem(request, exc.http_status, exc.slug, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        slug = _HTTP_SLUGS.get(exc.status, f"http-{exc.status}")
        return problem(request, exc.status, slug, _http_detail(request, exc), exc.headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        # SECURITY: the client learns only that something failed; the log has the rest.
        log.exception("%s %s failed", request.method, request.path)
        return problem(request, 500, "internal", "internal error")


def _http_detail(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no route {request.method} {request.path}; see /openapi.json"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    return exc.reason


def problem(
    request: web.Request,
    status: int,
    slug: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = _problem_body(status, slug, detail, request.path)
    out_headers = {"Content-Type": PROBLEM_JSON}
    if headers is not None and "Allow" in headers:
        out_headers["Allow"] = headers["Allow"]
    if status == 401:
        out_headers["WWW-Authenticate"] = 'Bearer realm="creditgate"'
    return web.Response(
        status=status,
        text=json.dumps(body),
        headers=out_headers,
    )


def _problem_body(status: int, slug: str, detail: str, instance: str) -> dict[str, Any]:
    return {
        "type": PROBLEM_TYPE_PREFIX + slug,
        "title": TITLES.get(slug, "Error"),
        "status": status,
        "detail": detail,
        "instance": instance,
    }
