"""The authority CLI in-process (`creditgate ...` through gateway_plugin.cli.main) against a
running authority: every command, the wording of wallet states, bad input and unreachable
authorities as one line with the documented exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from creditservice import render, validation
from creditservice.clock import ManualClock
from creditservice.server import AuthorityServer, redacted_database
from creditservice.v1 import credit_pb2 as pb
from gateway_plugin.cli import build_parser, main
from tests.fixtures_authority import admin_md, authority_config, new_project_id

Result = tuple[int, str, str]
Cli = Callable[..., Awaitable[Result]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """Runs the CLI in a worker thread (it runs its own event loop, the authority runs in ours)."""
    capsys.readouterr()
    try:
        code = await asyncio.to_thread(main, list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def cli(authority: AuthorityServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    """`await cli("wallet", "show", "p")` with this authority's address and admin token."""

    async def call(*argv: str, token: str | None = None) -> Result:
        chosen = authority.config.admin_token if token is None else token
        return await run(capsys, *argv, "--authority", authority.grpc_target, "--token", chosen)

    return call


async def ok(cli: Cli, *argv: str) -> str:
    code, out, err = await cli(*argv)
    assert code == 0, (argv, code, out, err)
    return out


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------- wallets


async def test_wallet_commands(cli: Cli, authority: AuthorityServer, authority_stub: Any) -> None:
    pid = new_project_id("cli")
    out = await ok(
        cli,
        "wallet",
        "create",
        pid,
        "--org",
        "org-cli",
        "--low-threshold",
        "100",
        "--grace-days",
        "3",
        "--overdraft",
        "0",
    )
    assert pid in out and "grace period 3d" in out
    out = await ok(cli, "wallet", "topup", pid, "500", "--reference", "pay-1")
    assert "topped up 500" in out and "HEALTHY" in out
    out = await ok(cli, "wallet", "adjust", pid, "--kind", "sla-credit", "25", "--reason", "outage")
    assert "sla-credit +25" in out
    out = await ok(
        cli, "wallet", "adjust", pid, "--kind", "adjustment", "-5", "--reason", "typo in invoice"
    )
    assert "adjustment -5" in out

    out = await ok(cli, "wallet", "show", pid)
    assert "balance    520" in out
    assert "HEALTHY: requests are admitted" in out

    out = await ok(cli, "wallet", "transactions", pid, "--limit", "2")
    rows = out.strip().splitlines()
    assert rows[0].split()[:4] == ["SEQ", "TIME", "KIND", "AMOUNT"]
    assert [r.split()[2] for r in rows[1:]] == ["ADJUSTMENT", "SLA_CREDIT"]

    out = await ok(cli, "wallet", "list", "--org", "org-cli")
    assert pid in out and "HEALTHY" in out

    md = admin_md(authority.config.admin_token)
    for meter, amount in (("requests", 30), ("machine_hours", 90)):
        await authority_stub.RecordUsage(
            pb.RecordUsageRequest(
                request_id=f"{meter}-{pid}",
                project_id=pid,
                meter=meter,
                amount=amount,
                quantity=amount // 10,
            ),
            metadata=md,
            timeout=10,
        )
    out = await ok(cli, "wallet", "explain", pid, "--since", "2000-01-01T00:00Z")
    lines = {line.split()[0]: line.split() for line in out.strip().splitlines()[2:]}
    assert lines["machine_hours"][1:3] == ["90", "75.0%"]
    assert lines["requests"][1:3] == ["30", "25.0%"]
    assert lines["total"][1:3] == ["120", "100.0%"]

    out = await ok(cli, "wallet", "show", pid, "--json")
    assert json.loads(out)["wallet"]["balance"] == "400"


