"""`creditgate authority|wallet|quota|key|export|import`: the authority's commands (gRPC client).

Exit codes: 0 ok, 1 the authority refused (one line "error: CODE: message"), 2 usage or bad input
(checked before any call), 3 authority unreachable. Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from google.protobuf.message import Message

from creditservice import domain, errors, protojson, render, validation
from creditservice.client import AuthorityClient, AuthorityUnreachable
from creditservice.v1 import credit_pb2 as pb

EXIT_OK, EXIT_SERVICE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_AUTHORITY = "127.0.0.1:50051"
DEFAULT_DATABASE = "sqlite:///./creditgate-authority.db"  # as AuthorityConfig
DEFAULT_GRPC_LISTEN = "127.0.0.1:50051"  # as AuthorityConfig
DEFAULT_HTTP_LISTEN = "127.0.0.1:8081"  # as AuthorityConfig
MAX_AMOUNT = protojson.MAX_AMOUNT
# The authority's own limits (creditservice.validation): what it would refuse is refused here,
# before any call, by the same numbers.
_MAX_GRACE_DAYS = validation.MAX_GRACE_SECONDS // 86400
_DEFAULT_GRACE_DAYS = domain.DEFAULT_GRACE_PERIOD_SECONDS // 86400
_ID_RULE = f"must match {validation.PROJECT_ID_RE.pattern}"
_PROJECT_HELP = f"project id ({_ID_RULE})"
_REFERENCE_HELP = f"at most {validation.MAX_SHORT_TEXT} characters"
_QUOTA_NAME_HELP = f"quota name (must match {validation.QUOTA_NAME_RE.pattern})"
_MAX_TRANSACTIONS = 1_000_000
_ADJUST_KINDS = {"sla-credit": pb.SLA_CREDIT, "refund": pb.REFUND, "adjustment": pb.ADJUSTMENT}
_INTEGER = re.compile(r"-?[0-9]+\Z")

Action = Callable[[argparse.Namespace, AuthorityClient], Awaitable[int]]


class UsageError(Exception):
    """Bad command-line input, found before any call to the authority."""


class OneLineParser(argparse.ArgumentParser):
    """Reports a usage error in one line, not the usage block plus the error (README: errors are
    one line on stderr). `creditgate` itself uses it, and so every subcommand's parser does."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see --help)\n")


# ---------------------------------------------------------------- registration


def register(sub: argparse._SubParsersAction[Any]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--authority",
        default=os.environ.get("CREDITGATE_AUTHORITY", DEFAULT_AUTHORITY),
        metavar="HOST:PORT",
        help="authority gRPC address (env CREDITGATE_AUTHORITY, default %(default)s)",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("CREDITGATE_ADMIN_TOKEN"),
        help="bearer credential (env CREDITGATE_ADMIN_TOKEN)",
    )
    common.add_argument("--json", action="store_true", help="machine output (proto3 JSON)")
    # Only mutations take a request id: a read offering one would suggest it did something.
    mutation = argparse.ArgumentParser(add_help=False, parents=[common])
    mutation.add_argument(
        "--request-id",
        help="idempotency id: a repeat with the same id changes nothing and answers the first "
        "result (default: a new uuid per invocation)",
    )
    _register_authority(sub)
    _register_wallet(sub, common, mutation)
    _register_quota(sub, common, mutation)
    _register_key(sub, mutation)

    p = sub.add_parser(
        "export", parents=[common], help="write the whole authority as NDJSON ExportRecords"
    )
    p.add_argument("--out", default="-", metavar="FILE", help="output file (default - = stdout)")
    p.set_defaults(func=_remote(_export))
    p = sub.add_parser("import", parents=[common], help="rebuild an empty authority from an export")
    p.add_argument("--in", dest="infile", required=True, metavar="FILE", help="NDJSON, - = stdin")
    p.set_defaults(func=_remote(_import))


