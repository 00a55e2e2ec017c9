"""Gateway throughput, side by side in one run: bare aiohttp, the plugin, and two simple peers.

Every server runs in its own process; load comes from another process (wrk if installed, else
an aiohttp client) with a fixed number of connections for a fixed time. The runs go in rounds,
each round starting every server afresh in turn, and "vs bare" is the median over rounds of
the ratio within a round: the speed of a shared machine drifts, and a drift then hits every
server alike. Run:

    python bench/gateway_bench.py [--seconds 10] [--connections 50] [--servers bare,plugin,...]

Servers: bare (trivial handler); four that do no admission work and add the plugin's two
RateLimit headers: null-wrap (the route handler wrapped, as setup() does), null-hook (a
response-prepare hook, which setup() adds to put the headers on every admitted response),
null-mw (a middleware instead), null-plugin (a pass-through middleware and a response-prepare
hook);
plugin (setup() in lease mode, the default: one credit hold +
one rate quota + one concurrency quota per request, flusher running), plugin-hold (the same in
hold mode: one admit and one settle script operation per request, batched per tick),
plugin-source (the plugin running its Python source instead of the compiled hot path, as with
CREDITGATE_PURE_PYTHON=1; see admission/native.py),
plugin-no-flusher (lease mode, settlement left to another process: the outbox just grows),
plugin-ext-flusher (the same, with a separate `creditgate flusher` process settling),
redis-peer (one INCR + check per request), grpc-peer (one CheckAdmission call to the authority
per request), bare-2p and plugin-2p (two processes sharing the port, as `gateway serve
--workers 2`: how throughput grows with processes; their CPU is the sum of both, and `--pin`
does not pin them).

Then, with wrk, bare and plugin again at half of the plugin's max throughput (connections that
pause between requests) for the latency the plugin adds (`--no-half-load` skips it), and the
first-request latency of `--cold N` new projects (identity, cache fill, lease; 0 skips it).

"waited" is the share of a one-process plugin's requests that their lease did not cover, so
that they waited for a sync (creditgate_lease_waits_total over the admissions, from /metrics).
Besides req/s the report gives the CPU time per request (us) of the server, Redis, the
authority and the external flusher, from /proc, over the measured runs. `--pin` pins the server
to CPU 0 and the load generator to CPU 1 (taskset), the same for every configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web
from stats import nearest_rank  # bench/stats.py, beside this script

from admission import native

POLICY = """
[settings]
shards = 16
unsettled_limit = 1000000000000
max_cost = 1000

[quotas.requests]
kind = "rate"
limit = 1000000000
window_seconds = 60

[quotas.concurrent]
kind = "concurrency"
limit = 100000

