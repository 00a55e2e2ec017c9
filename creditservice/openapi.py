"""The authority's REST surface, declared once: the route table and its OpenAPI 3.1 document.

rest.py wires these routes to CreditCore; the schemas are derived from the protobuf descriptors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from creditservice.v1 import credit_pb2 as pb

Kind = Literal["unary", "server_stream", "client_stream", "document", "health"]

PROBLEM_TYPE_PREFIX = "urn:creditgate:problem:"
NDJSON = "application/x-ndjson"
PROBLEM_JSON = "application/problem+json"
SERVICE = pb.DESCRIPTOR.services_by_name["CreditService"]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    kind: Kind
    summary: str
    rpc: str = ""
    # path parameter -> (dotted) request field it fills
    params: Mapping[str, str] = field(default_factory=dict)
    tag: str = "authority"

    @property
    def input(self) -> Descriptor:
        return SERVICE.methods_by_name[self.rpc].input_type

    @property
    def output(self) -> Descriptor:
        return SERVICE.methods_by_name[self.rpc].output_type

    @property
    def body(self) -> bool:
        return self.method in ("POST", "PUT")


def _r(method: str, path: str, rpc: str, summary: str, tag: str, **params: str) -> Route:
    names = {p.split("}")[0] for p in path.split("{")[1:]}
    bound = {name: params.get(name, name) for name in names}
    return Route(method, path, "unary", summary, rpc, bound, tag)


# fmt: off
P = "/v1/projects/{project_id}"
W = "/v1/wallets/{project_id}"
ROUTES: tuple[Route, ...] = (
    _r("POST", "/v1/wallets", "CreateWallet", "Create a project's wallet", "wallets"),
    _r("GET", "/v1/wallets", "ListWallets", "List wallets, by organization", "wallets"),
    _r("GET", W, "GetWallet", "Read a wallet", "wallets"),
    _r("POST", f"{W}/topup", "TopUp", "Add prepaid credits", "wallets"),
    _r("POST", f"{W}/adjustments", "Adjust", "SLA credit, refund or adjustment", "wallets"),
    _r("GET", f"{W}/transactions", "ListTransactions", "Ledger entries, newest first", "wallets"),
    _r("PUT", f"{W}/policy", "SetWalletPolicy", "Threshold, grace period, overdraft", "wallets"),
    _r("GET", f"{W}/usage", "ExplainUsage", "Usage broken down by meter", "wallets"),
    _r("PUT", f"{P}/quotas/{{name}}", "SetQuota", "Create or replace a quota", "quotas",
       project_id="quota.project_id", name="quota.name"),
    _r("GET", f"{P}/quotas/{{name}}", "GetQuota", "Read a quota", "quotas"),
    _r("DELETE", f"{P}/quotas/{{name}}", "DeleteQuota", "Delete a quota", "quotas"),
    _r("GET", f"{P}/quotas", "ListQuotas", "List a project's quotas", "quotas"),
    _r("POST", "/v1/reservations", "Reserve", "Reserve credits", "reservations"),
    _r("GET", "/v1/reservations/{reservation_id}", "GetReservation", "Read a reservation",
       "reservations"),
    _r("POST", "/v1/reservations/{reservation_id}/commit", "Commit", "Charge a reservation",
       "reservations"),
    _r("POST", "/v1/reservations/{reservation_id}/release", "Release",
       "Release a reservation uncharged", "reservations"),
    _r("POST", "/v1/settle", "Settle", "Settle a batch of ended gateway holds", "settlement"),
    _r("POST", "/v1/usage", "RecordUsage", "Record usage of another meter", "settlement"),
    _r("POST", "/v1/admission/check", "CheckAdmission", "Synchronous admission check",
       "admission"),
    _r("GET", f"{P}/snapshot", "GetAdmissionSnapshot", "Everything admission caches",
       "admission"),
    Route("GET", "/v1/watch", "server_stream", "Stream of changes (NDJSON of WatchEvent)",
          "Watch", tag="admission"),
    _r("POST", f"{P}/keys", "IssueApiKey", "Issue an API key (secret shown once)", "keys"),
    _r("POST", "/v1/keys/{key_id}/revoke", "RevokeApiKey", "Revoke an API key", "keys"),
    _r("GET", "/v1/keys/by-hash/{key_hash}", "ResolveApiKey", "Find a key by SHA-256", "keys"),
    Route("GET", "/v1/export", "server_stream", "The whole authority (NDJSON of ExportRecord)",
          "Export", tag="migration"),
    Route("POST", "/v1/import", "client_stream", "Rebuild from an export (NDJSON body)",
          "Import", tag="migration"),
    Route("GET", "/openapi.json", "document", "This document", tag="meta"),
    Route("GET", "/healthz", "health", "Liveness", tag="meta"),
)
# fmt: on

# Error responses every authenticated route may answer, with the problem type slug of each.
ERROR_RESPONSES: dict[str, tuple[str, str]] = {
    "400": ("BadRequest", "Invalid argument or malformed JSON (invalid-argument)"),
    "401": ("Unauthenticated", "Missing or invalid credential (unauthenticated)"),
    "403": ("PermissionDenied", "Credential may not do this (permission-denied)"),
    "404": ("NotFound", "No such resource (not-found)"),
    "409": ("Conflict", "already-exists, or failed-precondition (e.g. request_id reuse)"),
    "500": ("Internal", "Unexpected error; no details are exposed (internal)"),
    "503": ("Unavailable", "The authority cannot serve now (unavailable)"),
}

_INT64_PATTERN = "^-?(0|[1-9][0-9]*)$"


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ROUTES."""
    schemas: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    schemas["Problem"] = _problem_schema()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "creditgate authority",
            "version": "1",
            "description": (
                "REST/JSON mapping of creditservice.v1.CreditService. Bodies are the proto3 JSON "
                "mapping of the request message with snake_case names; int64 values are strings "
                "in responses and integers or integer strings in requests (never floats). Path "
                "parameters fill the named request fields. Idempotency-Key fills request_id "
                "when the body has none. Errors are RFC 9457 problem details."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "responses": {
                name: {
                    "description": text,
                    "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
                for name, text in ERROR_RESPONSES.values()
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token, or a project API key (cg_...).",
                }
            },
        },
        "security": [{"bearer": []}],
    }


