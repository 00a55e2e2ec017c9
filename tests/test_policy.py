"""Policy parsing, route matching and the error messages (file, line, field)."""

from __future__ import annotations

from pathlib import Path

import pytest

from admission.decision import QuotaKind
from admission.errors import PolicyError
from admission.policy import (
    Settings,
    ambiguous_route,
    load_policy,
    parse_policy,
    resolve_segments,
)
from tests.fixtures_admission import TEST_POLICY

EXAMPLE = """\
[settings]
shards = 16
max_cost = 1000000
unsettled_limit = 1000000
hold_ttl_seconds = 300
credit_retry_after_seconds = 30
unmatched = "pass"

[quotas.requests]
kind = "rate"
limit = 600
window_seconds = 60

[quotas.concurrent]
kind = "concurrency"
limit = 20

[[routes]]
name = "chat"
method = "POST"
path = "/v1/chat/**"
cost = 10
commit = "held"
quotas = ["requests", "concurrent"]
weight = 1
meter = "requests"
shadow = false
on_redis_down = "deny"
release_on_error = true
on_disconnect = "release"

[[routes]]
name = "model"
method = "GET"
path = "/v1/models/{model}/info"

[[routes]]
name = "any-v2"
method = "*"
path = "/v2/*/items/**"
cost = 1
"""


def test_example_parses_with_defaults() -> None:
    p = parse_policy(EXAMPLE, "policy.toml")
    assert p.settings == Settings()
    assert p.quotas["requests"].kind is QuotaKind.RATE
    assert (p.quotas["requests"].limit, p.quotas["requests"].window_seconds) == (600, 60)
    assert p.quotas["concurrent"].kind is QuotaKind.CONCURRENCY
    assert p.quotas["concurrent"].window_seconds == 0
    chat, model, v2 = p.routes
    assert chat.quotas == ("requests", "concurrent") and chat.cost == 10
    assert model.cost == 0 and model.on_redis_down == "allow"  # free routes default to allow
    assert chat.on_redis_down == "deny" and v2.on_redis_down == "deny"
    assert model.commit == "held" and not model.allow_overage and model.weight == 1
    assert p.route("chat") is chat and p.route("nope") is None


def test_load_policy_from_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    f.write_text(EXAMPLE)
    assert load_policy(f).routes[0].name == "chat"


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("POST", "/v1/chat/completions", "chat"),
        ("POST", "/v1/chat/a/b/c", "chat"),
        ("POST", "/v1/chat", "chat"),
        ("GET", "/v1/chat/completions", None),
        ("GET", "/v1/models/gpt/info", "model"),
        ("GET", "/v1/models/gpt/x/info", None),
        ("GET", "/v1/models//info", None),
        ("DELETE", "/v2/shop/items", "any-v2"),
        ("PATCH", "/v2/shop/items/1/2", "any-v2"),
        ("GET", "/v2/shop/other", None),
        ("GET", "/", None),
        # SECURITY: a decoded %0A is part of the path: "**" covers it, "*" segments too.
        ("POST", "/v1/chat/a\nb", "chat"),
        ("GET", "/v1/models/g\npt/info", "model"),
        # "*" is any method token, as aiohttp's "*" routes take them.
        ("M-SEARCH", "/v2/shop/items", "any-v2"),
    ],
)
def test_match(method: str, path: str, route: str | None) -> None:
    p = parse_policy(EXAMPLE)
    m = p.match(method, path)
    assert (m.name if m else None) == route


def test_first_match_in_file_order_wins() -> None:
    text = """
[[routes]]
name = "specific"
method = "GET"
path = "/a/b"

[[routes]]
name = "catch-all"
path = "/**"
"""
    p = parse_policy(text)
    assert p.match("GET", "/a/b").name == "specific"  # type: ignore[union-attr]
    assert p.match("POST", "/a/b").name == "catch-all"  # type: ignore[union-attr]
    assert p.match("GET", "/").name == "catch-all"  # type: ignore[union-attr]


def test_matching_among_many_routes() -> None:
    routes = "\n".join(
        f'[[routes]]\nname = "r{i}"\nmethod = "GET"\npath = "/svc{i}/{{id}}/x/**"\n'
        for i in range(200)
    )
    p = parse_policy(routes)
    assert p.match("GET", "/svc150/abc/x/y").name == "r150"  # type: ignore[union-attr]
    assert p.match("GET", "/svc1500/abc/x/y") is None


