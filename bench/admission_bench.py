"""Admission throughput: one script call per operation vs per-tick batching, side by side.

Usage: python bench/admission_bench.py [--seconds 2] [--projects 64]
Starts its own redis-server on a free port unless REDIS_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from admission import keys
from admission.decision import AdmitRequest
from admission.engine import AdmissionEngine
from admission.policy import Policy, parse_policy
from admission.redis_client import RedisSettings, build_client
from admission.store import AdmitOp, AdmitStatus, Store

POLICY = """
[settings]
shards = 16
max_cost = 1000000
unsettled_limit = 1000000000000

[quotas.requests]
kind = "rate"
limit = 1000000000
window_seconds = 1

[[routes]]
name = "chat"
method = "POST"
path = "/v1/chat/**"
cost = 1
quotas = ["requests"]
"""


class _NoFill:
    async def fill(self, project_id: str) -> bool:
        return False


async def _seed(client: aioredis.Redis, projects: list[str], shards: int) -> None:
    for p in projects:
        await client.hset(  # type: ignore[misc]
            keys.wallet(keys.shard_of(p, shards), p),
            mapping={
                "snap": 10**14,
                "ver": 1,
                "state": 1,
                "low": 0,
                "od": 0,
                "gu": 0,
                "held": 0,
                "uns": 0,
                "unsl": 10**14,
            },
        )


async def _drive(
    concurrency: int, seconds: float, one: Callable[[int], Awaitable[bool]]
) -> tuple[int, float]:
    admitted = 0
    stop = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal admitted
        n = i
        while time.perf_counter() < stop:
            if await one(n):
                admitted += 1
            n += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return admitted, time.perf_counter() - start


async def bench(url: str, seconds: float, n_projects: int) -> None:
    policy: Policy = parse_policy(POLICY, "bench-policy.toml")
    shards = policy.settings.shards
    # Throughput, not the failure path: a generous timeout so 256 unbatched callers can queue.
    client = build_client(
        RedisSettings(url=url, max_connections=512, socket_timeout_s=5.0, connect_timeout_s=5.0)
    )
    assert isinstance(client, aioredis.Redis)
    projects = [f"bench-{uuid.uuid4().hex[:10]}" for _ in range(n_projects)]
    await _seed(client, projects, shards)
    route = policy.route("chat")
    assert route is not None
    quota = policy.quotas["requests"]

    print(f"redis {url}, {n_projects} projects on {shards} shards, {seconds:.0f} s per run")
    print(
        f"{'path':<10}{'callers':>8}{'admits/s':>12}{'round trips/admit':>20}"
        f"{'script calls/admit':>20}"
    )
    try:
        for concurrency in (1, 16, 256):
            # Unbatched: every admission is its own EVALSHA round trip.
            store = Store(client, gateway_id="bench")

            async def unbatched(n: int, store: Store = store) -> bool:
                p = projects[n % len(projects)]
                shard = keys.shard_of(p, shards)
                op = AdmitOp(
                    shard,
                    p,
                    uuid.uuid4().hex,
                    route.cost,
                    1,
                    300_000,
                    route.meter,
                    route.name,
                    False,
                    10**14,
                    (quota,),
                )
                res, _ = await store.run({shard: [op]}, {})
                r = res[shard]
                assert not isinstance(r, BaseException), repr(r.__cause__)
                return r[0].status is AdmitStatus.ADMITTED

            await unbatched(0)
            t0, c0 = store.stats.round_trips, store.stats.script_calls
            n, dt = await _drive(concurrency, seconds, unbatched)
            print(
                f"{'unbatched':<10}{concurrency:>8}{n / dt:>12.0f}"
                f"{(store.stats.round_trips - t0) / max(n, 1):>20.3f}"
                f"{(store.stats.script_calls - c0) / max(n, 1):>20.3f}"
            )

            engine = AdmissionEngine(client, policy, _NoFill(), gateway_id="bench")
            reqs = [engine.request_for(route, p) for p in projects]

            async def batched(
                n: int, engine: AdmissionEngine = engine, reqs: list[AdmitRequest] = reqs
            ) -> bool:
                return (await engine.admit(reqs[n % len(reqs)])).admitted

            await batched(0)
            t0, c0 = engine.stats.round_trips, engine.stats.script_calls
            n, dt = await _drive(concurrency, seconds, batched)
            print(
                f"{'batched':<10}{concurrency:>8}{n / dt:>12.0f}"
                f"{(engine.stats.round_trips - t0) / max(n, 1):>20.3f}"
                f"{(engine.stats.script_calls - c0) / max(n, 1):>20.3f}"
            )
            await engine.drain()
    finally:
        await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--projects", type=int, default=64)
    args = ap.parse_args()
    url = os.environ.get("REDIS_URL")
    proc = None
    if url is None:
        from tests.services import start_redis

        proc = start_redis()
        url = proc.url
    try:
        asyncio.run(bench(url, args.seconds, args.projects))
    finally:
        if proc is not None:
            proc.stop()


if __name__ == "__main__":
    main()
