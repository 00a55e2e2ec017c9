"""The admission policy: settings, default quotas and routes, loaded from a TOML file.

Pure and frozen. Errors name file, line and field; route matching is one precompiled regex.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from admission.decision import QuotaKind
from admission.errors import PolicyError

MAX_AMOUNT = 10**15
CommitMode = Literal["held", "reported", "overage"]
RedisDownMode = Literal["deny", "allow"]
DisconnectMode = Literal["release", "commit"]
AdmissionMode = Literal["lease", "hold"]

_MATCH_CACHE_MAX = 4096
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_METHOD_RE = re.compile(r"^(\*|[A-Z]{1,20})$")
_PARAM_RE = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=:@%-]*$")


@dataclass(frozen=True, slots=True)
class Settings:
    shards: int = 16
    max_cost: int = 1_000_000
    unsettled_limit: int = 1_000_000
    hold_ttl_seconds: int = 300
    credit_retry_after_seconds: int = 30
    backlog_retry_after_seconds: int = 5
    unavailable_retry_after_seconds: int = 1
    unmatched: Literal["pass", "deny"] = "pass"
    # "lease": each gateway process admits from blocks of credits/quota units it leases from
    # Redis and syncs every lease_sync_ms; "hold": one Redis script call per request.
    admission: AdmissionMode = "lease"
    lease_sync_ms: int = 20
    lease_ttl_ms: int = 2000
    lease_idle_ms: int = 1000


@dataclass(frozen=True, slots=True)
class QuotaDef:
    """`limit` per `window_seconds` (rate), or `limit` in flight (concurrency)."""

    name: str
    kind: QuotaKind
    limit: int
    window_seconds: int = 0

    def encode(self) -> str:
        """The quota_defs hash value format shared with the cache fill."""
        return f"{self.kind.value}:{self.limit}:{self.window_seconds}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    method: str
    path: str
    cost: int = 0
    commit: CommitMode = "held"
    quotas: tuple[str, ...] = ()
    weight: int = 1
    meter: str = "requests"
    shadow: bool = False
    on_redis_down: RedisDownMode = "deny"
    release_on_error: bool = True
    on_disconnect: DisconnectMode = "release"

    @property
    def allow_overage(self) -> bool:
        return self.commit == "overage"


@dataclass(frozen=True)
class Policy:
    settings: Settings
    quotas: Mapping[str, QuotaDef]
    routes: tuple[Route, ...]
    _by_name: Mapping[str, Route] = field(repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(repr=False, compare=False)
    # (method, path) -> route: most traffic repeats a few paths; bounded, emptied when full.
    _matched: dict[tuple[str, str], Route | None] = field(
        default_factory=dict, repr=False, compare=False
    )

    def match(self, method: str, path: str) -> Route | None:
        """The first route in file order whose method and path pattern match, or None."""
        key = (method, path)
        matched = self._matched
        if key in matched:
            return matched[key]
        route = None
        if self._regex is not None:
            m = self._regex.fullmatch(f"{method} {path}")
            if m is not None and m.lastgroup is not None:
                route = self.routes[int(m.lastgroup[1:])]
        if len(matched) >= _MATCH_CACHE_MAX:
            matched.clear()
        matched[key] = route
        return route

    def route(self, name: str) -> Route | None:
        return self._by_name.get(name)


def _method_pattern(method: str) -> str:
    if method == "*":
        # Any method token (RFC 9110 9.1), M-SEARCH included: "*" routes of aiohttp take it too.
        return "[^ ]+"
    if method == "GET":
        # SECURITY: servers answer HEAD with the GET handler (RFC 9110 9.3.2); a GET route that
        # let HEAD through would do the same work unmetered.
        return "(?:GET|HEAD)"
    return re.escape(method)


def resolve_segments(segments: list[str], decode: Callable[[str], str] | None = None) -> list[str]:
    """A path's segments as most servers read them: "." and ".." resolved (RFC 3986 5.2.4)
    and empty segments merged, a trailing slash kept. `decode` turns a segment into the text
    compared with "." and ".." (the segments themselves are returned as given)."""
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        name = decode(seg) if decode is not None else seg
        if name in (".", ".."):
            if name == ".." and out:
                out.pop()
            if i == last:
                out.append("")  # "/a/b/.." is "/a/": the result names a directory
            continue
        if seg == "" and i != last:
            continue
        out.append(seg)
    return out


def ambiguous_route(policy: Policy, method: str, path: str, route: Route | None) -> bool:
    """True when `path` (as the router matched it) has dot or empty segments and, once they
    are resolved as a server might, names another policy route than `route`.

    Routers differ here: aiohttp's dynamic routes take "/v1/." as it is, its static files
    resolve it. A request the two readings meter differently is refused.
    """
    if "/." not in path and "//" not in path:
        return False
    resolved = "/" + "/".join(resolve_segments(path.split("/")[1:]))
    return resolved != path and policy.match(method, resolved) is not route


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    return parse_policy(p.read_text(encoding="utf-8"), str(path))


def parse_policy(text: str, filename: str = "policy.toml") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError has no lineno attribute; its message ends in the position.
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(m.group(1)) if m else 1
        raise PolicyError(f"{filename}:{line}: {exc}", filename=filename, line=line) from exc
    return _Parser(text, filename).build(data)


def compile_path(pattern: str) -> str:
    """Regex source for a path pattern; raises ValueError with a reason when it is malformed."""
    if not pattern.startswith("/"):
        raise ValueError("must start with '/'")
    segments = pattern[1:].split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            if not last:
                raise ValueError("'**' is only allowed as the last segment")
            # `/a/**` matches /a, /a/ and everything below it.
            out.append("(?:/.*)?")
        elif seg == "*" or _PARAM_RE.fullmatch(seg):
            out.append("/[^/]+")
        elif "*" in seg or "{" in seg or "}" in seg or not _SEGMENT_RE.fullmatch(seg):
            raise ValueError(f"bad segment {seg!r}")
        else:
            out.append("/" + re.escape(seg))
    return "".join(out)


class _Parser:
    """Validates the decoded TOML; line numbers come from scanning the source text."""

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        self.lines = text.splitlines()

    def build(self, data: dict[str, Any]) -> Policy:
        self._unknown(data, {"settings", "quotas", "routes"}, "", ())
        settings = self._settings(self._table(data, "settings", "settings", None))
        quotas_raw = self._table(data, "quotas", "quotas", None)
        quotas: dict[str, QuotaDef] = {}
        for name, body in quotas_raw.items():
            quotas[name] = self._quota(name, body)
        routes_raw = data.get("routes", [])
        if not isinstance(routes_raw, list):
            self._fail("routes", None, f"must be an array of tables, got {routes_raw!r}")
        routes: list[Route] = []
        names: set[str] = set()
        for i, body in enumerate(routes_raw):
            route = self._route(i, body, settings, quotas)
            if route.name in names:
                self._fail(
                    f"routes[{i}].name",
                    ("routes", i, "name"),
                    f"duplicate route name {route.name!r}",
                )
            names.add(route.name)
            routes.append(route)
        regex = None
        if routes:
            alts = [
                f"(?P<r{i}>{_method_pattern(r.method)} {compile_path(r.path)})"
                for i, r in enumerate(routes)
            ]
            # DOTALL: a path may hold a decoded newline (%0A), which `**` must cover too.
            regex = re.compile("|".join(alts), re.DOTALL)
        return Policy(
            settings=settings,
            quotas=MappingProxyType(quotas),
            routes=tuple(routes),
            _by_name=MappingProxyType({r.name: r for r in routes}),
            _regex=regex,
        )

    # -- sections -------------------------------------------------------------------------

    def _settings(self, raw: dict[str, Any]) -> Settings:
        loc = ("settings",)
        allowed = set(Settings.__dataclass_fields__)
        self._unknown(raw, allowed, "settings.", loc)
        d = Settings()
        vals: dict[str, Any] = {}
        for key, lo, hi in (
            ("shards", 1, 16384),
            ("max_cost", 1, MAX_AMOUNT),
            ("unsettled_limit", 0, MAX_AMOUNT),
            ("hold_ttl_seconds", 1, 7 * 86400),
            ("credit_retry_after_seconds", 1, 86400),
            ("backlog_retry_after_seconds", 1, 86400),
            ("unavailable_retry_after_seconds", 1, 86400),
            ("lease_sync_ms", 1, 10_000),
            ("lease_ttl_ms", 100, 600_000),
            ("lease_idle_ms", 1, 3_600_000),
        ):
            vals[key] = self._int(
                raw, key, getattr(d, key), lo=lo, hi=hi, fld=f"settings.{key}", loc=loc
            )
        vals["unmatched"] = self._choice(
            raw,
            "unmatched",
            d.unmatched,
            choices=("pass", "deny"),
            fld="settings.unmatched",
            loc=loc,
        )
        vals["admission"] = self._choice(
            raw,
            "admission",
            d.admission,
            choices=("lease", "hold"),
            fld="settings.admission",
            loc=loc,
        )
        if vals["lease_ttl_ms"] < 4 * vals["lease_sync_ms"]:
            self._fail(
                "settings.lease_ttl_ms",
                _sub(loc, "lease_ttl_ms"),
                f"must be at least 4 x settings.lease_sync_ms ({4 * vals['lease_sync_ms']}), "
                f"got {vals['lease_ttl_ms']}",
            )
        return Settings(**vals)

    def _quota(self, name: str, body: Any) -> QuotaDef:
        loc = ("quotas", name)
        fld = f"quotas.{name}"
        if not _NAME_RE.fullmatch(name):
            self._fail(fld, loc, "quota names use letters, digits, '.', '_' and '-'")
        if not isinstance(body, dict):
            self._fail(fld, loc, f"must be a table, got {body!r}")
        self._unknown(body, {"kind", "limit", "window_seconds"}, fld + ".", loc)
        kind_s = self._choice(
            body, "kind", None, choices=("rate", "concurrency"), fld=f"{fld}.kind", loc=loc
        )
        kind = QuotaKind(kind_s)
        limit = self._int(body, "limit", None, lo=1, hi=MAX_AMOUNT, fld=f"{fld}.limit", loc=loc)
        if kind is QuotaKind.RATE:
            window = self._int(
                body,
                "window_seconds",
                None,
                lo=1,
                hi=366 * 86400,
                fld=f"{fld}.window_seconds",
                loc=loc,
            )
        else:
            window = self._int(
                body, "window_seconds", 0, lo=0, hi=0, fld=f"{fld}.window_seconds", loc=loc
            )
        return QuotaDef(name, kind, limit, window)

    def _route(
        self, i: int, body: Any, settings: Settings, quotas: Mapping[str, QuotaDef]
    ) -> Route:
        loc = ("routes", i)
        fld = f"routes[{i}]"
        if not isinstance(body, dict):
            self._fail(fld, loc, f"must be a table, got {body!r}")
        self._unknown(body, set(Route.__dataclass_fields__), fld + ".", loc)
        name = self._str(body, "name", None, f"{fld}.name", loc)
        if not _NAME_RE.fullmatch(name):
            self._fail(
                f"{fld}.name", (*loc, "name"), f"must match {_NAME_RE.pattern}, got {name!r}"
            )
        method = self._str(body, "method", "*", f"{fld}.method", loc)
        if not _METHOD_RE.fullmatch(method):
            self._fail(
                f"{fld}.method",
                (*loc, "method"),
                f"must be an upper-case HTTP method or '*', got {method!r}",
            )
        path = self._str(body, "path", None, f"{fld}.path", loc)
        try:
            compile_path(path)
        except ValueError as exc:
            self._fail(f"{fld}.path", (*loc, "path"), f"{exc}, got {path!r}")
        cost = self._int(body, "cost", 0, lo=0, hi=None, fld=f"{fld}.cost", loc=loc)
        if cost > settings.max_cost:
            self._fail(
                f"{fld}.cost",
                (*loc, "cost"),
                f"must be <= settings.max_cost ({settings.max_cost}), got {cost}",
            )
        commit = self._choice(
            body,
            "commit",
            "held",
            choices=("held", "reported", "overage"),
            fld=f"{fld}.commit",
            loc=loc,
        )
        if cost == 0 and commit != "held":
            # A report is charged to the request's hold; with cost 0 there is none, and a
            # charge without one would pass GRACE (where chargeable requests are denied).
            self._fail(
                f"{fld}.commit",
                (*loc, "commit"),
                f"{commit!r} needs a cost > 0 (the credits held while the request runs, "
                "which the reported usage is charged against); got cost 0",
            )
        weight = self._int(body, "weight", 1, lo=1, hi=MAX_AMOUNT, fld=f"{fld}.weight", loc=loc)
        qnames = body.get("quotas", [])
        if not isinstance(qnames, list) or not all(isinstance(q, str) for q in qnames):
            self._fail(
                f"{fld}.quotas",
                (*loc, "quotas"),
                f"must be an array of quota names, got {qnames!r}",
            )
        for q in qnames:
            if q not in quotas:
                self._fail(
                    f"{fld}.quotas",
                    (*loc, "quotas"),
                    f"unknown quota {q!r} (define it under [quotas.{q}])",
                )
            qd = quotas[q]
            if qd.kind is QuotaKind.RATE and weight > qd.limit:
                self._fail(
                    f"{fld}.weight",
                    (*loc, "weight"),
                    f"must be <= the limit of quota {q!r} ({qd.limit}), got {weight}",
                )
        if len(set(qnames)) != len(qnames):
            self._fail(f"{fld}.quotas", (*loc, "quotas"), f"duplicate quota in {qnames!r}")
        meter = self._str(body, "meter", "requests", f"{fld}.meter", loc)
        if not _NAME_RE.fullmatch(meter):
            self._fail(
                f"{fld}.meter", (*loc, "meter"), f"must match {_NAME_RE.pattern}, got {meter!r}"
            )
        down_default = "deny" if cost > 0 else "allow"
        return Route(
            name=name,
            method=method,
            path=path,
            cost=cost,
            commit=commit,  # type: ignore[arg-type]
            quotas=tuple(qnames),
            weight=weight,
            meter=meter,
            shadow=self._bool(body, "shadow", False, f"{fld}.shadow", loc),
            on_redis_down=self._choice(  # type: ignore[arg-type]
                body,
                "on_redis_down",
                down_default,
                choices=("deny", "allow"),
                fld=f"{fld}.on_redis_down",
                loc=loc,
            ),
            release_on_error=self._bool(
                body, "release_on_error", True, f"{fld}.release_on_error", loc
            ),
            on_disconnect=self._choice(  # type: ignore[arg-type]
                body,
                "on_disconnect",
                "release",
                choices=("release", "commit"),
                fld=f"{fld}.on_disconnect",
                loc=loc,
            ),
        )

    # -- typed getters -----------------------------------------------------------------------

    def _table(
        self, d: dict[str, Any], key: str, fld: str, loc: tuple[Any, ...] | None
    ) -> dict[str, Any]:
        v = d.get(key, {})
        if not isinstance(v, dict):
            self._fail(fld, (key,), f"must be a table, got {v!r}")
        return dict(v)

    def _missing(self, fld: str, loc: tuple[Any, ...] | None) -> None:
        self._fail(fld, loc, "is required")

    def _int(
        self,
        d: dict[str, Any],
        key: str,
        default: int | None,
        *,
        lo: int,
        hi: int | None,
        fld: str,
        loc: tuple[Any, ...] | None,
    ) -> int:
        if key not in d:
            if default is None:
                self._missing(fld, loc)
            return int(default)  # type: ignore[arg-type]
        v = d[key]
        if type(v) is not int or v < lo or (hi is not None and v > hi):
            if hi is None:
                what = f"an integer >= {lo}"
            elif lo == hi:
                what = f"{lo}"
            else:
                what = f"an integer in {lo}..{hi}"
            self._fail(fld, _sub(loc, key), f"must be {what}, got {_show(v)}")
        return int(v)

    def _str(
        self,
        d: dict[str, Any],
        key: str,
        default: str | None,
        fld: str,
        loc: tuple[Any, ...] | None,
    ) -> str:
        if key not in d:
            if default is None:
                self._missing(fld, loc)
            return str(default)
        v = d[key]
        if not isinstance(v, str) or not v:
            self._fail(fld, _sub(loc, key), f"must be a non-empty string, got {_show(v)}")
        return str(v)

    def _bool(
        self, d: dict[str, Any], key: str, default: bool, fld: str, loc: tuple[Any, ...] | None
    ) -> bool:
        v = d.get(key, default)
        if not isinstance(v, bool):
            self._fail(fld, _sub(loc, key), f"must be true or false, got {_show(v)}")
        return bool(v)

    def _choice(
        self,
        d: dict[str, Any],
        key: str,
        default: str | None,
        *,
        choices: tuple[str, ...],
        fld: str,
        loc: tuple[Any, ...] | None,
    ) -> str:
        if key not in d:
            if default is None:
                self._missing(fld, loc)
            return str(default)
        v = d[key]
        if v not in choices or not isinstance(v, str):
            opts = " | ".join(f'"{c}"' for c in choices)
            self._fail(fld, _sub(loc, key), f"must be one of {opts}, got {_show(v)}")
        return str(v)

    def _unknown(
        self, d: dict[str, Any], allowed: set[str], prefix: str, loc: tuple[Any, ...] | None
    ) -> None:
        for key in d:
            if key not in allowed:
                self._fail(
                    f"{prefix}{key}",
                    _sub(loc, key),
                    f"unknown key (expected one of: {', '.join(sorted(allowed))})",
                )

    # -- locations ---------------------------------------------------------------------------

    def _fail(self, fld: str, loc: tuple[Any, ...] | None, msg: str) -> Any:
        line = self._locate(loc)
        raise PolicyError(
            f"{self.filename}:{line}: {fld}: {msg}", filename=self.filename, line=line, field=fld
        )

    def _locate(self, loc: tuple[Any, ...] | None) -> int:
        """Line of the table header `loc[:-1]` names, then of `key =` inside it (1-based)."""
        if not loc:
            return 1
        table: tuple[Any, ...]
        key: str | None
        if loc[0] in ("routes", "quotas"):
            table, key = loc[:2], (loc[2] if len(loc) > 2 else None)
        elif loc[0] == "settings":
            table, key = loc[:1], (loc[1] if len(loc) > 1 else None)
        else:
            table, key = (), loc[0]
        start = self._header_line(table) if table else 0
        if start < 0:
            return 1
        if key is None:
            return start + 1 if table else 1
        key_re = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=")
        for j in range(start + 1 if table else 0, len(self.lines)):
            text = self.lines[j]
            if _HEADER_RE.match(text):
                break
            if key_re.match(text):
                return j + 1
        if not table:
            header = re.compile(rf"^\s*\[\[?\s*{re.escape(key)}[\s.\]]")
            for j, text in enumerate(self.lines):
                if header.match(text):
                    return j + 1
        return start + 1 if table else 1

    def _header_line(self, table: tuple[Any, ...]) -> int:
        seen = -1
        for j, text in enumerate(self.lines):
            m = _HEADER_RE.match(text)
            if not m:
                continue
            if m.group("arr") is not None:
                if table[0] == "routes" and m.group("arr").strip() == "routes":
                    seen += 1
                    if seen == table[1]:
                        return j
                continue
            parts = [p.strip().strip('"').strip("'") for p in m.group("tbl").split(".")]
            if tuple(parts) == tuple(str(t) for t in table):
                return j
        return -1


_HEADER_RE = re.compile(r"^\s*(?:\[\[(?P<arr>[^\[\]]+)\]\]|\[(?P<tbl>[^\[\]]+)\])\s*(?:#.*)?$")


def _sub(loc: tuple[Any, ...] | None, key: str) -> tuple[Any, ...] | None:
    return None if loc is None else (*loc, key)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)