def _group(sub: argparse._SubParsersAction[Any], name: str, help_: str) -> Any:
    parser = sub.add_parser(name, help=help_)
    return parser.add_subparsers(
        dest=f"{name}_command", required=True, metavar="COMMAND", parser_class=OneLineParser
    )


def _database_argument(p: argparse.ArgumentParser) -> None:
    # The help names the built-in default, not the environment's value: that may be a
    # PostgreSQL DSN with a password in it.
    p.add_argument(
        "--database",
        default=os.environ.get("CREDITGATE_DATABASE", DEFAULT_DATABASE),
        metavar="URL",
        help="sqlite:///file.db or postgresql://user@host/db[?schema=name] "
        f"(env CREDITGATE_DATABASE, else {DEFAULT_DATABASE})",
    )


def _listen_address(text: str) -> str:
    """HOST:PORT as AuthorityConfig takes it (port 0 = any free port)."""
    _, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _optional_listen_address(text: str) -> str:
    return text and _listen_address(text)


def _register_authority(sub: argparse._SubParsersAction[Any]) -> None:
    group = _group(sub, "authority", "run or check the credit authority")
    p = group.add_parser("serve", help="run the authority (gRPC + REST)")
    _database_argument(p)
    p.add_argument(
        "--grpc-listen",
        type=_listen_address,
        default=DEFAULT_GRPC_LISTEN,
        metavar="HOST:PORT",
        help="gRPC address (default %(default)s)",
    )
    p.add_argument(
        "--http-listen",
        type=_optional_listen_address,
        default=DEFAULT_HTTP_LISTEN,
        metavar="HOST:PORT",
        help='REST/JSON address (default %(default)s; "" = no REST)',
    )
    p.add_argument(
        "--admin-token", help="admin credential (default: env CREDITGATE_ADMIN_TOKEN, required)"
    )
    p.set_defaults(func=_serve)
    p = group.add_parser("verify", help="check that every balance matches the ledger")
    _database_argument(p)
    p.set_defaults(func=_verify)


def _register_wallet(
    sub: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    mutation: argparse.ArgumentParser,
) -> None:
    group = _group(sub, "wallet", "prepaid wallets and their ledger")
    p = group.add_parser("create", parents=[mutation], help="create a project's wallet")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.add_argument("--org", required=True, help=f"organization id (as PROJECT: {_ID_RULE})")
    p.add_argument("--low-threshold", default="0", metavar="N", help="low-balance threshold")
    grace = p.add_mutually_exclusive_group()
    grace.add_argument(
        "--grace-days",
        metavar="N",
        help="days a wallet at balance <= 0 stays in GRACE (paid requests 402) before it is "
        f"EXPIRED (all requests 403); 1 to {_MAX_GRACE_DAYS}, default {_DEFAULT_GRACE_DAYS}",
    )
    grace.add_argument(
        "--grace-seconds",
        metavar="N",
        help=f"the grace period in seconds instead (1 to {validation.MAX_GRACE_SECONDS})",
    )
    p.add_argument("--overdraft", default="0", metavar="N", help="overdraft allowance")
    p.set_defaults(func=_remote(_wallet_create))

    p = group.add_parser("show", parents=[common], help="a wallet and what its state means now")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.set_defaults(func=_remote(_wallet_show))

    p = group.add_parser("list", parents=[common], help="list wallets")
    p.add_argument("--org", default="", help="only this organization (default: all)")
    p.set_defaults(func=_remote(_wallet_list))

    p = group.add_parser("topup", parents=[mutation], help="add prepaid credits")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.add_argument("amount", metavar="AMOUNT", help="integer, in the smallest unit")
    p.add_argument("--reference", default="", help=f"e.g. the payment id; {_REFERENCE_HELP}")
    p.set_defaults(func=_remote(_wallet_topup))

    p = group.add_parser("adjust", parents=[mutation], help="SLA credit, refund or adjustment")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.add_argument(
        "--kind",
        required=True,
        choices=tuple(_ADJUST_KINDS),
        help="sla-credit or refund: a credit (AMOUNT > 0); adjustment: a correction either way",
    )
    p.add_argument("amount", metavar="AMOUNT", help="integer; negative only for --kind adjustment")
    p.add_argument(
        "--reason",
        required=True,
        help=f"why, kept in the ledger entry (at most {validation.MAX_TEXT} characters)",
    )
    p.add_argument("--reference", default="", help=f"e.g. a ticket id; {_REFERENCE_HELP}")
    p.set_defaults(func=_remote(_wallet_adjust))

    p = group.add_parser("transactions", parents=[common], help="ledger entries, newest first")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.add_argument(
        "--limit",
        default="20",
        metavar="N",
        help=f"the N newest entries (1 to {_MAX_TRANSACTIONS}, default %(default)s)",
    )
    p.set_defaults(func=_remote(_wallet_transactions))

    p = group.add_parser("explain", parents=[common], help="usage broken down by meter")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.add_argument(
        "--since",
        metavar="ISO",
        help="from this time, e.g. 2026-11-01 or 2026-11-01T00:00Z (UTC without an offset; "
        "default: the beginning)",
    )
    p.add_argument("--until", metavar="ISO", help="up to this time (default: now)")
    p.set_defaults(func=_remote(_wallet_explain))


