"""`creditgate demo`: Redis, the authority, the gateway and a sample upstream in one process.

Everything it creates lives in the state directory, so a second run reuses project, key and ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from admission import native
from admission.policy import Policy, parse_policy
from gateway_plugin.config import GatewayConfig
from gateway_plugin.proxy import ProxyConfig, app_runner, build_gateway_app
from gateway_plugin.redis_server import INSTALL_HINT, RedisServer, find_redis_server
from gateway_plugin.sample_upstream import make_sample_upstream

if TYPE_CHECKING:
    from creditservice.core import CreditCore

PROJECT = "demo"
ORGANIZATION = "demo-org"
CREDITS = 1000
TOP_UP_BELOW = 200
EXPENSIVE_COST = 5000  # more than the wallet ever holds: the 402 example
RATE_LIMIT, RATE_WINDOW = 5, 10
CONCURRENCY = 4

DEMO_POLICY = f"""\
# The demo's policy: two metered routes under a small rate quota, one route too
# expensive for the demo wallet. Anything else passes through unmetered.
[settings]
unmatched = "pass"
credit_retry_after_seconds = 30

[quotas.requests]
kind = "rate"
limit = {RATE_LIMIT}
window_seconds = {RATE_WINDOW}

[quotas.concurrent]
kind = "concurrency"
limit = {CONCURRENCY}

[[routes]]
name = "hello"
method = "GET"
path = "/v1/hello"
cost = 1
quotas = ["requests", "concurrent"]

[[routes]]
name = "generate"
method = "POST"
path = "/v1/generate"
cost = 10
quotas = ["requests", "concurrent"]