def test_head_is_metered_like_get() -> None:
    """SECURITY: servers answer HEAD with the GET handler; it must not slip through unmetered."""
    text = """
[[routes]]
name = "probe"
method = "HEAD"
path = "/a/probe"

[[routes]]
name = "read"
method = "GET"
path = "/a/**"
cost = 5

[[routes]]
name = "write"
method = "POST"
path = "/b"
"""
    p = parse_policy(text)
    assert p.match("HEAD", "/a/x").name == "read"  # type: ignore[union-attr]
    assert p.match("HEAD", "/a/probe").name == "probe"  # type: ignore[union-attr]
    assert p.match("GET", "/a/probe").name == "read"  # type: ignore[union-attr]
    assert p.match("HEAD", "/b") is None


@pytest.mark.parametrize(
    ("segments", "resolved"),
    [
        (["a", "b"], ["a", "b"]),
        (["a", ".", "b"], ["a", "b"]),
        (["a", "..", "b"], ["b"]),
        (["..", "..", "a"], ["a"]),
        (["a", "b", ".."], ["a", ""]),
        (["a", "."], ["a", ""]),
        (["a", "", "b", ""], ["a", "b", ""]),
        ([""], [""]),
    ],
)
def test_resolve_segments(segments: list[str], resolved: list[str]) -> None:
    assert resolve_segments(segments) == resolved


def test_a_path_whose_dot_segments_change_its_route_is_ambiguous() -> None:
    p = parse_policy(EXAMPLE)
    route = p.match("GET", "/v1/models/gpt/info")
    assert not ambiguous_route(p, "GET", "/v1/models/gpt/info", route)
    # Read as it stands "/v1/models/./info" is the model route; resolved it is no route.
    path = "/v1/models/./info"
    assert ambiguous_route(p, "GET", path, p.match("GET", path))
    # Read as it stands no route; resolved, the model route.
    path = "/v1/models/x/../gpt/info"
    assert ambiguous_route(p, "GET", path, p.match("GET", path))
    path = "/v1/models//gpt/info"
    assert ambiguous_route(p, "GET", path, p.match("GET", path))
    # Both readings agree: nothing to refuse.
    path = "/v1/chat/./completions"
    assert not ambiguous_route(p, "POST", path, p.match("POST", path))
    assert not ambiguous_route(p, "GET", "/elsewhere/../else", None)


def test_empty_policy() -> None:
    p = parse_policy("")
    assert p.routes == () and p.match("GET", "/") is None


