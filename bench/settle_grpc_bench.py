"""Settle throughput of the authority over real gRPC on loopback, per backend and batch size.

Starts its own AuthorityServer (a temporary SQLite file; a PostgreSQL database it creates and
drops) and sends Settle batches of unique COMMIT events, one batch in flight per client task,
as the flusher does. Prints events/s and per-batch latency (p50/p99).

    python bench/settle_grpc_bench.py                       # sqlite + postgresql, 1/100/1000
    python bench/settle_grpc_bench.py --backends sqlite --batch-sizes 1000 --concurrency 4
    python bench/settle_grpc_bench.py --watchers 4        # with 4 gateway-like Watch streams
    CREDITGATE_BENCH_PG_DSN=postgresql://postgres@127.0.0.1:5432/postgres  (admin DSN used)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import asyncpg
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stats import nearest_rank  # bench/stats.py, beside this script

from creditservice.server import AuthorityConfig, AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc

PROJECTS = 50
DEFAULT_EVENTS = {1: 3_000, 100: 30_000, 1000: 100_000}


@contextlib.asynccontextmanager
async def database(backend: str) -> AsyncIterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="cg-bench-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
        return
    admin = os.environ.get(
        "CREDITGATE_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    name = f"cg_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield f"{admin.rpartition('/')[0]}/{name}"
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def batches(run: str, batch_size: int, total: int, projects: list[str]) -> list[pb.SettleRequest]:
    out = []
    n = 0
    while n < total:
        events = []
        for _ in range(batch_size):
            events.append(
                pb.SettlementEvent(
                    event_id=f"{run}-{n}",
                    kind=pb.COMMIT,
                    project_id=projects[n % len(projects)],
                    hold_id=f"{run}-{n}",
                    held_amount=10,
                    amount=7,
                    meter="requests",
                    route="GET /v1/items",
                    occurred_at_ms=1_767_225_600_000 + n,
                    gateway_id="gw-1",
                )
            )
            n += 1
        out.append(pb.SettleRequest(events=events))
    return out


async def measure(
    stub: pb_grpc.CreditServiceAsyncStub,
    md: tuple[tuple[str, str], ...],
    requests: list[pb.SettleRequest],
    concurrency: int,
) -> tuple[float, list[float]]:
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            req = queue.pop()
            t0 = time.perf_counter()
            resp = await stub.Settle(req, metadata=md, timeout=60)
            latencies.append(time.perf_counter() - t0)
            if resp.results[0].status != pb.APPLIED:
                raise RuntimeError(f"unexpected result {resp.results[0]}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies


async def drain_watch(
    stub: pb_grpc.CreditServiceAsyncStub, md: tuple[tuple[str, str], ...]
) -> None:
    """A gateway-like Watch consumer, so Settle is measured with change fan-out running."""
    async for _ in stub.Watch(pb.WatchRequest(), metadata=md):
        pass


async def bench_backend(
    backend: str, sizes: list[int], concurrency: int, scale: float, watch_streams: int
) -> None:
    async with database(backend) as url:
        cfg = AuthorityConfig(
            database=url,
            grpc_listen="127.0.0.1:0",
            http_listen="",
            admin_token="admin-" + secrets.token_urlsafe(24),
            run_jobs=False,
        )
        async with AuthorityServer(cfg) as srv, grpc.aio.insecure_channel(srv.grpc_target) as ch:
            # The generated overloads cannot tell an aio channel (grpc ships no types).
            stub = cast("pb_grpc.CreditServiceAsyncStub", pb_grpc.CreditServiceStub(ch))
            md = (("authorization", f"Bearer {cfg.admin_token}"),)
            projects = [f"bench-{i}" for i in range(PROJECTS)]
            for pid in projects:
                await stub.CreateWallet(
                    pb.CreateWalletRequest(
                        request_id=f"c-{pid}", project_id=pid, organization_id="bench"
                    ),
                    metadata=md,
                )
                await stub.TopUp(
                    pb.TopUpRequest(request_id=f"t-{pid}", project_id=pid, amount=10**14),
                    metadata=md,
                )
            watchers = [asyncio.create_task(drain_watch(stub, md)) for _ in range(watch_streams)]
            # Warm-up: connections, statement caches, page cache.
            await measure(stub, md, batches("warm", 100, 2_000, projects), 1)
            for size in sizes:
                total = max(size, int(DEFAULT_EVENTS.get(size, 20 * size) * scale))
                reqs = batches(uuid.uuid4().hex[:8], size, total, projects)
                elapsed, lat = await measure(stub, md, reqs, concurrency)
                events = len(reqs) * size
                lat_ms = sorted(x * 1000 for x in lat)
                p99 = nearest_rank(lat_ms, 0.99)
                print(
                    f"{backend:10s} batch={size:5d} conc={concurrency} watch={watch_streams} "
                    f"events={events:7d} "
                    f"{events / elapsed:10.0f} events/s  batch p50={statistics.median(lat_ms):7.2f}"
                    f" ms p99={p99:7.2f} ms",
                    flush=True,
                )
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--batch-sizes", default="1,100,1000")
    parser.add_argument("--concurrency", type=int, default=1, help="batches in flight")
    parser.add_argument("--watchers", type=int, default=0, help="Watch streams to run alongside")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the event counts")
    args = parser.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    for backend in args.backends.split(","):
        await bench_backend(backend, sizes, args.concurrency, args.scale, args.watchers)


if __name__ == "__main__":
    asyncio.run(main())