async def test_request_id_makes_a_retry_harmless(cli: Cli) -> None:
    pid = new_project_id("cli")
    await ok(cli, "wallet", "create", pid, "--org", "org-cli")
    for _ in range(2):
        await ok(cli, "wallet", "topup", pid, "70", "--request-id", f"pay-{pid}")
    out = await ok(cli, "wallet", "show", pid, "--json")
    assert json.loads(out)["wallet"]["balance"] == "70"
    code, _, err = await cli("wallet", "topup", pid, "71", "--request-id", f"pay-{pid}")
    assert code == 1
    assert one_line_error(err).startswith("error: FAILED_PRECONDITION: ")


async def test_wallet_show_says_what_each_state_means(cli: Cli, authority: AuthorityServer) -> None:
    clock = authority.clock
    assert isinstance(clock, ManualClock)
    healthy, low, grace = (new_project_id(s) for s in ("healthy", "low", "grace"))
    for pid, amount in ((healthy, 1000), (low, 40)):
        await ok(cli, "wallet", "create", pid, "--org", "org-s", "--low-threshold", "100")
        await ok(cli, "wallet", "topup", pid, str(amount))
    await ok(cli, "wallet", "create", grace, "--org", "org-s", "--grace-seconds", "3600")

    out = await ok(cli, "wallet", "show", healthy)
    assert "state      HEALTHY: requests are admitted" in out
    out = await ok(cli, "wallet", "show", low)
    assert (
        "LOW: requests are admitted with a low-balance warning (balance 40 < threshold 100)"
    ) in out

    out = await ok(cli, "wallet", "show", grace, "--json")
    until = int(json.loads(out)["wallet"]["grace_until_ms"])
    assert until == clock.now_ms() + 3600 * 1000
    out = await ok(cli, "wallet", "show", grace)
    assert (
        "GRACE: paid requests are refused with 402 until a top-up; free routes are still "
        f"admitted; expires {render.iso(until)}; nothing is deleted"
    ) in out

    clock.advance(seconds=3601)
    await authority.run_jobs_once()
    out = await ok(cli, "wallet", "show", grace)
    assert (
        f"EXPIRED since {render.iso(until)}: every request of the project is refused with 403 "
        "until a top-up; nothing is deleted"
    ) in out
    out = await ok(cli, "wallet", "topup", grace, "10")
    assert "HEALTHY" in out


def test_state_wording_is_pure() -> None:
    until = 1_796_119_200_000  # 2026-12-01T10:00:00Z
    assert render.iso(until) == "2026-12-01T10:00:00Z"
    assert render.state_meaning(3, 0, 0, until).startswith(
        "GRACE: paid requests are refused with 402 until a top-up"
    )
    assert "expires 2026-12-01T10:00:00Z" in render.state_meaning(3, 0, 0, until)
    assert render.state_meaning(4, -5, 0, until).startswith("EXPIRED since 2026-12-01T10:00:00Z")
    assert render.share(1, 3) == "33.3%" and render.share(2, 3) == "66.7%"
    assert render.duration(7 * 86400) == "7d" and render.duration(90) == "90s"


# ---------------------------------------------------------------- quotas and keys


async def test_quota_commands(cli: Cli) -> None:
    pid = new_project_id("cli")
    await ok(cli, "wallet", "create", pid, "--org", "org-cli")
    out = await ok(cli, "quota", "set", pid, "requests", "--limit", "100", "--per-seconds", "60")
    assert "requests: 100 per 1m (rate, sliding window)" in out
    out = await ok(cli, "quota", "set", pid, "inflight", "--limit", "4", "--concurrency")
    assert "inflight: at most 4 in flight (concurrency)" in out
    out = await ok(cli, "quota", "get", pid, "requests")
    assert out.strip() == "requests: 100 per 1m (rate, sliding window)"
    out = await ok(cli, "quota", "list", pid)
    assert sorted(out.strip().splitlines()) == [
        "inflight: at most 4 in flight (concurrency)",
        "requests: 100 per 1m (rate, sliding window)",
    ]
    out = await ok(cli, "quota", "delete", pid, "requests")
    assert out.startswith("deleted requests")
    code, _, err = await cli("quota", "get", pid, "requests")
    assert code == 1 and one_line_error(err).startswith("error: NOT_FOUND: ")
    code, _, err = await cli("quota", "set", pid, "x", "--limit", "1.5", "--concurrency")
    assert code == 2 and "--limit" in one_line_error(err)