def _err(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.toml")
    return str(info.value)


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        (
            "\ncost = 10",
            "\ncost = 1.5",
            "policy.toml:22: routes[0].cost: must be an integer >= 0, got 1.5",
        ),
        (
            "\ncost = 10",
            "\ncost = -1",
            "policy.toml:22: routes[0].cost: must be an integer >= 0, got -1",
        ),
        (
            "\ncost = 10",
            "\ncost = true",
            "policy.toml:22: routes[0].cost: must be an integer >= 0, got true",
        ),
        (
            "\ncost = 10",
            "\ncost = 2000000",
            "policy.toml:22: routes[0].cost: must be <= settings.max_cost (1000000), got 2000000",
        ),
        (
            "cost = 1\n",
            "cost = 0.5\n",
            "policy.toml:41: routes[2].cost: must be an integer >= 0, got 0.5",
        ),
        (
            'commit = "held"',
            'commit = "later"',
            'policy.toml:23: routes[0].commit: must be one of "held" | "reported" | "overage", '
            'got "later"',
        ),
        (
            # Nothing is held: a report would be charged without a hold (and past GRACE).
            'cost = 10\ncommit = "held"',
            'cost = 0\ncommit = "overage"',
            "policy.toml:23: routes[0].commit: 'overage' needs a cost > 0",
        ),
        (
            'cost = 10\ncommit = "held"',
            'cost = 0\ncommit = "reported"',
            "policy.toml:23: routes[0].commit: 'reported' needs a cost > 0",
        ),
        (
            'name = "model"',
            'name = "model\\n"',
            "policy.toml:33: routes[1].name: must match",
        ),
        ("weight = 1", "weigth = 1", "policy.toml:25: routes[0].weigth: unknown key"),
        (
            "shadow = false",
            "shadow = 0",
            "policy.toml:27: routes[0].shadow: must be true or false, got 0",
        ),
        (
            'quotas = ["requests", "concurrent"]',
            'quotas = ["requests", "burst"]',
            "policy.toml:24: routes[0].quotas: unknown quota 'burst'",
        ),
        (
            'quotas = ["requests", "concurrent"]',
            'quotas = ["requests", "requests"]',
            "policy.toml:24: routes[0].quotas: duplicate quota",
        ),
        (
            'path = "/v1/chat/**"',
            'path = "v1/chat"',
            "policy.toml:21: routes[0].path: must start with '/', got 'v1/chat'",
        ),
        (
            'path = "/v1/chat/**"',
            'path = "/v1/**/chat"',
            "policy.toml:21: routes[0].path: '**' is only allowed as the last segment",
        ),
        (
            'path = "/v1/chat/**"',
            'path = "/v1/ch*t"',
            "policy.toml:21: routes[0].path: bad segment 'ch*t'",
        ),
        (
            'method = "POST"',
            'method = "post"',
            "policy.toml:20: routes[0].method: must be an upper-case HTTP method or '*'",
        ),
        (
            'name = "model"',
            'name = "chat"',
            "policy.toml:33: routes[1].name: duplicate route name 'chat'",
        ),
        ('name = "model"\n', "", "policy.toml:32: routes[1].name: is required"),
        (
            'on_redis_down = "deny"',
            'on_redis_down = "maybe"',
            "policy.toml:28: routes[0].on_redis_down: must be one of",
        ),
        (
            'on_disconnect = "release"',
            "on_disconnect = 1",
            "policy.toml:30: routes[0].on_disconnect: must be one of",
        ),
        (
            "shards = 16",
            "shards = 0",
            "policy.toml:2: settings.shards: must be an integer in 1..16384, got 0",
        ),
        (
            "max_cost = 1000000",
            "max_cost = 1e6",
            "policy.toml:3: settings.max_cost: must be an integer in 1..1000000000000000, "
            "got 1000000.0",
        ),
        (
            'unmatched = "pass"',
            'unmatched = "allow"',
            'policy.toml:7: settings.unmatched: must be one of "pass" | "deny", got "allow"',
        ),
        (
            "hold_ttl_seconds = 300",
            "hold_ttl = 300",
            "policy.toml:5: settings.hold_ttl: unknown key",
        ),
        (
            'kind = "rate"',
            'kind = "gcra"',
            'policy.toml:10: quotas.requests.kind: must be one of "rate" | "concurrency", '
            'got "gcra"',
        ),
        (
            "limit = 600",
            "limit = 0",
            "policy.toml:11: quotas.requests.limit: must be an integer in 1..1000000000000000, "
            "got 0",
        ),
        (
            "window_seconds = 60",
            "window = 60",
            "policy.toml:12: quotas.requests.window: unknown key",
        ),
        (
            "limit = 20",
            "limit = 20\nwindow_seconds = 5",
            "policy.toml:17: quotas.concurrent.window_seconds: must be 0, got 5",
        ),
        ("[settings]", "[setings]", "policy.toml:1: setings: unknown key"),
    ],
)
def test_error_names_file_line_field(replace: str, by: str, message: str) -> None:
    assert replace in EXAMPLE
    assert _err(EXAMPLE.replace(replace, by, 1)).startswith(message)


def test_missing_rate_window_points_at_the_quota_header() -> None:
    text = EXAMPLE.replace("window_seconds = 60\n", "", 1)
    assert _err(text).startswith("policy.toml:9: quotas.requests.window_seconds: is required")


def test_weight_above_rate_limit() -> None:
    text = EXAMPLE.replace("weight = 1", "weight = 601", 1)
    assert _err(text).startswith(
        "policy.toml:25: routes[0].weight: must be <= the limit of quota 'requests' (600)"
    )


def test_toml_syntax_error_keeps_position() -> None:
    msg = _err(EXAMPLE.replace("\ncost = 10", "\ncost = = 10", 1))
    assert msg.startswith("policy.toml:22: ") and "line 22" in msg


def test_policy_error_carries_fields() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(EXAMPLE.replace("\ncost = 10", "\ncost = 1.5"), "x/policy.toml")
    assert (info.value.filename, info.value.line, info.value.field) == (
        "x/policy.toml",
        22,
        "routes[0].cost",
    )


def test_routes_must_be_array_of_tables() -> None:
    assert _err('routes = "x"').startswith("policy.toml:1: routes: must be an array of tables")


def test_shared_test_policy_parses() -> None:
    p = parse_policy(TEST_POLICY)
    assert [r.name for r in p.routes][:2] == ["chat", "embed"]