def _operation(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary, "tags": [route.tag]}
    if route.kind == "document":
        op |= {"operationId": "GetOpenApiDocument", "security": []}
        op["responses"] = {
            "200": {
                "description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        }
        return op
    if route.kind == "health":
        op |= {"operationId": "Health", "security": []}
        op["responses"] = {
            "200": {
                "description": "Serving",
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "properties": {"status": {"const": "ok"}}}
                    }
                },
            }
        }
        return op
    op["operationId"] = route.rpc
    inp, out = route.input, route.output
    params = [_path_param(inp, name, dotted) for name, dotted in route.params.items()]
    if route.body:
        content_type = NDJSON if route.kind == "client_stream" else "application/json"
        op["requestBody"] = {
            "required": route.kind == "client_stream",
            "content": {content_type: {"schema": _ref(inp, schemas)}},
        }
    else:
        params += _query_params(inp, set(route.params.values()), schemas)
    if "request_id" in inp.fields_by_name:
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Fills request_id when the request has none.",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            }
        )
    if params:
        op["parameters"] = params
    if route.kind == "server_stream":
        ok = {
            "description": f"One {out.name} per line (NDJSON); an error after the first line "
            'arrives as a final line {"error": Problem}.',
            "content": {NDJSON: {"schema": _ref(out, schemas)}},
        }
    else:
        ok = {
            "description": out.name,
            "content": {"application/json": {"schema": _ref(out, schemas)}},
        }
    op["responses"] = {"200": ok} | {
        status: {"$ref": f"#/components/responses/{name}"}
        for status, (name, _) in ERROR_RESPONSES.items()
    }
    return op


def _path_param(inp: Descriptor, name: str, dotted: str) -> dict[str, Any]:
    desc = inp
    *parents, last = dotted.split(".")
    for part in parents:
        sub = desc.fields_by_name[part].message_type
        assert sub is not None
        desc = sub
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": f"Fills {dotted}.",
        "schema": _scalar_schema(desc.fields_by_name[last], {}),
    }


def _query_params(
    inp: Descriptor, bound: set[str], schemas: dict[str, Any]
) -> list[dict[str, Any]]:
    out = []
    for f in inp.fields:
        if f.name in bound or f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            continue
        schema = _scalar_schema(f, schemas)
        if f.is_repeated:
            schema = {"type": "array", "items": schema}
        out.append(
            {
                "name": f.name,
                "in": "query",
                "required": False,
                "schema": schema,
                **({"explode": True} if f.is_repeated else {}),
            }
        )
    return out


def _ref(desc: Descriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if desc.name not in schemas:
        schemas[desc.name] = {}  # placeholder first: messages may refer to each other
        schemas[desc.name] = _message_schema(desc, schemas)
    return {"$ref": f"#/components/schemas/{desc.name}"}


def _message_schema(desc: Descriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for f in desc.fields:
        if f.message_type is not None:
            item = _ref(f.message_type, schemas)
        else:
            item = _scalar_schema(f, schemas)
        props[f.name] = {"type": "array", "items": item} if f.is_repeated else item
    schema: dict[str, Any] = {
        "type": "object",
        "title": desc.full_name,
        "properties": props,
        "additionalProperties": False,
    }
    oneofs = [o for o in desc.oneofs]
    if oneofs:
        schema["description"] = "; ".join(
            f"at most one of {', '.join(f.name for f in o.fields)} ({o.name})" for o in oneofs
        )
    return schema


def _scalar_schema(f: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    cpp = f.cpp_type
    if cpp in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):
        return {"type": ["string", "integer"], "format": "int64", "pattern": _INT64_PATTERN}
    if cpp in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_UINT32):
        return {"type": "integer", "format": "int32"}
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return {"type": "boolean"}
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return {"type": "number"}
    if f.enum_type is not None:
        return _enum_ref(f.enum_type, schemas)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    return {"type": "string"}


def _enum_ref(enum: EnumDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    schemas.setdefault(
        enum.name,
        {
            "title": enum.full_name,
            "type": "string",
            "enum": [v.name for v in enum.values],
        },
    )
    return {"$ref": f"#/components/schemas/{enum.name}"}


def _problem_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "title": "RFC 9457 problem details",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {
                "type": "string",
                "format": "uri",
                "description": f"{PROBLEM_TYPE_PREFIX}<slug>, stable per error class",
            },
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
        },
    }


def route_methods(routes: Sequence[Route] = ROUTES) -> set[tuple[str, str]]:
    return {(r.method, r.path) for r in routes}