async def test_key_commands(cli: Cli, authority: AuthorityServer) -> None:
    pid = new_project_id("cli")
    await ok(cli, "wallet", "create", pid, "--org", "org-cli")
    code, out, err = await cli("key", "issue", pid, "--name", "ci")
    assert code == 0
    secret = out.split("secret: ")[1].split()[0]
    assert secret.startswith("cg_") and len(secret) == 46
    assert "not shown again" in err
    key_id = out.split()[0]
    assert key_id.startswith("key_")
    # the key reads its own wallet through the CLI too
    code, out, _ = await cli("wallet", "show", pid, token=secret)
    assert code == 0 and pid in out
    out = await ok(cli, "key", "revoke", key_id)
    assert out.startswith(f"revoked {key_id}") and "revoked 20" in out
    code, _, err = await cli("wallet", "show", pid, token=secret)
    assert code == 1 and one_line_error(err).startswith("error: UNAUTHENTICATED: ")


# ---------------------------------------------------------------- export / import / verify


async def test_export_import_and_verify(
    cli: Cli, authority: AuthorityServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = new_project_id("cli")
    await ok(cli, "wallet", "create", pid, "--org", "org-cli", "--low-threshold", "10")
    await ok(cli, "wallet", "topup", pid, "77")
    await ok(cli, "quota", "set", pid, "rpm", "--limit", "60", "--per-seconds", "60")
    dump = tmp_path / "export.ndjson"
    code, _, err = await cli("export", "--out", str(dump))
    assert code == 0 and "exported" in err
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert "header" in records[0] and "trailer" in records[-1]
    code, out, _ = await cli("export")
    # the same stream to stdout; the header carries the export time, so the digest differs
    assert [json.loads(line) for line in out.splitlines()][1:-1] == records[1:-1]

    async with AuthorityServer(authority_config(f"sqlite:///{tmp_path / 'b.db'}")) as fresh:
        target = ("--authority", fresh.grpc_target, "--token", fresh.config.admin_token)
        code, out, err = await run(capsys, "import", "--in", str(dump), *target)
        assert code == 0, err
        assert f"digest {records[-1]['trailer']['digest']}" in out
        code, out, _ = await run(capsys, "wallet", "show", pid, "--json", *target)
        assert json.loads(out)["wallet"]["balance"] == "77"
        # importing again into a non-empty authority is refused, in one line
        code, _, err = await run(capsys, "import", "--in", str(dump), *target)
        assert code == 1 and one_line_error(err)

    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"header": {"format_version": 1}}\n{"entry": {"amount": 2.5}}\n')
    code, _, err = await cli("import", "--in", str(bad))
    assert code == 2 and "line 2: entry.amount" in one_line_error(err)

    code, out, err = await run(
        capsys, "authority", "verify", "--database", authority.config.database
    )
    assert code == 0, err
    assert out.strip().startswith("ok: ") and "balances match the ledger" in out

    # a balance that no longer matches its ledger is reported, exit 1
    db_path = authority.config.database.removeprefix("sqlite:///")

    def tamper() -> None:
        with sqlite3.connect(db_path) as db:
            db.execute("UPDATE wallets SET balance = balance + 1 WHERE project_id = ?", (pid,))

    await asyncio.to_thread(tamper)
    code, out, err = await run(
        capsys, "authority", "verify", "--database", authority.config.database
    )
    assert code == 1, (out, err)
    assert "difference: " in out and pid in out


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("amount", ["1.5", "-3", "1e3", "abc", "0", "1000000000000001"])
async def test_bad_amounts_exit_2_before_any_call(
    capsys: pytest.CaptureFixture[str], amount: str
) -> None:
    # nothing listens there: a call would exit 3, so exit 2 proves no call was made
    nowhere = f"127.0.0.1:{free_port()}"
    code, out, err = await run(
        capsys, "wallet", "topup", "acme", amount, "--authority", nowhere, "--token", "t"
    )
    assert code == 2 and out == ""
    assert "AMOUNT must be a positive integer in the smallest unit" in one_line_error(err)
    code, _, err = await run(
        capsys,
        "wallet",
        "adjust",
        "acme",
        "--kind",
        "refund",
        amount,
        "--reason",
        "r",
        "--authority",
        nowhere,
    )
    assert code == 2 and "AMOUNT" in one_line_error(err)


