"""The authority process: store + CreditCore + gRPC (health, reflection) + REST + lifecycle jobs.

`AuthorityServer` is an async context manager used by tests, the demo and `creditgate authority
serve` (through `serve_forever`); `AuthorityConfig` is its one settings object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from creditservice import grpc_service
from creditservice.clock import Clock, SystemClock
from creditservice.core import CreditCore, JobsReport
from creditservice.storage import open_store
from creditservice.storage.base import Store
from creditservice.v1 import credit_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CreditService"].full_name


@dataclass
class AuthorityConfig:
    """Settings of one authority process; every field has a working default but admin_token."""

    database: str = "sqlite:///./creditgate-authority.db"
    """sqlite:///relative.db, sqlite:////absolute.db, or a postgresql:// DSN."""
    grpc_listen: str = "127.0.0.1:50051"
    """host:port of the gRPC server; port 0 picks a free one (see AuthorityServer.grpc_target)."""
    http_listen: str = "127.0.0.1:8081"
    """host:port of the REST/JSON mapping; "" disables it."""
    admin_token: str = ""
    """Required: bearer token of the admin (env CREDITGATE_ADMIN_TOKEN in the CLI)."""
    grace_job_interval_s: float = 1.0
    """How often GRACE wallets past their deadline are expired."""
    reservation_job_interval_s: float = 1.0
    """How often ACTIVE reservations past their TTL are expired."""
    prune_job_interval_s: float = 3600.0
    """How often the Watch change log is pruned."""
    change_retention_s: float = 7 * 24 * 3600.0
    """Watch changes older than this are pruned; older cursors get ResyncRequired."""
    heartbeat_interval_s: float = 5.0
    """An idle Watch stream sends a Heartbeat this often."""
    watch_poll_interval_s: float = 0.25
    """Watch polls the store this often for changes of other processes (PostgreSQL)."""
    key_cache_ttl_s: float = 1.0
    """Resolved API keys are cached this long (revocations here drop them at once)."""
    shutdown_grace_s: float = 5.0
    """In-flight RPCs get this long to finish on shutdown."""
    max_message_bytes: int = 64 * 1024 * 1024
    """gRPC message size limit; a 10,000-event Settle batch is a few MB."""
    run_jobs: bool = True
    """Run the lifecycle job loops (tests may drive them with run_jobs_once instead)."""
    clock: Clock = field(default_factory=SystemClock)
    """Time source for ledger timestamps and deadlines (tests pass a ManualClock)."""


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {listen!r} must be host:port")
    return host.strip("[]"), int(port)


def _grpc_options(cfg: AuthorityConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Clients (gateways, flushers) ping every ~10 s to keep Watch alive through idle NATs;
        # the server must accept that or it answers GOAWAY too_many_pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # A second authority on the same port must fail, not share it silently.
        ("grpc.so_reuseport", 0),
    ]


class AuthorityServer:
    """Runs one authority; `async with AuthorityServer(cfg) as srv:` starts it, exit stops it."""

    def __init__(self, config: AuthorityConfig) -> None:
        if not config.admin_token:
            raise ValueError("AuthorityConfig.admin_token is required")
        self.config = config
        self._store: Store | None = None
        self._core: CreditCore | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._runner: web.AppRunner | None = None
        self._jobs: list[asyncio.Task[None]] = []
        self._grpc_target = ""
        self._http_url = ""

    @property
    def core(self) -> CreditCore:
        if self._core is None:
            raise RuntimeError("the authority is not running")
        return self._core

    @property
    def clock(self) -> Clock:
        return self.config.clock

    @property
    def grpc_target(self) -> str:
        """host:port to dial, with the actual port when grpc_listen asked for port 0."""
        return self._grpc_target

    @property
    def http_url(self) -> str:
        """Base URL of the REST mapping; "" when disabled."""
        return self._http_url

    async def run_jobs_once(self) -> JobsReport:
        return await self.core.run_jobs_once()

    async def __aenter__(self) -> AuthorityServer:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        cfg = self.config
        self._store = await open_store(cfg.database)
        core = self._core = CreditCore(
            self._store,
            cfg.clock,
            cfg.admin_token,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            watch_poll_interval_s=cfg.watch_poll_interval_s,
            key_cache_ttl_s=cfg.key_cache_ttl_s,
            change_retention_s=cfg.change_retention_s,
        )
        await self._start_grpc(core)
        if cfg.http_listen:
            await self._start_rest(core)
        if cfg.run_jobs:
            self._jobs = [
                asyncio.create_task(_every(cfg.grace_job_interval_s, core.expire_grace_once)),
                asyncio.create_task(
                    _every(cfg.reservation_job_interval_s, core.expire_reservations_once)
                ),
                asyncio.create_task(_every(cfg.prune_job_interval_s, core.prune_changes_once)),
            ]
        log.info(
            "authority serving gRPC on %s%s, storage %s",
            self._grpc_target,
            f", REST on {self._http_url}" if self._http_url else "",
            self._store.backend,
        )

    async def _start_grpc(self, core: CreditCore) -> None:
        server = self._grpc = grpc.aio.server(options=_grpc_options(self.config))
        grpc_service.add_to_server(core, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        host, _ = _split_listen(self.config.grpc_listen)
        port = server.add_insecure_port(self.config.grpc_listen)
        if not port:
            raise OSError(f"cannot listen for gRPC on {self.config.grpc_listen}")
        await server.start()
        self._grpc_target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _start_rest(self, core: CreditCore) -> None:
        from creditservice.rest import build_app

        host, port = _split_listen(self.config.http_listen)
        runner = self._runner = web.AppRunner(build_app(core), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._http_url = f"http://{shown}:{bound_port}"

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, end Watch streams, drain RPCs, stop REST and jobs, close store."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
            self._health = None
        if self._core is not None:
            self._core.close()
        if self._grpc is not None:
            await self._grpc.stop(self.config.shutdown_grace_s)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in self._jobs:
            task.cancel()
        for task in self._jobs:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._jobs = []
        if self._core is not None:
            await self._core.drain()
        if self._store is not None:
            await self._store.close()
            self._store = None


async def _every(interval_s: float, job: Callable[[], Awaitable[int]]) -> None:
    """Runs a lifecycle job periodically; a failed pass is logged and retried next interval."""
    while True:
        try:
            await job()
        except Exception:
            log.exception("authority job %s failed", getattr(job, "__name__", job))
        await asyncio.sleep(interval_s)


def redacted_database(url: str) -> str:
    """`url` fit to print: a password (in the user part or a `password` query parameter of a
    PostgreSQL DSN) is replaced by ***."""
    parts = urlsplit(url)
    user, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}:***@{hosts}" if at and ":" in user else parts.netloc
    query = "&".join(
        f"{key}=***" if "password" in key.lower() and sep else f"{key}{sep}{value}"
        for key, sep, value in (pair.partition("=") for pair in parts.query.split("&"))
    )
    if netloc == parts.netloc and query == parts.query:
        return url
    # Not urlunsplit: it drops an empty host ("postgresql:///db?host=/run/postgresql").
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


async def serve_forever(config: AuthorityConfig) -> None:
    """Runs the authority until SIGINT or SIGTERM, then shuts down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with AuthorityServer(config) as server:
            rest = f"REST on {server.http_url}" if server.http_url else "no REST"
            print(
                f"creditgate authority pid {os.getpid()}: gRPC on {server.grpc_target}, {rest}, "
                f"database {redacted_database(config.database)}",
                flush=True,
            )
            await stop.wait()
            log.info("authority shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