[[routes]]
name = "report"
method = "POST"
path = "/v1/report"
cost = {EXPENSIVE_COST}
quotas = ["concurrent"]
"""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    state_dir: Path
    port: int = 8080
    traffic: bool = False
    check: bool = False
    exit_after: float | None = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    admitted: int
    loop: tuple[int, ...]
    credits: int
    problems: tuple[str, ...] = ()  # bodies of unexpected answers, to explain a failure

    @property
    def ok(self) -> bool:
        return (
            self.admitted == 200 and 429 in self.loop and self.credits == 402 and not self.problems
        )


def demo_policy() -> Policy:
    return parse_policy(DEMO_POLICY, "<creditgate demo policy>")


def curl_lines(base: str, secret: str) -> list[str]:
    auth = f"-H 'Authorization: Bearer {secret}'"
    return [
        f"curl -i {auth} {base}/v1/hello",
        f"for i in $(seq 8); do curl -s -o /dev/null -w '%{{http_code}}\\n' {auth} "
        f"{base}/v1/hello; done",
        f"curl -i -X POST {auth} {base}/v1/report",
    ]


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    if path.exists():
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    return value


async def provision(core: CreditCore, state_dir: Path) -> tuple[str, int]:
    """Wallet, credits, quotas and an API key for the demo project; returns (secret, balance).

    Idempotent: fixed request ids for the one-time steps, and the key secret is kept in the state
    directory because the authority stores only its hash.
    """
    from creditservice.errors import NotFound
    from creditservice.principal import ADMIN
    from creditservice.v1 import credit_pb2 as pb

    c = core
    try:
        wallet = (await c.GetWallet(pb.GetWalletRequest(project_id=PROJECT), ADMIN)).wallet
    except NotFound:
        await c.CreateWallet(
            pb.CreateWalletRequest(
                request_id="demo-create-wallet",
                project_id=PROJECT,
                organization_id=ORGANIZATION,
                low_balance_threshold=100,
            ),
            ADMIN,
        )
        wallet = (
            await c.TopUp(
                pb.TopUpRequest(
                    request_id="demo-initial-topup",
                    project_id=PROJECT,
                    amount=CREDITS,
                    reference="demo",
                ),
                ADMIN,
            )
        ).wallet
    if wallet.balance < TOP_UP_BELOW:
        wallet = (
            await c.TopUp(
                pb.TopUpRequest(
                    request_id=f"demo-topup-{secrets.token_hex(8)}",
                    project_id=PROJECT,
                    amount=CREDITS - wallet.balance,
                    reference="demo refill",
                ),
                ADMIN,
            )
        ).wallet
    for name, algorithm, limit, window in (
        ("requests", pb.SLIDING_WINDOW, RATE_LIMIT, RATE_WINDOW),
        ("concurrent", pb.CONCURRENCY, CONCURRENCY, 0),
    ):
        await c.SetQuota(
            pb.SetQuotaRequest(
                request_id=f"demo-quota-{name}-{limit}-{window}",
                quota=pb.Quota(
                    project_id=PROJECT,
                    name=name,
                    algorithm=algorithm,
                    limit=limit,
                    window_seconds=window,
                ),
            ),
            ADMIN,
        )
    key_file = state_dir / "api-key"
    if key_file.exists():
        secret = key_file.read_text(encoding="utf-8").strip()
        key_hash = hashlib.sha256(secret.encode()).hexdigest()
        with contextlib.suppress(NotFound):
            key = (await c.ResolveApiKey(pb.ResolveApiKeyRequest(key_hash=key_hash), ADMIN)).key
            if key.project_id == PROJECT and not key.revoked_at_ms:
                return secret, int(wallet.balance)
    issued = await c.IssueApiKey(
        pb.IssueApiKeyRequest(
            request_id=f"demo-key-{secrets.token_hex(8)}", project_id=PROJECT, name="demo"
        ),
        ADMIN,
    )
    key_file.unlink(missing_ok=True)
    return _secret_file(key_file, lambda: str(issued.secret)), int(wallet.balance)


# What the README promises with each status of the three curl lines.
_PROMISED: dict[int, tuple[str, ...]] = {
    200: ("RateLimit-Policy", "RateLimit"),
    429: ("Retry-After", "RateLimit-Policy", "RateLimit"),
    402: ("Retry-After",),
}
_PROBLEM_JSON = "application/problem+json"


async def run_check(base: str, secret: str) -> CheckResult:
    """The three curl lines, made by the demo itself: the statuses, and the headers and body
    type the README says each status comes with."""
    auth = {"Authorization": f"Bearer {secret}"}
    problems: list[str] = []

    async def call(http: aiohttp.ClientSession, method: str, path: str, expect: set[int]) -> int:
        async with http.request(method, base + path) as r:
            body = await r.text()
            if r.status not in expect:
                problems.append(f"{method} {path} -> {r.status} {body[:300]}")
            missing = [h for h in _PROMISED.get(r.status, ()) if h not in r.headers]
            if missing:
                problems.append(f"{method} {path} -> {r.status} without {', '.join(missing)}")
            if r.status >= 400 and r.content_type != _PROBLEM_JSON:
                problems.append(f"{method} {path} -> {r.status} as {r.content_type}")
            return r.status

    async with aiohttp.ClientSession(headers=auth) as http:
        admitted = await call(http, "GET", "/v1/hello", {200})
        loop = [await call(http, "GET", "/v1/hello", {200, 429}) for _ in range(8)]
        credits = await call(http, "POST", "/v1/report", {402})
    return CheckResult(admitted, tuple(loop), credits, tuple(problems))


async def drive_traffic(
    base: str, secret: str, stop: asyncio.Event, per_second: float = 4.0
) -> None:
    """A bounded trickle of mixed requests to the demo's own loopback gateway."""
    auth = {"Authorization": f"Bearer {secret}"}
    calls = [
        ("GET", "/v1/hello", None),
        ("POST", "/v1/generate", {"prompt": "count my words"}),
        ("GET", "/v1/hello", None),
        ("POST", "/v1/report", None),
    ]
    i = 0
    async with aiohttp.ClientSession(headers=auth) as http:
        while not stop.is_set():
            method, path, body = calls[i % len(calls)]
            i += 1
            with contextlib.suppress(aiohttp.ClientError):
                async with http.request(method, base + path, json=body) as r:
                    await r.read()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / per_second)


async def _start_site(
    app: web.Application, host: str, port: int, shutdown_timeout: float = 10.0
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = any free port); returns the runner and the bound port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    runner = app_runner(app, shutdown_timeout)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner, int(sock.getsockname()[1])


def _say(text: str = "") -> None:
    try:
        print(text, flush=True)
    except OSError:
        # The terminal is gone (closed: SIGHUP, EIO) or the pipe's reader left: the demo must
        # still stop in order, so it goes on without an output.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces stdout until exit