async def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await run(capsys, "wallet", "topup", "acme")
    assert code == 2 and "AMOUNT" in one_line_error(err)
    code, _, err = await run(capsys, "wallet", "adjust", "acme", "--kind", "gift", "5")
    assert code == 2 and "--kind" in one_line_error(err)
    code, _, err = await run(capsys, "wallet", "explain", "acme", "--since", "yesterday")
    assert code == 2 and "--since" in one_line_error(err)
    code, _, err = await run(
        capsys, "authority", "verify", "--database", "sqlite:////nonexistent/authority.db"
    )
    assert code == 2 and "no SQLite database" in one_line_error(err)


async def test_unreachable_authority_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    code, out, err = await run(capsys, "wallet", "show", "acme", "--authority", nowhere)
    assert code == 3 and out == ""
    assert one_line_error(err).startswith(f"error: authority unreachable at {nowhere}")


async def test_service_errors_are_one_line(cli: Cli) -> None:
    code, out, err = await cli("wallet", "show", "no-such-project")
    assert code == 1 and out == ""
    assert one_line_error(err).startswith("error: NOT_FOUND: ")
    code, _, err = await cli("wallet", "show", "acme", token="wrong")
    assert code == 1 and one_line_error(err).startswith("error: UNAUTHENTICATED: ")


async def test_serve_refuses_to_start_without_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDITGATE_ADMIN_TOKEN", raising=False)
    code, _, err = await run(capsys, "authority", "serve", "--database", "sqlite://:memory:")
    assert code == 2 and "admin token" in one_line_error(err)


# ---------------------------------------------------------------- checked before anything starts


def write_policy(tmp_path: Path, cost: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(f'[[routes]]\nname = "a"\nmethod = "GET"\npath = "/a"\ncost = {cost}\n')
    return path


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_gateway_serve_refuses_a_bad_policy_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, workers: str
) -> None:
    # Nothing listens at the Redis or authority addresses, and no worker is started: the
    # refusal comes first.
    serve = ("gateway", "serve", "--upstream", "http://127.0.0.1:9", "--workers", workers)
    bad = write_policy(tmp_path, "-5")
    code, out, err = await run(capsys, *serve, "--policy", str(bad))
    assert code == 2 and out == ""
    assert one_line_error(err) == (
        f"error: gateway serve: {bad}:5: routes[0].cost: must be an integer >= 0, got -5"
    )
    missing = tmp_path / "missing.toml"
    code, out, err = await run(capsys, *serve, "--policy", str(missing))
    assert code == 2 and out == ""
    assert one_line_error(err) == (
        f"error: gateway serve: --policy: {missing}: No such file or directory"
    )


@pytest.mark.parametrize(
    "upstream", ["127.0.0.1:9100", "localhost:9100", "ftp://127.0.0.1", "http://"]
)
async def test_gateway_serve_refuses_an_upstream_without_scheme_or_host(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, upstream: str
) -> None:
    policy = write_policy(tmp_path, "1")
    code, out, err = await run(
        capsys, "gateway", "serve", "--policy", str(policy), "--upstream", upstream
    )
    assert code == 2 and out == ""
    assert one_line_error(err) == (
        f"error: gateway serve: --upstream: {upstream!r} needs http:// or https:// and a host, "
        "e.g. http://127.0.0.1:9000"
    )


