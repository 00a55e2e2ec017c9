"""`creditgate flusher`: the settlement flusher, the Watch cache subscriber and (with a policy)
the hold-expiry sweeper, standalone, until SIGINT/SIGTERM; it drains the outbox on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from prometheus_client import start_http_server
from redis.connection import parse_url

from admission import keys
from admission.authority import AuthorityClient, AuthorityClientConfig
from admission.cache import CacheFiller, Reconciler, RedisClient, WatchSubscriber
from admission.flusher import Flusher, Sweeper

if TYPE_CHECKING:
    from admission.policy import Policy

log = logging.getLogger("creditgate.flusher")

EXIT_OK, EXIT_USAGE = 0, 2


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "flusher",
        help="settle the outbox with the authority, keep the Redis cache fresh (Watch)",
        description=__doc__,
    )
    p.add_argument(
        "--redis",
        default=os.environ.get("CREDITGATE_REDIS")
        or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        metavar="URL",
        help="Redis URL (env CREDITGATE_REDIS or REDIS_URL, default %(default)s)",
    )
    p.add_argument("--cluster", action="store_true", help="the URL names a Redis Cluster node")
    p.add_argument(
        "--authority",
        default=os.environ.get("CREDITGATE_AUTHORITY", "127.0.0.1:50051"),
        metavar="HOST:PORT",
        help="authority gRPC address (env CREDITGATE_AUTHORITY, default %(default)s)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("CREDITGATE_ADMIN_TOKEN"),
        help="bearer token for the authority (env CREDITGATE_ADMIN_TOKEN)",
    )
    p.add_argument(
        "--shards", type=int, default=None, help="virtual shards (default: policy's or 16)"
    )
    p.add_argument(
        "--policy",
        default=None,
        metavar="FILE",
        help="policy file: enables the hold-expiry sweeper here (else the gateways run it)",
    )
    p.add_argument(
        "--gateway-id",
        type=_gateway_id,
        default=socket.gethostname(),
        help=f"consumer name prefix, at most {keys.MAX_GATEWAY_ID} characters",
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--claim-idle-ms", type=int, default=30_000)
    p.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--no-watch", action="store_true", help="settle only; no cache subscriber")
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0 = off)"
    )
    p.set_defaults(func=main)


def _gateway_id(text: str) -> str:
    try:
        keys.check_gateway_id(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def main(args: argparse.Namespace) -> int:
    if not args.token:
        print("error: flusher: --token or CREDITGATE_ADMIN_TOKEN is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        parse_url(args.redis)  # type: ignore[no-untyped-call]
    except ValueError as err:
        print(f"error: flusher: --redis: {err}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    policy = None
    if args.policy:
        from admission.errors import PolicyError
        from admission.policy import load_policy

        try:
            policy = load_policy(args.policy)
        except (PolicyError, OSError) as err:
            print(f"error: flusher: {err}", file=sys.stderr)
            return EXIT_USAGE
    shards = args.shards or (policy.settings.shards if policy else keys.DEFAULT_SHARDS)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    asyncio.run(_run(args, shards, policy))
    return EXIT_OK


def _redis(args: argparse.Namespace) -> RedisClient:
    # Longer timeouts than the admission path: blocking stream reads and batch acks.
    if args.cluster:
        return aioredis.RedisCluster.from_url(args.redis, socket_timeout=10)
    return aioredis.Redis.from_url(args.redis, socket_timeout=10)


async def _run(args: argparse.Namespace, shards: int, policy: Policy | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    redis = _redis(args)
    config = AuthorityClientConfig(target=args.authority, token=args.token)
    async with AuthorityClient(config) as authority:
        filler = CacheFiller(redis, authority, shards=shards)
        engine = None
        if policy is not None:
            from admission.engine import AdmissionEngine

            engine = AdmissionEngine(redis, policy, filler, gateway_id=args.gateway_id)
        sweeper: Sweeper | None = engine
        flusher = Flusher(
            redis,
            authority,
            shards=shards,
            gateway_id=args.gateway_id,
            batch_size=args.batch_size,
            claim_idle_ms=args.claim_idle_ms,
            sweeper=sweeper,
            # Within the client's 10 s socket timeout; stop() waits for at most one block.
            block_ms=1000,
        )
        flushing = asyncio.create_task(flusher.run(), name="flusher")
        tasks: list[asyncio.Task[None]] = []
        watch = WatchSubscriber(filler)
        reconciler = Reconciler(filler)
        if not args.no_watch:
            await watch.start()
            tasks.append(asyncio.create_task(reconciler.run(), name="reconcile"))
        log.info(
            "flusher %s running: %d shards, authority %s", flusher.consumer, shards, args.authority
        )
        await stop.wait()
        log.info("shutting down: draining the outbox (at most %.1fs)", args.drain_timeout)
        reconciler.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await watch.aclose()
        flusher.stop()
        await flushing
        drained = await flusher.drain(args.drain_timeout)
        log.info("drained %d outbox entries", drained)
        if engine is not None:
            await engine.drain()
        await filler.aclose()
    await redis.aclose()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