async def _main(opts: DemoOptions) -> int:
    from creditservice.server import AuthorityConfig, AuthorityServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: terminal closed
        loop.add_signal_handler(sig, stop.set)
    state = opts.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    exit_code = 0
    async with contextlib.AsyncExitStack() as stack:
        redis_url = os.environ.get("REDIS_URL", "")
        redis_note = "from REDIS_URL"
        if not redis_url:
            from gateway_plugin.redis_server import start_redis_server_async

            redis: RedisServer = await start_redis_server_async(state / "redis")
            stack.callback(redis.stop)
            redis_url = redis.url
            redis_note = f"redis-server pid {redis.pid}, started by the demo"
        token = os.environ.get("CREDITGATE_ADMIN_TOKEN") or _secret_file(
            state / "admin-token", lambda: "admin-" + secrets.token_urlsafe(24)
        )
        authority = await stack.enter_async_context(
            AuthorityServer(
                AuthorityConfig(
                    database=f"sqlite:///{state / 'authority.db'}",
                    grpc_listen="127.0.0.1:0",
                    http_listen="127.0.0.1:0",
                    admin_token=token,
                )
            )
        )
        secret, balance = await provision(authority.core, state)

        upstream_runner, upstream_port = await _start_site(make_sample_upstream(), "127.0.0.1", 0)
        stack.push_async_callback(upstream_runner.cleanup)
        upstream = f"http://127.0.0.1:{upstream_port}"
        gateway = GatewayConfig(
            policy=demo_policy(),
            redis_url=redis_url,
            authority_target=authority.grpc_target,
            authority_token=token,
            gateway_id=f"demo-{os.getpid()}",
        )
        app = build_gateway_app(gateway, ProxyConfig(upstream=upstream))
        try:
            gateway_runner, port = await _start_site(app, "127.0.0.1", opts.port)
        except OSError as exc:
            print(
                f"cannot listen on 127.0.0.1:{opts.port} ({exc.strerror}): pick another "
                "port with --port",
                file=sys.stderr,
            )
            return 1

        async def stop_gateway() -> None:
            _say("stopping: draining the gateway, settling the outbox ...")
            await gateway_runner.cleanup()

        stack.push_async_callback(stop_gateway)
        base = f"http://127.0.0.1:{port}"
        lines = curl_lines(base, secret)
        _say("creditgate demo is running (Ctrl-C stops everything)")
        _say(f"  gateway    {base}  ->  sample upstream {upstream}")
        _say(f"  authority  gRPC {authority.grpc_target}, REST {authority.http_url}")
        _say(f"  redis      {redis_url} ({redis_note})")
        _say(f"  state dir  {state}")
        _say(f"  hot path   {native.status().reason}")
        _say(
            f"  project    {PROJECT}: balance {balance} credits; quotas: requests "
            f"{RATE_LIMIT} per {RATE_WINDOW} s, {CONCURRENCY} concurrent"
        )
        _say(f"  API key    {secret}")
        _say()
        _say("Try it:")
        _say("  # 1. admitted (200): /v1/hello costs 1 credit")
        _say("  " + lines[0])
        _say(f"  # 2. rate limited (429): more than {RATE_LIMIT} requests in {RATE_WINDOW} s")
        _say("  " + lines[1])
        _say(f"  # 3. out of credits (402): /v1/report costs {EXPENSIVE_COST} credits")
        _say("  " + lines[2])
        _say()
        _say(f"Dashboard  {base}/_creditgate/dashboard#token={token}")
        _say(f"Metrics    {base}/metrics")
        _say("ready")
        if opts.traffic:
            traffic = asyncio.create_task(drive_traffic(base, secret, stop))
            stack.push_async_callback(_finish, traffic)
            _say("traffic: about 4 requests/s to the gateway (loopback)")
        if opts.check or opts.exit_after is not None:
            started = time.monotonic()
            result = await run_check(base, secret)
            _say(
                f"check: admitted {result.admitted}; rate-limit loop "
                f"{' '.join(map(str, result.loop))}; credits {result.credits}"
            )
            if not result.ok:
                _say(
                    "check FAILED: expected 200, a 429 in the loop, and 402, each with the "
                    "headers the README names"
                )
                for problem in result.problems:
                    _say("  " + problem)
                exit_code = 1
            if opts.exit_after is not None and not opts.check:
                remaining = opts.exit_after - (time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, remaining))
            stop.set()
        await stop.wait()
        stop.set()
    _say("stopped")
    return exit_code


async def _finish(task: asyncio.Task[None]) -> None:
    await task


def run_demo(opts: DemoOptions) -> int:
    if not os.environ.get("REDIS_URL") and find_redis_server() is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    return asyncio.run(_main(opts))