async def test_gateway_serve_refuses_an_upstream_with_a_query(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The request's path is appended to the upstream: http://h/?q=1/v1/chat is nobody's URL.
    policy = write_policy(tmp_path, "1")
    code, _, err = await run(
        capsys, "gateway", "serve", "--policy", str(policy), "--upstream", "http://h/?q=1"
    )
    assert code == 2 and "has a query or fragment" in one_line_error(err)


async def test_gateway_serve_and_flusher_refuse_a_redis_url_without_scheme(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, "1")
    gateway = ("gateway", "serve", "--policy", str(policy), "--upstream", "http://127.0.0.1:9")
    code, out, err = await run(capsys, *gateway, "--redis", "127.0.0.1:6379")
    assert code == 2 and out == ""
    assert one_line_error(err).startswith("error: gateway serve: --redis: ")
    code, out, err = await run(capsys, "flusher", "--token", "t", "--redis", "127.0.0.1:6379")
    assert code == 2 and out == ""
    assert one_line_error(err).startswith("error: flusher: --redis: ")


async def test_flusher_errors_go_to_stderr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = write_policy(tmp_path, "-5")
    code, out, err = await run(capsys, "flusher", "--token", "t", "--policy", str(bad))
    assert code == 2 and out == ""
    assert one_line_error(err) == (
        f"error: flusher: {bad}:5: routes[0].cost: must be an integer >= 0, got -5"
    )
    monkeypatch.delenv("CREDITGATE_ADMIN_TOKEN", raising=False)
    code, out, err = await run(capsys, "flusher")
    assert code == 2 and out == ""
    assert "--token" in one_line_error(err)


USAGE_ERRORS = [
    (
        ["gateway", "serve", "--policy", "p.toml", "--upstream", "http://h", "--listen", "x"],
        "error: creditgate gateway serve: argument --listen: expected HOST:PORT",
    ),
    (
        ["authority", "serve", "--grpc-listen", "nonsense"],
        "error: creditgate authority serve: argument --grpc-listen: expected HOST:PORT",
    ),
    (
        ["authority", "serve", "--http-listen", "127.0.0.1:70000"],
        "error: creditgate authority serve: argument --http-listen: expected HOST:PORT",
    ),
    (
        ["flusher", "--token", "t", "--gateway-id", "g" * 129],
        "error: creditgate flusher: argument --gateway-id: gateway_id is 129 characters long",
    ),
    (["wallet"], "error: creditgate wallet: the following arguments are required: COMMAND"),
    (["no-such-command"], "error: creditgate: argument COMMAND: invalid choice"),
]


@pytest.mark.parametrize(("argv", "expected"), USAGE_ERRORS)
async def test_usage_errors_of_every_command_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = await run(capsys, *argv)
    assert code == 2 and out == ""
    assert one_line_error(err).startswith(expected)


def test_authority_serve_refuses_an_unknown_database_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Called in this (the main) thread: serve installs signal handlers before it opens the store.
    monkeypatch.setenv("CREDITGATE_ADMIN_TOKEN", "t")
    listen = ("--grpc-listen", "127.0.0.1:0", "--http-listen", "")
    code = main(["authority", "serve", "--database", "mysql://db/credits", *listen])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert one_line_error(err) == "error: --database: unsupported database url 'mysql'"


async def test_authority_verify_refuses_an_unknown_database_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = await run(capsys, "authority", "verify", "--database", "mysql://db/credits")
    assert code == 2 and out == ""
    assert one_line_error(err) == "error: --database: unsupported database url 'mysql'"


# ---------------------------------------------------------------- the authority's rules, no call

MAX_GRACE_DAYS = validation.MAX_GRACE_SECONDS // 86400
MAX_GRACE, MAX_WINDOW = validation.MAX_GRACE_SECONDS, validation.MAX_WINDOW_SECONDS
REFUSED_BEFORE_ANY_CALL = [
    (
        ["wallet", "create", "bad id!", "--org", "o"],
        "error: PROJECT: 'bad id!' is not a valid project id "
        f"(must match {validation.PROJECT_ID_RE.pattern})",
    ),
    (["wallet", "create", "p", "--org", "Bad Org"], "error: --org: 'Bad Org' is not a valid"),
    (["wallet", "show", "bad id!"], "error: PROJECT: 'bad id!' is not a valid project id"),
    (
        ["wallet", "topup", "p", "5", "--request-id", "a b"],
        "error: --request-id: 'a b' is not a valid request id "
        f"(must match {validation.REQUEST_ID_RE.pattern})",
    ),
    (
        ["wallet", "adjust", "p", "--kind", "refund", "5", "--reason", " "],
        "error: --reason: is required",
    ),
    (
        ["wallet", "create", "p", "--org", "o", "--grace-seconds", str(MAX_GRACE + 1)],
        f"error: --grace-seconds must be an integer from 1 to {MAX_GRACE}",
    ),
    (
        ["wallet", "create", "p", "--org", "o", "--grace-days", str(MAX_GRACE_DAYS + 1)],
        f"error: --grace-days must be an integer from 1 to {MAX_GRACE_DAYS}",
    ),
    (
        ["quota", "set", "p", "Bad Name", "--limit", "1", "--concurrency"],
        "error: NAME: 'Bad Name' is not a valid quota name "
        f"(must match {validation.QUOTA_NAME_RE.pattern})",
    ),
    (["quota", "get", "p", "x" * 65], "error: NAME: "),
    (
        ["quota", "set", "p", "rpm", "--limit", "1", "--per-seconds", str(MAX_WINDOW + 1)],
        f"error: --per-seconds must be an integer from 1 to {MAX_WINDOW}",
    ),
    # What only the authority's check of the whole request knows: still refused before a call.
    (["key", "revoke", "nope"], "error: key_id: 'nope' is not a valid key id"),
    (
        ["wallet", "topup", "p", "5", "--reference", "r" * (validation.MAX_SHORT_TEXT + 1)],
        "error: reference: is ",
    ),
    (
        ["wallet", "explain", "p", "--since", "2026-02-01", "--until", "2026-01-01"],
        "error: since_ms: must be <= until_ms",
    ),
]


@pytest.mark.parametrize(("argv", "expected"), REFUSED_BEFORE_ANY_CALL)
async def test_input_the_authority_would_refuse_exits_2_before_any_call(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    # nothing listens there: a call would exit 3, so exit 2 proves no call was made
    nowhere = ("--authority", f"127.0.0.1:{free_port()}", "--token", "t")
    code, out, err = await run(capsys, *argv, *nowhere)
    assert code == 2 and out == ""
    assert one_line_error(err).startswith(expected)


@pytest.mark.parametrize(
    "argv",
    [
        ["wallet", "create", "p", "--org", "o", "--grace-seconds", str(MAX_GRACE)],
        ["wallet", "create", "p", "--org", "o", "--grace-days", str(MAX_GRACE_DAYS)],
        ["quota", "set", "p", "rpm", "--limit", "1", "--per-seconds", str(MAX_WINDOW)],
        ["quota", "set", "p", "a_b-9", "--limit", "1", "--concurrency"],
    ],
)
async def test_input_at_the_authoritys_limits_is_sent(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    code, _, err = await run(capsys, *argv, "--authority", nowhere, "--token", "t")
    assert code == 3, err  # accepted here: the call was tried


# ---------------------------------------------------------------- help


@pytest.mark.parametrize(
    "argv",
    [
        ["wallet", "show", "p"],
        ["wallet", "list"],
        ["wallet", "transactions", "p"],
        ["wallet", "explain", "p"],
        ["quota", "get", "p", "rpm"],
        ["quota", "list", "p"],
        ["export"],
        ["import", "--in", "dump.ndjson"],
    ],
)
async def test_read_only_commands_take_no_request_id(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = await run(capsys, *argv, "--request-id", "r1")
    assert code == 2 and out == ""
    assert "unrecognized arguments: --request-id r1" in one_line_error(err)


def leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from leaf_parsers(child)


MUTATIONS = {"create", "topup", "adjust", "set", "delete", "issue", "revoke"}


def test_authority_commands_explain_every_option_and_only_mutations_take_a_request_id() -> None:
    authority_commands = {"authority", "wallet", "quota", "key", "export", "import"}
    leaves = [p for p in leaf_parsers(build_parser()) if p.prog.split()[1] in authority_commands]
    assert len(leaves) == 17
    for parser in leaves:
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"
        options = {o for a in parser._actions for o in a.option_strings}
        is_mutation = parser.prog.split()[-1] in MUTATIONS
        assert ("--request-id" in options) == is_mutation, parser.prog


def test_authority_serve_help_shows_the_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "500")  # no wrapping inside the file name
    with pytest.raises(SystemExit) as exited:
        main(["authority", "serve", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "gRPC address (default 127.0.0.1:50051)" in text
    assert "REST/JSON address (default 127.0.0.1:8081;" in text
    assert "(env CREDITGATE_DATABASE, else sqlite:///./creditgate-authority.db)" in text


# ---------------------------------------------------------------- start line, export count


async def test_authority_serve_says_where_it_listens_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """`authority serve` prints one line once it serves (addresses, database), answers until
    SIGTERM, then exits 0."""
    grpc_port, http_port = free_port(), free_port()
    database = f"sqlite:///{tmp_path / 'served.db'}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway_plugin.cli",
        "authority",
        "serve",
        "--database",
        database,
        "--grpc-listen",
        f"127.0.0.1:{grpc_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        env=os.environ | {"CREDITGATE_ADMIN_TOKEN": "serve-test-token"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line == (
            f"creditgate authority pid {proc.pid}: gRPC on 127.0.0.1:{grpc_port}, "
            f"REST on http://127.0.0.1:{http_port}, database {database}\n"
        )
        headers = {"Authorization": "Bearer serve-test-token"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{http_port}/v1/wallets", headers=headers) as resp,
        ):
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:///./creditgate-authority.db", "sqlite:///./creditgate-authority.db"),
        ("sqlite://:memory:", "sqlite://:memory:"),
        (
            "postgresql://app:s3cret@db:5432/credits?schema=cg",
            "postgresql://app:***@db:5432/credits?schema=cg",
        ),
        ("postgresql://app:p@ss@db/credits", "postgresql://app:***@db/credits"),
        ("postgres://app@db1:5432,db2:5432/credits", "postgres://app@db1:5432,db2:5432/credits"),
        (
            "postgresql:///credits?host=/run/postgresql&password=s3cret&sslpassword=k3y",
            "postgresql:///credits?host=/run/postgresql&password=***&sslpassword=***",
        ),
    ],
)
def test_the_start_line_shows_no_database_password(url: str, shown: str) -> None:
    assert redacted_database(url) == shown


async def test_export_and_import_count_the_same_records(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = new_project_id("cli")
    await ok(cli, "wallet", "create", pid, "--org", "org-cli")
    await ok(cli, "wallet", "topup", pid, "5")
    dump = tmp_path / "export.ndjson"
    code, _, err = await cli("export", "--out", str(dump))
    assert code == 0, err
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    trailer = lines[-1]["trailer"]
    # The trailer and import count the records before the trailer, the header included.
    records = len(lines) - 1
    assert int(trailer["records"]) == records
    wallets = sum("wallet" in line for line in lines)
    assert err == (
        f"exported {records} records to {dump}: {wallets} wallets, "
        f"{trailer['ledger_entries']} ledger entries; digest {trailer['digest']}\n"
    )
    async with AuthorityServer(authority_config(f"sqlite:///{tmp_path / 'b.db'}")) as fresh:
        target = ("--authority", fresh.grpc_target, "--token", fresh.config.admin_token)
        code, out, err = await run(capsys, "import", "--in", str(dump), *target)
    assert code == 0, err
    assert out.startswith(f"imported {records} records: {wallets} wallets, ")