[[routes]]
name = "work"
method = "GET"
path = "/work"
cost = 1
quotas = ["requests", "concurrent"]
"""

# What the plugin sends for POLICY, with the figures of a fresh lease.
NULL_POLICY_HEADER = '"requests";q=1000000000;w=60, "concurrent";q=100000;qu="concurrent-requests"'
NULL_RATELIMIT_HEADER = '"requests";r=999999999;t=60, "concurrent";r=99999'

SERVERS = (
    "bare",
    "null-plugin",
    "null-wrap",
    "null-hook",
    "null-mw",
    "plugin",
    "plugin-hold",
    "plugin-source",
    "plugin-no-flusher",
    "plugin-ext-flusher",
    "redis-peer",
    "grpc-peer",
    "bare-2p",
    "plugin-2p",
)
# "-2p": two processes of the server sharing the port (SO_REUSEPORT), as `gateway serve
# --workers 2` runs them: does throughput grow with processes on this machine?
PROCESSES = 2
PEER_LIMIT = 10**12


# ---------------------------------------------------------------- servers (child processes)


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _serve(app: web.Application, args: argparse.Namespace) -> None:
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        reuse_port=args.reuse_port,
        access_log=None,
        # Sharing a port, a process cannot be told ready by connecting: it says so instead.
        print=functools.partial(print, flush=True) if args.reuse_port else None,
    )


def serve_bare(args: argparse.Namespace) -> None:
    app = web.Application()
    app.router.add_get("/work", _ok)
    _serve(app, args)


def _hooked_app(middlewares: list[Any]) -> web.Application:
    """bare's app plus a response-prepare hook adding the two RateLimit headers (fixed values
    of the plugin's length), as the plugin's hook does for every admitted response."""
    from gateway_plugin import headers as hdr

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[hdr.RATELIMIT_POLICY] = NULL_POLICY_HEADER
        response.headers[hdr.RATELIMIT] = NULL_RATELIMIT_HEADER

    app = web.Application(middlewares=middlewares)
    app.on_response_prepare.append(add_headers)
    app.router.add_get("/work", _ok)
    return app


def serve_null_plugin(args: argparse.Namespace) -> None:
    """bare plus what aiohttp charges any plugin of this shape before it does any work: a
    pass-through middleware and the response-prepare hook."""

    @web.middleware
    async def passthrough(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request)

    _serve(_hooked_app([passthrough]), args)


def serve_null_hook(args: argparse.Namespace) -> None:
    """bare with the response-prepare hook only (no middleware, no wrapper)."""
    _serve(_hooked_app([]), args)


def serve_null_wrap(args: argparse.Namespace) -> None:
    """bare with the route's handler wrapped (as setup() wraps them) setting the two RateLimit
    headers on the response: no middleware layer, no signal."""
    from gateway_plugin import headers as hdr

    async def wrapped(request: web.Request) -> web.StreamResponse:
        response = await _ok(request)
        response.headers[hdr.RATELIMIT_POLICY] = NULL_POLICY_HEADER
        response.headers[hdr.RATELIMIT] = NULL_RATELIMIT_HEADER
        return response

    app = web.Application()
    app.router.add_get("/work", wrapped)
    _serve(app, args)


def serve_null_mw(args: argparse.Namespace) -> None:
    """bare with a middleware setting the two RateLimit headers: what aiohttp's middleware
    layer costs by itself (against null-wrap)."""
    from gateway_plugin import headers as hdr

    @web.middleware
    async def mw(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        response.headers[hdr.RATELIMIT_POLICY] = NULL_POLICY_HEADER
        response.headers[hdr.RATELIMIT] = NULL_RATELIMIT_HEADER
        return response

    app = web.Application(middlewares=[mw])
    app.router.add_get("/work", _ok)
    _serve(app, args)


def serve_plugin(
    args: argparse.Namespace, *, run_flusher: bool = True, admission: str = "lease"
) -> None:
    from admission.policy import parse_policy
    from gateway_plugin import GatewayConfig, setup

    app = web.Application()
    app.router.add_get("/work", _ok)
    settings = f'[settings]\nadmission = "{admission}"'
    if args.lease_sync_ms:  # bench/instructions.py: syncs out of the way of the requests
        ttl = max(2000, 4 * args.lease_sync_ms)
        settings += f"\nlease_sync_ms = {args.lease_sync_ms}\nlease_ttl_ms = {ttl}"
        settings += f"\nlease_idle_ms = {ttl}"
    policy = POLICY.replace("[settings]", settings, 1)
    setup(
        app,
        GatewayConfig(
            policy=parse_policy(policy, "bench-policy.toml"),
            redis_url=args.redis_url,
            authority_target=args.authority,
            authority_token=args.token,
            gateway_id=f"bench-{os.getpid()}",
            run_flusher=run_flusher,
        ),
    )
    _serve(app, args)


def serve_plugin_hold(args: argparse.Namespace) -> None:
    """The plugin in hold mode: one admit and one settle script op per request (batched)."""
    serve_plugin(args, admission="hold")


def serve_plugin_no_flusher(args: argparse.Namespace) -> None:
    """The plugin with settlement left to a separate `creditgate flusher` process (not run
    here: the outbox just grows), to show what the in-process flusher costs."""
    serve_plugin(args, run_flusher=False)


def serve_redis_peer(args: argparse.Namespace) -> None:
    """The 'one Redis call per request' design: INCR a per-project counter, compare, admit."""
    import redis.asyncio as aioredis

    client_key: web.AppKey[Any] = web.AppKey("redis", object)

    async def lifecycle(app: web.Application) -> Any:
        app[client_key] = aioredis.Redis.from_url(args.redis_url)
        yield
        await app[client_key].aclose()

    @web.middleware
    async def admit(request: web.Request, handler: Any) -> web.StreamResponse:
        token = request.headers.get("Authorization", "")
        used = await request.app[client_key].incr(f"peer:count:{token[-12:]}")
        if used > PEER_LIMIT:
            return web.Response(status=429)
        return await handler(request)  # type: ignore[no-any-return]

    app = web.Application(middlewares=[admit])
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/work", _ok)
    _serve(app, args)


def serve_grpc_peer(args: argparse.Namespace) -> None:
    """The 'one gRPC call per request' design: CheckAdmission at the authority, then admit."""
    import grpc

    from creditservice.v1 import credit_pb2 as pb
    from creditservice.v1 import credit_pb2_grpc as pb_grpc

    stub_key: web.AppKey[Any] = web.AppKey("stub", object)
    metadata = (("authorization", f"Bearer {args.token}"),)

    async def lifecycle(app: web.Application) -> Any:
        channel = grpc.aio.insecure_channel(args.authority)
        app[stub_key] = pb_grpc.CreditServiceStub(channel)
        yield
        await channel.close()

    @web.middleware
    async def admit(request: web.Request, handler: Any) -> web.StreamResponse:
        reply = await request.app[stub_key].CheckAdmission(
            pb.CheckAdmissionRequest(project_id=args.project, cost=1),
            metadata=metadata,
            timeout=2,
        )
        if not reply.allowed:
            return web.Response(status=402)
        return await handler(request)  # type: ignore[no-any-return]

    app = web.Application(middlewares=[admit])
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/work", _ok)
    _serve(app, args)


def serve_authority(args: argparse.Namespace) -> None:
    from creditservice.server import AuthorityConfig, AuthorityServer

    async def main() -> None:
        cfg = AuthorityConfig(
            database=f"sqlite:///{args.db}",
            grpc_listen=f"127.0.0.1:{args.port}",
            http_listen="",
            admin_token=args.token,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with AuthorityServer(cfg):
            await stop.wait()

    asyncio.run(main())


# ---------------------------------------------------------------- load (child process)


async def _client_load(url: str, token: str, connections: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": nearest_rank(latencies, 0.50) * 1000,
        "p99_ms": nearest_rank(latencies, 0.99) * 1000,
        "non_2xx": errors,
    }


def run_load(args: argparse.Namespace) -> None:
    result = asyncio.run(_client_load(args.url, args.token, args.connections, args.seconds))
    print(json.dumps(result))


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_output(
    url: str,
    token: str,
    connections: int,
    seconds: float,
    *options: str,
    prefix: list[str] = [],  # noqa: B006
) -> str:
    """wrk's report of one run: one thread, `connections` connections, the bench's API key;
    `prefix` goes in front of the command (taskset)."""
    return subprocess.run(
        [
            *prefix,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            *options,
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _wrk(
    url: str,
    token: str,
    connections: int,
    seconds: float,
    pin: list[str],
    delay_ms: int = 0,
) -> dict[str, Any]:
    """wrk's figures; `delay_ms` > 0 paces each connection (that pause between its requests)."""
    script: list[str] = []
    if delay_ms > 0:
        path = Path(tempfile.gettempdir()) / f"cg-bench-delay-{delay_ms}.lua"
        path.write_text(f"function delay()\n  return {delay_ms}\nend\n")
        script = ["-s", str(path)]
    out = wrk_output(url, token, connections, seconds, "--latency", *script, prefix=pin)

    def latency(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise RuntimeError(f"no {label}% line in wrk output:\n{out}")
        return float(m.group(1)) * _WRK_UNITS[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if rps is None:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{out}")
    return {
        "rps": float(rps.group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


# ---------------------------------------------------------------- orchestration


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 20.0) -> None:
    import socket

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)  # polling the port with a deadline
    raise RuntimeError(f"nothing listens on {port}")


def _spawn(
    mode: str,
    *extra: str,
    pin: list[str] = [],  # noqa: B006
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    proc = subprocess.Popen(
        [*pin, sys.executable, __file__, mode, "--port", str(port), *extra],
        env={**os.environ, **env} if env else None,
    )
    _wait_port(port, proc)
    return proc, port


def _spawn_sharing(mode: str, count: int, *extra: str) -> tuple[list[subprocess.Popen[bytes]], int]:
    """`count` processes of one server on one port (SO_REUSEPORT), each waited for."""
    port = _free_port()
    procs = []
    try:
        for _ in range(count):
            proc = subprocess.Popen(
                [sys.executable, __file__, mode, "--port", str(port), "--reuse-port", *extra],
                stdout=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None
            if b"Running on" not in proc.stdout.readline():  # run_app's line once it listens
                raise RuntimeError(f"{mode} on port {port} did not start")
    except BaseException:
        for proc in procs:
            _stop(proc)
        raise
    return procs, port


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (and its reaped children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14..17.
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _stop(proc: subprocess.Popen[bytes], wait_s: float = 30) -> None:
    """SIGINT (a graceful stop), then SIGKILL after `wait_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _create_project(target: str, token: str, project: str) -> str:
    import grpc

    from creditservice.v1 import credit_pb2 as pb
    from creditservice.v1 import credit_pb2_grpc as pb_grpc

    md = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CreditServiceStub(channel)
        await stub.CreateWallet(
            pb.CreateWalletRequest(
                request_id=f"c-{project}", project_id=project, organization_id="bench"
            ),
            metadata=md,
            timeout=10,
        )
        await stub.TopUp(
            pb.TopUpRequest(request_id=f"t-{project}", project_id=project, amount=10**14),
            metadata=md,
            timeout=10,
        )
        key = await stub.IssueApiKey(
            pb.IssueApiKeyRequest(request_id=f"k-{project}", project_id=project, name="bench"),
            metadata=md,
            timeout=10,
        )
        return str(key.secret)


def _measure(url: str, token: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.loader == "wrk":
        return _wrk(url, token, args.connections, args.seconds, _pin(args, "1"))
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "load",
            "--url",
            url,
            "--token",
            token,
            "--connections",
            str(args.connections),
            "--seconds",
            str(args.seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def orchestrate(args: argparse.Namespace) -> None:
    from tests.services import start_redis

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            raise SystemExit(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    if args.loader == "auto":
        args.loader = "wrk" if shutil.which("wrk") else "aiohttp"
    # A leading "-" would read as an option to the children's argparse.
    token = "t" + secrets.token_urlsafe(24)
    args.token_for_children = token
    workdir = Path(tempfile.mkdtemp(prefix="cg-bench-"))
    redis = start_redis()
    authority, authority_port = _spawn("authority", "--db", str(workdir / "a.db"), "--token", token)
    target = f"127.0.0.1:{authority_port}"
    results: dict[str, dict[str, Any]] = {}
    try:
        project = f"bench-{secrets.token_hex(4)}"
        secret = asyncio.run(_create_project(target, token, project))
        common = [
            "--redis-url",
            redis.url,
            "--authority",
            target,
            "--token",
            token,
            "--project",
            project,
        ]
        # Rounds, each running every server once in turn: the machine's speed drifts (other
        # tenants, clocks), and a drift then hits every server alike instead of one of them.
        # Every other round runs them in reverse order: a server run right after another one
        # was measured slower (the same build 4 us/request slower than itself, run second).
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        cpu_s: dict[str, dict[str, float]] = {name: {} for name in servers}
        for round_no in range(args.repeat):
            for name in servers if round_no % 2 == 0 else reversed(servers):
                run, cpu = _measure_server(name, common, secret, redis, authority, target, args)
                runs[name].append(run)
                for k, v in cpu.items():
                    cpu_s[name][k] = cpu_s[name].get(k, 0.0) + v
        for name in servers:
            rows = runs[name]
            requests = sum(r["rps"] for r in rows) * args.seconds
            best = dict(max(rows, key=lambda r: r["rps"]))
            best["rps_runs"] = [round(r["rps"]) for r in rows]
            best["rps_median"] = statistics.median(r["rps"] for r in rows)
            best["cpu_us"] = {k: v / requests * 1e6 for k, v in cpu_s[name].items()}
            if "bare" in runs and name != "bare":
                # The ratio within each round, then the median of those.
                ratios = sorted(
                    r["rps"] / b["rps"] for r, b in zip(rows, runs["bare"], strict=True)
                )
                best["ratio_median"] = statistics.median(ratios)
                best["ratios"] = ratios
            results[name] = best
        half: dict[str, dict[str, Any]] = {}
        if args.half_load and args.loader == "wrk" and {"bare", "plugin"} <= set(results):
            rate = results["plugin"]["rps_median"] / 2
            for name in ("bare", "plugin"):
                proc, port = _spawn(name, *common, pin=_pin(args, "0"))
                try:
                    half[name] = _paced(f"http://127.0.0.1:{port}/work", secret, rate, args)
                finally:
                    _stop(proc)
        cold: dict[str, float] = {}
        if args.cold > 0 and "plugin" in servers:
            proc, port = _spawn("plugin", *common, pin=_pin(args, "0"))
            try:
                cold = asyncio.run(
                    _cold_latency(f"http://127.0.0.1:{port}/work", target, token, args.cold)
                )
            finally:
                _stop(proc)
    finally:
        _stop(authority)
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    _report(results, args)
    if half:
        _report_half(half)
    if cold:
        print(
            f"\ncold project, first request (identity + cache fill + lease), {args.cold} "
            f"projects: p50 {cold['p50_ms']:.2f} ms, p99 {cold['p99_ms']:.2f} ms, "
            f"max {cold['max_ms']:.2f} ms;"
            f" the next request of the same project: p50 {cold['warm_p50_ms']:.2f} ms"
        )


def _measure_server(
    name: str,
    common: list[str],
    secret: str,
    redis: Any,
    authority: subprocess.Popen[bytes],
    target: str,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One run of one server, started fresh and warmed up: its result and CPU seconds."""
    mode = {"plugin-ext-flusher": "plugin-no-flusher", "plugin-source": "plugin"}.get(name, name)
    env = {native.PURE_ENV: "1"} if name == "plugin-source" else None
    if name.endswith("-2p"):
        procs, port = _spawn_sharing(name.removesuffix("-2p"), PROCESSES, *common)
    else:
        proc, port = _spawn(mode, *common, pin=_pin(args, "0"), env=env)
        procs = [proc]
    ext: subprocess.Popen[bytes] | None = None
    if name == "plugin-ext-flusher":
        ext = _start_flusher(redis.url, target, args.token_for_children)
    try:
        url = f"http://127.0.0.1:{port}/work"
        warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup})
        _measure(url, secret, warm)
        pids = {"server": [p.pid for p in procs], "redis": [redis.proc.pid]}
        pids["authority"] = [authority.pid]
        if ext is not None:
            pids["flusher"] = [ext.pid]
        waits0 = _lease_counts(port) if len(procs) == 1 else None
        cpu0 = {k: sum(_cpu_seconds(pid) for pid in v) for k, v in pids.items()}
        run = _measure(url, secret, args)
        cpu1 = {k: sum(_cpu_seconds(pid) for pid in v) for k, v in pids.items()}
        waits1 = _lease_counts(port) if waits0 is not None else None
        if waits0 is not None and waits1 is not None and waits1[1] > waits0[1]:
            run["waited_pct"] = 100 * (waits1[0] - waits0[0]) / (waits1[1] - waits0[1])
        return run, {k: cpu1[k] - cpu0[k] for k in pids}
    finally:
        if ext is not None:
            _stop(ext)
        for proc in procs:
            _stop(proc)


def _lease_counts(port: int) -> tuple[float, float] | None:
    """(requests that waited for a lease sync, admission decisions) from the server's /metrics,
    or None for a server without them (bare, the peers)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    waits = "creditgate_lease_waits_total"
    admissions = "creditgate_admission_duration_seconds_count"
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in (waits, admissions):
            values[name] = float(value)
    if len(values) < 2:
        return None
    return values[waits], values[admissions]


_PACE_DELAY_MS = 5


def _paced(url: str, token: str, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """wrk at about `rate` req/s: connections that pause _PACE_DELAY_MS between requests."""
    connections = max(1, math.ceil(rate * _PACE_DELAY_MS / 1000))
    pin = _pin(args, "1")
    _wrk(url, token, connections, args.warmup, pin, _PACE_DELAY_MS)
    runs = [
        _wrk(url, token, connections, args.seconds, pin, _PACE_DELAY_MS) for _ in range(args.repeat)
    ]
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "connections": connections,
        "target": rate,
    }


def _report_half(half: dict[str, dict[str, Any]]) -> None:
    bare, plugin = half["bare"], half["plugin"]
    print(
        f"\nat half of the plugin's max ({plugin['target']:.0f} req/s offered by "
        f"{plugin['connections']} connections pausing {_PACE_DELAY_MS} ms; medians of runs):"
    )
    print(f"{'server':<18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in half.items():
        print(f"{name:<18}{r['rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}")
    print(
        f"added by the plugin: p50 {plugin['p50_ms'] - bare['p50_ms']:+.2f} ms, "
        f"p99 {plugin['p99_ms'] - bare['p99_ms']:+.2f} ms"
    )


async def _cold_latency(url: str, target: str, token: str, count: int) -> dict[str, float]:
    """First request of `count` new projects (each with its own key), one at a time."""
    import aiohttp

    secrets_ = [
        await _create_project(target, token, f"cold-{secrets.token_hex(4)}") for _ in range(count)
    ]
    cold: list[float] = []
    warm: list[float] = []
    async with aiohttp.ClientSession() as session:
        for secret in secrets_:
            headers = {"Authorization": f"Bearer {secret}"}
            for out in (cold, warm):
                t0 = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"cold-project request answered {resp.status}")
                out.append((time.perf_counter() - t0) * 1000)
    cold.sort()
    warm.sort()
    return {
        "p50_ms": nearest_rank(cold, 0.50),
        "p99_ms": nearest_rank(cold, 0.99),
        "max_ms": cold[-1],
        "warm_p50_ms": nearest_rank(warm, 0.50),
    }


def _pin(args: argparse.Namespace, cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if args.pin else []


def _start_flusher(redis_url: str, target: str, token: str) -> subprocess.Popen[bytes]:
    """`creditgate flusher` (settlement only) as its own process, like a production deployment."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway_plugin.cli",
            "flusher",
            f"--redis={redis_url}",
            f"--authority={target}",
            f"--token={token}",
            "--no-watch",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    bare = results.get("bare", {}).get("rps_median")
    print(
        f"\nloader={args.loader} connections={args.connections} seconds={args.seconds} "
        f"repeat={args.repeat} cpus={os.cpu_count()} pin={args.pin} "
        f"load average at end={os.getloadavg()[0]:.2f}"
    )
    print(f"plugin hot path: {native.status().reason}")
    print(
        f"{'server':<18}{'req/s (median)':>16}{'p50 ms':>10}{'p99 ms':>10}{'vs bare':>10}"
        f"{'non-2xx':>10}{'waited':>8}  cpu us/req (server redis authority flusher)  runs"
    )
    # "vs bare": the median over rounds of (server req/s / bare req/s in the same round).
    for name, r in results.items():
        if name == "bare":
            ratio = "1.00"
        elif "ratio_median" in r:
            ratio = f"{r['ratio_median']:.2f}"
        else:
            ratio = f"{r['rps_median'] / bare:.2f}" if bare else "-"
        waited = f"{r['waited_pct']:.1f}%" if "waited_pct" in r else "-"
        print(
            f"{name:<18}{r['rps_median']:>16.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
            f"{ratio:>10}{r['non_2xx']:>10}{waited:>8}  {_cpu_text(r['cpu_us']):<42} "
            f"{r['rps_runs']}"
        )
    # How much the rounds disagree: on a shared machine a round can lose a third of its speed.
    spread = {name: r["ratios"] for name, r in results.items() if len(r.get("ratios", ())) > 1}
    if spread:
        print("\nvs bare, per round (lowest, quartiles, highest):")
        for name, ratios in spread.items():
            q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            print(
                f"  {name:<20}{ratios[0]:.2f}  {q1:.2f} {q2:.2f} {q3:.2f}  {ratios[-1]:.2f}"
                f"   ({len(ratios)} rounds)"
            )


def _cpu_text(cpu: dict[str, float]) -> str:
    order = ("server", "redis", "authority", "flusher")
    return " ".join(f"{cpu[k]:.0f}" if k in cpu else "-" for k in order)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    bench = sub.add_parser("run", help="the whole comparison (default)")
    for p in (parser, bench):
        p.add_argument("--seconds", type=float, default=10.0)
        p.add_argument("--warmup", type=float, default=3.0)
        p.add_argument("--repeat", type=int, default=3)
        p.add_argument("--connections", type=int, default=50)
        p.add_argument("--servers", default=",".join(SERVERS))
        p.add_argument("--loader", choices=("auto", "wrk", "aiohttp"), default="auto")
        p.add_argument("--pin", action="store_true", help="taskset: server CPU 0, load CPU 1")
        p.add_argument(
            "--half-load",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="also bare and plugin at half of the plugin's max (wrk only): added latency",
        )
        p.add_argument(
            "--cold", type=int, default=50, help="first-request latency of N new projects"
        )
    modes: dict[str, Callable[[argparse.Namespace], None]] = {
        "bare": serve_bare,
        "null-plugin": serve_null_plugin,
        "null-wrap": serve_null_wrap,
        "null-hook": serve_null_hook,
        "null-mw": serve_null_mw,
        "plugin": serve_plugin,
        "plugin-hold": serve_plugin_hold,
        "plugin-no-flusher": serve_plugin_no_flusher,
        "redis-peer": serve_redis_peer,
        "grpc-peer": serve_grpc_peer,
        "authority": serve_authority,
    }
    for mode in modes:
        p = sub.add_parser(mode)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--redis-url", default="")
        p.add_argument("--authority", default="")
        p.add_argument("--token", default="")
        p.add_argument("--project", default="")
        p.add_argument("--db", default="")
        p.add_argument("--reuse-port", action="store_true")
        p.add_argument("--lease-sync-ms", type=int, default=0, help="plugin: policy setting")
    load = sub.add_parser("load")
    load.add_argument("--url", required=True)
    load.add_argument("--token", required=True)
    load.add_argument("--connections", type=int, required=True)
    load.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    if args.mode in modes:
        modes[args.mode](args)
    elif args.mode == "load":
        run_load(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
