"""Settle throughput of the authority's storage: events/s for batch sizes 1, 100 and 1000.

python bench/settle_bench.py [--backend sqlite|postgresql|both] [--dsn postgresql://...]
Each run uses its own temporary SQLite file / PostgreSQL database and removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg

from creditservice.storage import Store, open_store
from creditservice.v1 import credit_pb2 as pb

BATCH_SIZES = (1, 100, 1000)
PROJECTS = 50
DEFAULT_DSN = os.environ.get(
    "CREDITGATE_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def make_events(prefix: str, projects: Sequence[str], count: int) -> list[pb.SettlementEvent]:
    """Gateway-like traffic: mostly commits, some releases, spread over the projects."""
    events = []
    for i in range(count):
        kind = pb.RELEASE if i % 10 == 9 else pb.COMMIT
        events.append(
            pb.SettlementEvent(
                event_id=f"{prefix}-{i:08d}",
                kind=kind,
                project_id=projects[i % len(projects)],
                hold_id=f"{prefix}-{i:08d}",
                held_amount=5,
                amount=3 if kind == pb.COMMIT else 0,
                meter="requests",
                route="/v1/items",
                occurred_at_ms=1_700_000_000_000 + i,
                gateway_id="bench",
            )
        )
    return events


async def prepare_projects(store: Store, count: int, now_ms: int) -> list[str]:
    prefix = uuid.uuid4().hex[:8]
    projects = []
    for i in range(count):
        pid = f"bench-{prefix}-{i}"
        await store.create_wallet(
            pb.CreateWalletRequest(
                request_id=f"{pid}-create",
                project_id=pid,
                organization_id="bench",
                low_balance_threshold=1000,
            ),
            now_ms,
        )
        await store.top_up(
            pb.TopUpRequest(request_id=f"{pid}-topup", project_id=pid, amount=10**12), now_ms
        )
        projects.append(pid)
    return projects


async def run_store_bench(store: Store, batch_size: int, total_events: int) -> float:
    """Settle `total_events` new events in batches of `batch_size` through `store`; events/s."""
    now_ms = int(time.time() * 1000)
    projects = await prepare_projects(store, PROJECTS, now_ms)
    events = make_events(uuid.uuid4().hex[:8], projects, total_events)
    batches = [events[i : i + batch_size] for i in range(0, len(events), batch_size)]
    started = time.perf_counter()
    for batch in batches:
        resp = await store.settle(batch, now_ms)
        if resp.results[0].status != pb.APPLIED:
            raise RuntimeError(f"unexpected settle result {resp.results[0]}")
    return total_events / (time.perf_counter() - started)


def total_for(batch_size: int) -> int:
    return {1: 3_000, 100: 30_000}.get(batch_size, 60_000)


@asynccontextmanager
async def sqlite_store() -> AsyncIterator[Store]:
    workdir = tempfile.mkdtemp(prefix="cg-settle-bench-")
    store = await open_store(f"sqlite:///{workdir}/bench.db")
    try:
        yield store
    finally:
        await store.close()
        shutil.rmtree(workdir, ignore_errors=True)


@asynccontextmanager
async def postgres_store(admin_dsn: str) -> AsyncIterator[Store]:
    """A store in a database of its own on the server of `admin_dsn`, dropped afterwards."""
    name = f"cg_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = admin_dsn.partition("?")[0].rpartition("/")
        store = await open_store(f"{base}/{name}")
        try:
            yield store
        finally:
            await store.close()
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--dsn", default=DEFAULT_DSN, help="PostgreSQL server DSN (a database is made, dropped)"
    )
    args = parser.parse_args()
    backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    print(f"{'backend':<12} {'batch':>6} {'events':>8} {'events/s':>10}")
    for backend in backends:
        for size in BATCH_SIZES:
            ctx = sqlite_store() if backend == "sqlite" else postgres_store(args.dsn)
            async with ctx as store:
                rate = await run_store_bench(store, size, total_for(size))
            print(f"{backend:<12} {size:>6} {total_for(size):>8} {rate:>10,.0f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