def _register_quota(
    sub: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    mutation: argparse.ArgumentParser,
) -> None:
    group = _group(sub, "quota", "rate and concurrency quotas")
    p = group.add_parser("set", parents=[mutation], help="create or replace a quota")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.add_argument("name", metavar="NAME", help=_QUOTA_NAME_HELP)
    p.add_argument(
        "--limit", required=True, metavar="N", help="requests per window, or at most in flight"
    )
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--per-seconds",
        metavar="W",
        help=f"rate: LIMIT per W seconds (1 to {validation.MAX_WINDOW_SECONDS})",
    )
    kind.add_argument("--concurrency", action="store_true", help="at most LIMIT in flight")
    p.set_defaults(func=_remote(_quota_set))
    for name, parent, action, text in (
        ("get", common, _quota_get, "show a quota"),
        ("delete", mutation, _quota_delete, "delete a quota"),
    ):
        p = group.add_parser(name, parents=[parent], help=text)
        p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
        p.add_argument("name", metavar="NAME", help=_QUOTA_NAME_HELP)
        p.set_defaults(func=_remote(action))
    p = group.add_parser("list", parents=[common], help="a project's quotas")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.set_defaults(func=_remote(_quota_list))


def _register_key(sub: argparse._SubParsersAction[Any], mutation: argparse.ArgumentParser) -> None:
    group = _group(sub, "key", "project API keys")
    p = group.add_parser("issue", parents=[mutation], help="issue a key (secret shown once)")
    p.add_argument("project", metavar="PROJECT", help=_PROJECT_HELP)
    p.add_argument("--name", default="", help="a label for people, e.g. ci")
    p.set_defaults(func=_remote(_key_issue))
    p = group.add_parser("revoke", parents=[mutation], help="revoke a key")
    p.add_argument("key_id", metavar="KEY_ID", help="e.g. key_0123456789abcdef")
    p.set_defaults(func=_remote(_key_revoke))


# ---------------------------------------------------------------- running


