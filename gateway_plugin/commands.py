"""`creditgate gateway serve` and `creditgate demo`.

`serve --workers N` (N > 1) runs N spawned processes on one port (SO_REUSEPORT); each builds its
own event loop, Redis client and gRPC channel, and /metrics merges all of them (multiprocess mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from aiohttp import web
from yarl import URL

from admission import native

DEFAULT_LISTEN = "127.0.0.1:8080"
EXIT_USAGE = 2
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class ListenError(OSError):
    """The gateway's address cannot be bound (in use, not local, no permission)."""


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Everything a worker needs; plain data so that it pickles into spawned processes."""

    policy: str
    upstream: str
    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    authority: str = "127.0.0.1:50051"
    token: str = ""
    workers: int = 1
    shutdown_timeout: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    encoded_slashes: Literal["reject", "keep"] = "reject"
    dashboard: bool = True


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _build_app(opts: ServeOptions) -> web.Application:
    from gateway_plugin.config import GatewayConfig
    from gateway_plugin.proxy import ProxyConfig, build_gateway_app

    config = GatewayConfig(
        policy=Path(opts.policy),
        redis_url=opts.redis_url,
        redis_cluster=opts.redis_cluster,
        authority_target=opts.authority,
        authority_token=opts.token,
    )
    proxy = ProxyConfig(
        upstream=opts.upstream,
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        encoded_slashes=opts.encoded_slashes,
    )
    return build_gateway_app(config, proxy, dashboard=opts.dashboard)


async def serve(
    opts: ServeOptions, *, reuse_port: bool = False, parent_sentinel: int | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, drain requests and run the cleanups.

    With `parent_sentinel` (a worker's handle on its supervisor) the same graceful stop runs when
    the supervisor dies, even by SIGKILL: a worker never outlives the process that owns it.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if parent_sentinel is not None:
        # The pipe's write end closes when the parent exits and the read end turns readable
        # (and stays so: the reader goes before the drain, or it would spin the loop).
        fd = parent_sentinel

        def parent_gone() -> None:
            loop.remove_reader(fd)
            stop.set()  # first: stderr may be a pipe that died with the supervisor
            with contextlib.suppress(OSError):
                print(
                    f"creditgate worker {os.getpid()}: supervisor gone, stopping",
                    file=sys.stderr,
                    flush=True,
                )

        loop.add_reader(fd, parent_gone)
    # A worker starts with these blocked (see run_workers); one sent early is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    app = _build_app(opts)
    from gateway_plugin.proxy import app_runner

    runner = app_runner(app, opts.shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, opts.host, opts.port, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}"
            ) from exc
        print(
            f"creditgate gateway pid {os.getpid()} on http://{opts.host}:{opts.port} "
            f"-> {opts.upstream} (hot path: {native.status().reason})",
            flush=True,
        )
        await stop.wait()
    finally:
        # Stops the listener, waits up to --shutdown-timeout for handlers, then the plugin's
        # cleanup settles in-flight holds and drains the outbox to the authority.
        await runner.cleanup()


def _worker(opts: ServeOptions, own_mp_dir: str | None) -> None:
    """A worker of run_workers. `own_mp_dir`: the metrics directory the supervisor made (and
    removes); when the supervisor died without removing it, the last worker out does."""
    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    try:
        asyncio.run(serve(opts, reuse_port=True, parent_sentinel=sentinel))
    finally:
        if own_mp_dir is not None and parent is not None and not parent.is_alive():
            for mine in Path(own_mp_dir).glob(f"*_{os.getpid()}.db"):
                with contextlib.suppress(OSError):
                    mine.unlink()
            with contextlib.suppress(OSError):
                os.rmdir(own_mp_dir)  # fails while another worker's files are still there


def run_workers(opts: ServeOptions) -> int:
    """Supervise `opts.workers` spawned workers; SIGTERM/SIGINT is forwarded to each of them."""
    own_dir = not os.environ.get(MULTIPROC_ENV)
    mp_dir = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="creditgate-prom-")
    # Stale files of an earlier run would be summed into this run's counters.
    for stale in Path(mp_dir).glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = mp_dir
    # spawn, not fork: nothing (gRPC, Redis, the loop) is inherited from this process.
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker, args=(opts, mp_dir if own_dir else None), name=f"creditgate-worker-{i}"
        )
        for i in range(opts.workers)
    ]
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in _STOP_SIGNALS}
    from prometheus_client import multiprocess

    code = 0
    try:
        # The signal mask survives fork+exec: a worker still importing when SIGTERM comes keeps
        # it pending until its handler is installed, instead of dying from the default action.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        alive = list(procs)
        while alive:
            # Any worker ending (crash or signal) stops the others: a half-sized gateway on a
            # shared port would hide the failure behind the surviving workers.
            multiprocessing.connection.wait([p.sentinel for p in alive])
            for p in [p for p in alive if p.exitcode is not None]:
                alive.remove(p)
                if p.pid is not None:
                    multiprocess.mark_process_dead(p.pid, mp_dir)  # type: ignore[no-untyped-call]
                if p.exitcode != 0 or not stopping:
                    # Unasked, even a clean exit is a failure: the gateway is not whole.
                    code = 1
                    print(f"creditgate worker {p.pid} exited with {p.exitcode}", file=sys.stderr)
                if not stopping:
                    forward(signal.SIGTERM, None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if own_dir:
            shutil.rmtree(mp_dir, ignore_errors=True)
    return code


def check_upstream(url: str) -> None:
    """Refuses, with a ValueError, an upstream URL the proxy cannot forward to: every request
    would answer 502 (no scheme or host) or reach a wrong URL (the request path is appended)."""
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise ValueError(f"--upstream: {url!r} is not a URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(
            f"--upstream: {url!r} needs http:// or https:// and a host, e.g. http://127.0.0.1:9000"
        )
    if parsed.raw_query_string or parsed.raw_fragment:
        raise ValueError(
            f"--upstream: {url!r} has a query or fragment; the request's path and query are "
            "appended to it, so give a base URL"
        )


def check_options(opts: ServeOptions) -> None:
    """What `serve` would fail on in every worker, found once before any is started: a
    ValueError (upstream, Redis URL, an unreadable policy file) or a PolicyError."""
    from redis.connection import parse_url

    from admission.policy import load_policy

    check_upstream(opts.upstream)
    try:
        parse_url(opts.redis_url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ValueError(f"--redis: {exc}") from exc
    try:
        load_policy(opts.policy)
    except OSError as exc:
        raise ValueError(f"--policy: {opts.policy}: {exc.strerror or exc}") from exc


def _serve_cmd(args: argparse.Namespace) -> int:
    from admission.errors import PolicyError

    host, port = args.listen
    token = args.token if args.token is not None else os.environ.get("CREDITGATE_ADMIN_TOKEN", "")
    opts = ServeOptions(
        policy=args.policy,
        upstream=args.upstream,
        host=host,
        port=port,
        redis_url=args.redis,
        redis_cluster=args.redis_cluster,
        authority=args.authority,
        token=token,
        workers=args.workers,
        shutdown_timeout=args.shutdown_timeout,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        encoded_slashes=args.encoded_slashes,
        dashboard=not args.no_dashboard,
    )
    try:
        check_options(opts)
    except (ValueError, PolicyError) as exc:
        print(f"error: gateway serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if opts.workers > 1:
        return run_workers(opts)
    try:
        asyncio.run(serve(opts))
    except ListenError as exc:
        print(f"creditgate gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo_cmd(args: argparse.Namespace) -> int:
    from gateway_plugin.demo import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            state_dir=Path(args.state_dir),
            port=args.port,
            traffic=args.traffic,
            check=args.check,
            exit_after=args.exit_after,
        )
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    gw = sub.add_parser("gateway", help="the standalone reverse-proxy gateway")
    gw_sub = gw.add_subparsers(dest="gateway_command", required=True, metavar="COMMAND")
    s = gw_sub.add_parser(
        "serve",
        help="reverse-proxy to an upstream with admission in front",
        description="Reverse-proxy every request to --upstream, admitted by creditgate.",
    )
    s.add_argument("--policy", required=True, help="admission policy TOML file")
    s.add_argument(
        "--upstream", required=True, help="base URL of the upstream, e.g. http://127.0.0.1:9000"
    )
    s.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(DEFAULT_LISTEN),
        help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})",
    )
    s.add_argument(
        "--redis",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (env REDIS_URL; a seed node with --redis-cluster)",
    )
    s.add_argument("--redis-cluster", action="store_true", help="Redis is a Redis Cluster")
    s.add_argument(
        "--authority",
        default=os.environ.get("CREDITGATE_AUTHORITY", "127.0.0.1:50051"),
        help="authority gRPC HOST:PORT (env CREDITGATE_AUTHORITY, default %(default)s)",
    )
    s.add_argument(
        "--token",
        default=None,
        help="admin token for the authority and the dashboard "
        "(default: env CREDITGATE_ADMIN_TOKEN)",
    )
    s.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); default 1",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get on SIGTERM (default 30)",
    )
    s.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="upstream connect timeout in seconds (default 5)",
    )
    s.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        help="longest upstream silence in seconds before 504 (default 60)",
    )
    s.add_argument(
        "--encoded-slashes",
        choices=("reject", "keep"),
        default="reject",
        help="a path with %%2F or a backslash: reject (400, default) or keep it inside its "
        "segment, for upstreams that route it so",
    )
    s.add_argument(
        "--no-dashboard", action="store_true", help="do not serve /_creditgate/dashboard"
    )
    s.set_defaults(func=_serve_cmd)

    d = sub.add_parser(
        "demo",
        help="run Redis, the authority, a gateway and a sample API on this machine",
        description="Start the whole stack with built-in defaults and print what to try.",
    )
    d.add_argument(
        "--state-dir",
        default=".creditgate-demo",
        help="where the demo keeps its database, keys and Redis files (default ./.creditgate-demo)",
    )
    d.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    d.add_argument(
        "--traffic",
        action="store_true",
        help="send a few requests per second so the dashboard moves",
    )
    d.add_argument(
        "--check",
        action="store_true",
        help="run the three example requests, print their statuses and stop",
    )
    d.add_argument(
        "--exit-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run the example requests, stop after SECONDS (for CI)",
    )
    d.set_defaults(func=_demo_cmd)