def _remote(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def go() -> int:
            async with AuthorityClient(args.authority, args.token) as client:
                return await action(args, client)

        return _guard(go)

    return run


def _guard(go: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command's coroutine; every failure becomes one line on stderr and an exit code."""
    try:
        return asyncio.run(go())
    except UsageError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except AuthorityUnreachable as exc:
        return _fail(EXIT_UNREACHABLE, str(exc))
    except errors.ServiceError as exc:
        if type(exc) is errors.ServiceError:
            return _fail(EXIT_SERVICE, exc.message)
        return _fail(EXIT_SERVICE, f"{exc.code.name}: {exc.message}")
    except OSError as exc:
        return _fail(EXIT_SERVICE, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    except KeyboardInterrupt:
        return 130


def _fail(code: int, message: str) -> int:
    first = " ".join(message.split())  # one line, whatever the server sent
    print(f"error: {first}", file=sys.stderr)
    return code


def _out(args: argparse.Namespace, message: Message, human: str) -> None:
    if args.json:
        print(json.dumps(protojson.encode(message), indent=2))
    else:
        print(human)


def _request_id(args: argparse.Namespace) -> str:
    rid: str | None = args.request_id
    if rid is None:
        return f"cli-{uuid.uuid4()}"
    return _checked(validation.request_id, rid, "--request-id")


def _project(args: argparse.Namespace) -> str:
    return _checked(validation.project_id, args.project, "PROJECT")


def _quota_name(args: argparse.Namespace) -> str:
    return _checked(validation.quota_name, args.name, "NAME")


def _required_text(value: str, name: str) -> None:
    validation.text(value, name, required=True)


def _checked(check: Callable[[str, str], None], value: str, name: str) -> str:
    """`value` if the authority's own rule for it (creditservice.validation) accepts it, else a
    UsageError naming the argument as the command line spells it."""
    try:
        check(value, name)
    except errors.InvalidArgument as exc:
        raise UsageError(exc.message) from exc
    return value


# The authority's boundary check of every request the CLI sends. Input it would refuse with
# INVALID_ARGUMENT is refused here, before any call and by the same rule: exit 2, not 1. The
# checks above only name the argument better for the common mistakes.
_REQUEST_CHECKS: dict[str, Callable[[Any], None]] = {
    "CreateWallet": validation.create_wallet,
    "GetWallet": validation.get_wallet,
    "ListWallets": validation.list_wallets,
    "TopUp": validation.top_up,
    "Adjust": validation.adjust,
    "ListTransactions": validation.list_transactions,
    "ExplainUsage": validation.explain_usage,
    "SetQuota": validation.set_quota,
    "GetQuota": validation.get_quota,
    "ListQuotas": validation.list_quotas,
    "DeleteQuota": validation.delete_quota,
    "IssueApiKey": validation.issue_api_key,
    "RevokeApiKey": validation.revoke_api_key,
}


async def _call(c: AuthorityClient, rpc: str, request: Message) -> Any:
    try:
        _REQUEST_CHECKS[rpc](request)
    except errors.InvalidArgument as exc:
        raise UsageError(exc.message) from exc
    return await c.call(rpc, request)


def parse_amount(text: str, name: str = "AMOUNT", *, allow_negative: bool = False) -> int:
    """An integer amount in the smallest unit; anything else is a UsageError naming it."""
    rule = "a non-zero integer" if allow_negative else "a positive integer"
    hint = f"{name} must be {rule} in the smallest unit (at most {MAX_AMOUNT}), got {text!r}"
    if not _INTEGER.match(text):
        raise UsageError(hint)
    value = int(text)
    if value == 0 or (value < 0 and not allow_negative) or abs(value) > MAX_AMOUNT:
        raise UsageError(hint)
    return value


def parse_count(text: str, name: str, *, minimum: int = 0, maximum: int = MAX_AMOUNT) -> int:
    if not _INTEGER.match(text) or not minimum <= int(text) <= maximum:
        raise UsageError(f"{name} must be an integer from {minimum} to {maximum}, got {text!r}")
    return int(text)


def parse_time(text: str | None, name: str) -> int:
    """ISO 8601 (UTC when no offset is given) -> ms since the epoch; None -> 0."""
    if text is None:
        return 0
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        message = f"{name} must be an ISO 8601 time like 2026-11-01T00:00Z, got {text!r}"
        raise UsageError(message) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


# ---------------------------------------------------------------- authority


def _serve(args: argparse.Namespace) -> int:
    token = args.admin_token or os.environ.get("CREDITGATE_ADMIN_TOKEN")
    if not token:
        return _fail(EXIT_USAGE, "no admin token: pass --admin-token or set CREDITGATE_ADMIN_TOKEN")
    from creditservice.server import AuthorityConfig, serve_forever

    config = AuthorityConfig(
        database=args.database,
        grpc_listen=args.grpc_listen,
        http_listen=args.http_listen,
        admin_token=token,
    )
    try:
        asyncio.run(serve_forever(config))
    except KeyboardInterrupt:
        return EXIT_OK
    except errors.InvalidArgument as exc:
        # Raised at start only, by open_store: a database URL it cannot read.
        return _fail(EXIT_USAGE, f"--database: {exc.message}")
    except errors.ServiceError as exc:
        return _fail(EXIT_SERVICE, f"{exc.code.name}: {exc.message}")
    except OSError as exc:
        return _fail(EXIT_SERVICE, f"cannot start the authority: {exc}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    database: str = args.database
    local = database.removeprefix("sqlite:///")
    if database.startswith("sqlite:///") and not Path(local).is_file():
        # Opening would create an empty database and report it as consistent.
        return _fail(EXIT_USAGE, f"--database: no SQLite database at {local}")

    async def go() -> int:
        from creditservice.storage import open_store

        try:
            store = await open_store(database)
        except errors.InvalidArgument as exc:
            raise UsageError(f"--database: {exc.message}") from exc
        try:
            wallets = entries = 0
            async for record in store.export():
                kind = record.WhichOneof("record")
                wallets += kind == "wallet"
                entries += kind == "entry"
            differences = await store.verify()
        finally:
            await store.close()
        for line in differences:
            print(f"difference: {line}")
        if differences:
            print(f"FAILED: {len(differences)} difference(s) between balances and the ledger")
            return EXIT_SERVICE
        print(f"ok: {wallets} wallets, {entries} ledger entries, balances match the ledger")
        return EXIT_OK

    return _guard(go)


# ---------------------------------------------------------------- wallets


async def _wallet_create(args: argparse.Namespace, c: AuthorityClient) -> int:
    grace = 0
    if args.grace_days is not None:
        days = parse_count(args.grace_days, "--grace-days", minimum=1, maximum=_MAX_GRACE_DAYS)
        grace = days * 86400
    elif args.grace_seconds is not None:
        grace = parse_count(
            args.grace_seconds, "--grace-seconds", minimum=1, maximum=validation.MAX_GRACE_SECONDS
        )
    request = pb.CreateWalletRequest(
        request_id=_request_id(args),
        project_id=_project(args),
        organization_id=_checked(validation.organization_id, args.org, "--org"),
        low_balance_threshold=parse_count(args.low_threshold, "--low-threshold"),
        grace_period_seconds=grace,
        overdraft_limit=parse_count(args.overdraft, "--overdraft"),
    )
    response = await _call(c, "CreateWallet", request)
    _out(args, response, "created\n" + render.wallet_text(response.wallet))
    return EXIT_OK


async def _wallet_show(args: argparse.Namespace, c: AuthorityClient) -> int:
    response = await _call(c, "GetWallet", pb.GetWalletRequest(project_id=_project(args)))
    _out(args, response, render.wallet_text(response.wallet))
    return EXIT_OK


async def _wallet_list(args: argparse.Namespace, c: AuthorityClient) -> int:
    if args.org:
        _checked(validation.organization_id, args.org, "--org")
    wallets: list[pb.Wallet] = []
    token = ""
    while True:
        request = pb.ListWalletsRequest(organization_id=args.org, page_size=1000, page_token=token)
        page = await _call(c, "ListWallets", request)
        wallets.extend(page.wallets)
        token = page.next_page_token
        if not token:
            break
    _out(args, pb.ListWalletsResponse(wallets=wallets), render.wallet_table(wallets))
    return EXIT_OK


async def _wallet_topup(args: argparse.Namespace, c: AuthorityClient) -> int:
    request = pb.TopUpRequest(
        request_id=_request_id(args),
        project_id=_project(args),
        amount=parse_amount(args.amount),
        reference=args.reference,
    )
    response = await _call(c, "TopUp", request)
    human = f"topped up {request.amount} (entry {response.entry.seq})\n"
    _out(args, response, human + render.wallet_text(response.wallet))
    return EXIT_OK


async def _wallet_adjust(args: argparse.Namespace, c: AuthorityClient) -> int:
    kind = _ADJUST_KINDS[args.kind]
    request = pb.AdjustRequest(
        request_id=_request_id(args),
        project_id=_project(args),
        kind=kind,
        amount=parse_amount(args.amount, allow_negative=kind == pb.ADJUSTMENT),
        reason=_checked(_required_text, args.reason, "--reason"),
        reference=args.reference,
    )
    response = await _call(c, "Adjust", request)
    human = f"{args.kind} {response.entry.amount:+d} (entry {response.entry.seq})\n"
    _out(args, response, human + render.wallet_text(response.wallet))
    return EXIT_OK


async def _wallet_transactions(args: argparse.Namespace, c: AuthorityClient) -> int:
    limit = parse_count(args.limit, "--limit", minimum=1, maximum=_MAX_TRANSACTIONS)
    project = _project(args)
    entries: list[pb.LedgerEntry] = []
    token = ""
    while len(entries) < limit:
        request = pb.ListTransactionsRequest(
            project_id=project, page_size=min(limit - len(entries), 1000), page_token=token
        )
        page = await _call(c, "ListTransactions", request)
        entries.extend(page.entries)
        token = page.next_page_token
        if not token or not page.entries:
            break
    entries = entries[:limit]
    human = render.ledger_table(entries) if entries else "no ledger entries"
    _out(args, pb.ListTransactionsResponse(entries=entries, next_page_token=token), human)
    return EXIT_OK


async def _wallet_explain(args: argparse.Namespace, c: AuthorityClient) -> int:
    request = pb.ExplainUsageRequest(
        project_id=_project(args),
        since_ms=parse_time(args.since, "--since"),
        until_ms=parse_time(args.until, "--until"),
    )
    response = await _call(c, "ExplainUsage", request)
    _out(args, response, render.usage_text(response, request.since_ms, request.until_ms))
    return EXIT_OK


# ---------------------------------------------------------------- quotas


async def _quota_set(args: argparse.Namespace, c: AuthorityClient) -> int:
    project, name = _project(args), _quota_name(args)
    limit = parse_count(args.limit, "--limit", minimum=1)
    if args.concurrency:
        quota = pb.Quota(project_id=project, name=name, algorithm=pb.CONCURRENCY, limit=limit)
    else:
        window = parse_count(
            args.per_seconds, "--per-seconds", minimum=1, maximum=validation.MAX_WINDOW_SECONDS
        )
        quota = pb.Quota(
            project_id=project,
            name=name,
            algorithm=pb.SLIDING_WINDOW,
            limit=limit,
            window_seconds=window,
        )
    request = pb.SetQuotaRequest(request_id=_request_id(args), quota=quota)
    response = await _call(c, "SetQuota", request)
    _out(args, response, "set " + render.quota_line(response.quota))
    return EXIT_OK


async def _quota_get(args: argparse.Namespace, c: AuthorityClient) -> int:
    request = pb.GetQuotaRequest(project_id=_project(args), name=_quota_name(args))
    response = await _call(c, "GetQuota", request)
    _out(args, response, render.quota_line(response.quota))
    return EXIT_OK


async def _quota_delete(args: argparse.Namespace, c: AuthorityClient) -> int:
    request = pb.DeleteQuotaRequest(
        request_id=_request_id(args), project_id=_project(args), name=_quota_name(args)
    )
    response = await _call(c, "DeleteQuota", request)
    _out(args, response, "deleted " + render.quota_line(response.quota))
    return EXIT_OK


async def _quota_list(args: argparse.Namespace, c: AuthorityClient) -> int:
    response = await _call(c, "ListQuotas", pb.ListQuotasRequest(project_id=_project(args)))
    _out(args, response, render.quota_table(response.quotas))
    return EXIT_OK


# ---------------------------------------------------------------- keys


async def _key_issue(args: argparse.Namespace, c: AuthorityClient) -> int:
    request = pb.IssueApiKeyRequest(
        request_id=_request_id(args), project_id=_project(args), name=args.name
    )
    response = await _call(c, "IssueApiKey", request)
    if not response.secret:
        human = (
            f"{render.key_line(response.key)}\n"
            "this request id was used before: the secret was shown then and is not shown again"
        )
    else:
        human = f"{render.key_line(response.key)}\nsecret: {response.secret}"
    _out(args, response, human)
    if response.secret:
        print(
            "warning: store this secret now; it is not shown again (only its hash is kept)",
            file=sys.stderr,
        )
    return EXIT_OK


async def _key_revoke(args: argparse.Namespace, c: AuthorityClient) -> int:
    request = pb.RevokeApiKeyRequest(request_id=_request_id(args), key_id=args.key_id)
    response = await _call(c, "RevokeApiKey", request)
    _out(args, response, "revoked " + render.key_line(response.key))
    return EXIT_OK


# ---------------------------------------------------------------- export / import


async def _export(args: argparse.Namespace, c: AuthorityClient) -> int:
    records = c.stream("Export", pb.ExportRequest())
    if args.out == "-":
        await _write_records(records, sys.stdout)
        return EXIT_OK
    target = Path(args.out)
    partial = target.with_name(target.name + ".partial")
    # A failed export leaves no file that looks complete.
    try:
        with partial.open("w", encoding="utf-8") as fh:
            written = await _write_records(records, fh)
        if written.trailer is None:
            raise errors.ServiceError("the export stream ended without a trailer: incomplete")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    print(
        f"exported {written.records} records to {target}: {written.wallets} wallets, "
        f"{written.trailer.ledger_entries} ledger entries; digest {written.trailer.digest}",
        file=sys.stderr,
    )
    return EXIT_OK


@dataclass
class _Written:
    """What an export wrote. `records` counts as the trailer and import do: the trailer itself
    is not a record of the authority, the header is (the digest covers it)."""

    records: int = 0
    wallets: int = 0
    trailer: pb.ExportTrailer | None = None


async def _write_records(records: AsyncIterator[pb.ExportRecord], fh: IO[str]) -> _Written:
    written = _Written()
    async for record in records:
        fh.write(protojson.dumps(record) + "\n")
        kind = record.WhichOneof("record")
        if kind == "trailer":
            written.trailer = record.trailer
        else:
            written.records += 1
            written.wallets += kind == "wallet"
    fh.flush()
    return written


async def _import(args: argparse.Namespace, c: AuthorityClient) -> int:
    source = await asyncio.to_thread(_checked_source, args.infile)

    async def records() -> AsyncIterator[pb.ExportRecord]:
        for record in _parse_records(source()):
            yield record

    response = await c.import_records(records())
    human = (
        f"imported {response.records} records: {response.wallets} wallets, "
        f"{response.ledger_entries} ledger entries; digest {response.digest}"
    )
    _out(args, response, human)
    return EXIT_OK


def _checked_source(infile: str) -> Callable[[], Iterator[str]]:
    """The lines of the export file, each checked first: a bad line must not leave half an
    import behind."""
    if infile == "-":
        lines = sys.stdin.read().splitlines()

        def from_stdin() -> Iterator[str]:
            return iter(lines)

        source = from_stdin
    else:
        path = Path(infile)
        if not path.is_file():
            raise UsageError(f"--in: no such file {infile!r}")

        def from_file() -> Iterator[str]:
            with path.open(encoding="utf-8") as fh:
                yield from fh

        source = from_file
    for _ in _parse_records(source()):
        pass
    return source


def _parse_records(lines: Iterator[str]) -> Iterator[pb.ExportRecord]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield protojson.decode_line(pb.ExportRecord, line, lineno)
        except errors.InvalidArgument as exc:
            raise UsageError(f"--in: {exc.message}") from exc
